"""Tokenizer training, save/load round trip, and the processed parquet files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import ROOT

from dht.config import TokenizerConfig
from dht.config_loading import load_config
from dht.data import TextDataset
from dht.embedded import generate
from dht.tokenization import (
    SPECIAL_TOKENS,
    encode_frame,
    load_pretrained_tokenizer,
    load_processed,
    prepare,
    train_wordpiece,
)


def wordpiece(vocab_size: int) -> TokenizerConfig:
    """The embedded profile's tokenizer (a WordPiece trained on the training split) with `vocab_size` pieces."""
    tokenizer = load_config(ROOT / "params.yaml", profile="embedded").tokenizer
    assert tokenizer.kind == "wordpiece"
    return tokenizer.model_copy(update={"vocab_size": vocab_size})


@pytest.fixture(scope="module")
def corpus():
    train, test, classes = generate(4, 600, 100, seed=0)
    return TextDataset(train, test, classes, source="embedded")


def test_wordpiece_round_trip_through_save_pretrained(tmp_path, corpus):
    tok = train_wordpiece(corpus.train["text"], vocab_size=400, min_frequency=1)
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_pretrained_tokenizer(str(tmp_path / "tok"))
    text = corpus.test["text"][0]
    ids = loaded(text)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == text.lower()
    assert loaded.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    assert loaded.pad_token_id == 0


def test_wordpiece_training_is_deterministic(corpus):
    # The library's trainer alone learned a different vocabulary on most calls (huggingface/tokenizers#1794):
    # eight calls gave eight vocabularies on the embedded data, so the same seed gave other metrics per run.
    vocabs = {json.dumps(train_wordpiece(corpus.train["text"], vocab_size=300).get_vocab(), sort_keys=True)
              for _ in range(6)}
    assert len(vocabs) == 1
    vocab = json.loads(vocabs.pop())
    assert len(vocab) == 300
    # the continuing-subword tokens handed to the trainer are ordinary vocabulary, not special tokens
    tok = train_wordpiece(corpus.train["text"], vocab_size=300)
    assert set(tok.all_special_tokens) == set(SPECIAL_TOKENS) and "##e" in vocab
    ids = tok("officials said the stadium")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "officials said the stadium"


def test_wordpiece_alphabet_limit_keeps_the_most_frequent_characters():
    tok = train_wordpiece(["aaaa bbb cc d"] * 3, vocab_size=50, min_frequency=1, limit_alphabet=2)
    vocab = tok.get_vocab()
    assert {"a", "b", "##a", "##b"} <= vocab.keys() and not {"c", "d", "##c"} & vocab.keys()
    assert tok.tokenize("cab") == ["[UNK]"]  # a word with a character outside the alphabet is unknown whole


def test_unknown_words_are_split_into_pieces_not_lost(corpus):
    tok = train_wordpiece(corpus.train["text"], vocab_size=1000, min_frequency=1)  # room for every word
    pieces = tok.tokenize("goalkeeperish")
    assert pieces[0] == "goalkeeper" and all(p.startswith("##") for p in pieces[1:])


def test_encode_pads_truncates_and_counts(corpus):
    tok = train_wordpiece(corpus.train["text"], vocab_size=1000, min_frequency=1)
    frame = corpus.test.iloc[:5].copy()
    frame.loc[frame.index[0], "text"] = " ".join(["goalkeeper"] * 50)
    table = encode_frame(tok, frame, max_length=16)
    ids = np.asarray(table.column("input_ids").to_pylist())
    mask = np.asarray(table.column("attention_mask").to_pylist())
    assert ids.shape == (5, 16) and mask.shape == (5, 16)
    assert table.column("n_tokens").to_pylist()[0] == 52  # [CLS] + 50 + [SEP], before truncation
    assert ids[0, -1] == tok.sep_token_id and mask[0].all()  # truncated keeps the closing [SEP]
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert table.column("difficulty").to_pylist() == frame["difficulty"].tolist()


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_counting_lengths_past_max_length_logs_no_model_input_warning(tmp_path, corpus):
    # The tokenize stage's log carried transformers' "Token indices sequence length is longer than the specified
    # maximum ... indexing errors" for the untruncated count, which no model reads: it must not be logged, and the
    # count must still be the full length. A real problem of the ids the model reads is still reported (the last
    # part: the same tokenizer asked for an untruncated model input still warns).
    long = corpus.train.copy()
    long.loc[long.index[:3], "text"] = " ".join(["goalkeeper"] * 50)
    ds = TextDataset(long, corpus.test, corpus.classes, source="embedded")
    handler = Recorded()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        meta = prepare(ds, wordpiece(300), max_length=16, out_dir=tmp_path, name="emb")
        assert not [m for m in handler.messages if "sequence length is longer" in m], handler.messages
        assert meta["splits"]["train"]["truncated_share"] > 0
        assert load_processed(tmp_path, "train")["n_tokens"].max() >= 52  # [CLS] + 50 pieces + [SEP], uncut
        tok = load_pretrained_tokenizer(str(tmp_path / "tokenizer"))
        tok(" ".join(["goalkeeper"] * 50))
        assert [m for m in handler.messages if "sequence length is longer" in m]
    finally:
        logger.removeHandler(handler)


def test_prepare_writes_parquet_tokenizer_and_meta(tmp_path, corpus):
    meta = prepare(corpus, wordpiece(300), max_length=24, out_dir=tmp_path, name="emb")
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["splits"]["train"]["n"] == 600 and sum(meta["splits"]["train"]["label_counts"]) == 600
    assert meta["splits"]["train"]["difficulty_counts"] == [240, 180, 180]
    arrays = load_processed(tmp_path, "train")
    assert arrays["input_ids"].shape == (600, 24) and arrays["input_ids"].dtype == np.int64
    assert (arrays["label"] == corpus.train["label"].to_numpy()).all()


def test_the_validation_split_is_tokenized_apart_and_the_vocabulary_never_learns_from_it(tmp_path, corpus):
    import pandas as pd

    from dht.data import split_validation

    train, val = split_validation(corpus.train, 0.1, seed=0)
    # a word only the validation split has: with room for every word (vocab_size 2000: ~620 are learnt), trained on
    # the 60 validation rows too it would be a vocabulary entry (checked)
    val = val.assign(text=val["text"] + " quixotically")
    ds = TextDataset(train, corpus.test, corpus.classes, source="embedded", val=val)
    meta = prepare(ds, wordpiece(2000), max_length=24, out_dir=tmp_path, name="emb")
    assert [meta["splits"][s]["n"] for s in ("train", "val", "test")] == [540, 60, 100]
    for split, frame in (("train", train), ("val", val)):
        arrays = load_processed(tmp_path, split)
        assert (arrays["label"] == frame["label"].to_numpy()).all()  # each split's own rows, in order
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tmp_path / "tokenizer").get_vocab()
    assert "quixotically" not in vocab and "the" in vocab
    # without a validation split (data.val_fraction 0) the file is there, empty, with the same columns
    empty = prepare(TextDataset(train, corpus.test, corpus.classes, source="embedded"), wordpiece(300),
                    max_length=24, out_dir=tmp_path / "none", name="emb")
    assert empty["splits"]["val"] == {"n": 0, "label_counts": [0, 0, 0, 0], "difficulty_counts": [0, 0, 0]}
    arrays = load_processed(tmp_path / "none", "val")
    assert arrays["input_ids"].shape == (0, 24) and set(arrays) == set(load_processed(tmp_path / "none", "train"))
    assert isinstance(pd.read_parquet(tmp_path / "none" / "val.parquet"), pd.DataFrame)


def test_missing_processed_split_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the tokenize stage first"):
        load_processed(tmp_path, "train")


def test_pretrained_tokenizer_missing_is_clear(tmp_path):
    with pytest.raises(ValueError, match="could not load tokenizer"):
        load_pretrained_tokenizer(str(tmp_path / "no-such-tokenizer"))
