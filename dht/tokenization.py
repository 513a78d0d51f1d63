"""Tokenization: a WordPiece vocabulary trained on the training split (offline default) or a pretrained
tokenizer by name or path, and the processed parquet files every model stage reads.

``data/processed/<dataset>/`` holds ``train.parquet``, ``val.parquet`` and ``test.parquet`` (``input_ids`` and
``attention_mask`` padded to the dataset's ``max_length``, ``label``, ``n_tokens`` before truncation, and
``difficulty`` where the dataset has it), the tokenizer in ``save_pretrained`` form under ``tokenizer/``, and
``meta.json`` with the statistics the report shows. A trained vocabulary learns from the training split alone:
the validation split is held out of everything a model learns from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dht.config import TokenizerConfig
from dht.data import TextDataset

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, lowercase: bool = True,
                    limit_alphabet: int = 1000):
    """A BERT-style WordPiece tokenizer (BERT normalizer and pre-tokenizer, [CLS] x [SEP]) trained on `texts`,
    wrapped as a transformers tokenizer so it saves and loads with save_pretrained/AutoTokenizer.

    Deterministic: the same texts give the same vocabulary, ids included, in every process. The library's trainer
    alone does not (huggingface/tokenizers#1794): it gives the ``##c`` continuing-subword tokens their ids in
    hash-map order, and those ids break ties between equally frequent merges, so two runs on the same data
    learned different vocabularies (and every model trained on them different metrics). So the alphabet is
    chosen here (the `limit_alphabet` most frequent characters, ties by code point) and its ``##c`` tokens are
    handed to the trainer up front, which then assigns every id in a fixed order; the trained vocabulary is
    rebuilt into a plain WordPiece tokenizer whose only special tokens are SPECIAL_TOKENS.
    """
    from collections import Counter

    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    texts = list(texts)
    wp = BertWordPieceTokenizer(lowercase=lowercase)
    normalize, split = wp._tokenizer.normalizer.normalize_str, wp._tokenizer.pre_tokenizer.pre_tokenize_str
    chars: Counter[str] = Counter()
    for text in texts:
        for word, _ in split(normalize(text)):
            chars.update(word)
    alphabet = sorted(c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet])
    wp.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=len(alphabet),
        initial_alphabet=alphabet, special_tokens=SPECIAL_TOKENS + [f"##{c}" for c in alphabet],
        show_progress=False,
    )
    # Rebuilt from the vocabulary so that the ##c tokens are ordinary entries, not special tokens that would be
    # split out of raw text and dropped by decode(skip_special_tokens=True).
    plain = BertWordPieceTokenizer(vocab=wp.get_vocab(), lowercase=lowercase)
    return BertTokenizerFast(tokenizer_object=plain._tokenizer, do_lower_case=lowercase)


def load_pretrained_tokenizer(name_or_path: str):
    """A pretrained tokenizer by hub name (needs internet once), local directory, or ``package:NAME`` (the
    checkpoint directory a pip package ships, its weights' checksum verified: dht/pretrained.py)."""
    from transformers import AutoTokenizer

    from dht.pretrained import is_package_ref, resolve

    source = resolve(name_or_path)  # PretrainedPackageError (unknown, not installed, checksum) passes through
    try:
        # A package is a local directory: never ask the hub, even for a file the directory lacks.
        return AutoTokenizer.from_pretrained(source, local_files_only=is_package_ref(name_or_path))
    except Exception as err:  # hub/offline/missing-file errors come in many types
        raise ValueError(
            f"could not load tokenizer {name_or_path!r}: {type(err).__name__}: {err}\n"
            "Offline, save it where you have internet (AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)) "
            "and set tokenizer.name_or_path to DIR."
        ) from err


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str]):
    if cfg.kind == "wordpiece":
        return train_wordpiece(train_texts, cfg.vocab_size, cfg.min_frequency, cfg.lowercase)
    assert cfg.name_or_path, "validated by dht.config_checks"
    return load_pretrained_tokenizer(cfg.name_or_path)


def encode_frame(tokenizer, frame: pd.DataFrame, max_length: int, batch_size: int = 4096) -> pa.Table:
    """Token ids padded/truncated to `max_length` (int32), with label, untruncated length and difficulty."""
    ids_parts, mask_parts, lengths = [], [], []
    texts = frame["text"].tolist()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        # The untruncated lengths are counted, never run through a model: `verbose=False` turns off, for this
        # call only, transformers' "Token indices sequence length is longer than the specified maximum ...
        # indexing errors" warning, which is about a model's input and would be logged once per dataset with a
        # text over max_length. The ids the model reads (the call below) keep every warning.
        full = tokenizer(chunk, add_special_tokens=True, truncation=False, return_attention_mask=False,
                         verbose=False)["input_ids"]
        lengths += [len(x) for x in full]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding="max_length",
                        return_attention_mask=True, return_tensors="np")
        ids_parts.append(enc["input_ids"].astype(np.int32))
        mask_parts.append(enc["attention_mask"].astype(np.int8))
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0, max_length), np.int32)
    mask = np.concatenate(mask_parts) if mask_parts else np.zeros((0, max_length), np.int8)
    columns = {
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), max_length),
        "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), max_length),
        "label": pa.array(frame["label"].to_numpy(np.int64)),
        "n_tokens": pa.array(np.asarray(lengths, np.int32)),
    }
    if "difficulty" in frame.columns:
        columns["difficulty"] = pa.array(frame["difficulty"].to_numpy(np.int64))
    return pa.table(columns)


def prepare(ds: TextDataset, cfg: TokenizerConfig, max_length: int, out_dir: str | Path, name: str) -> dict[str, Any]:
    """Tokenize the three splits of `ds` (train, val, test; val empty when it has none) into `out_dir`; returns the
    metadata written to meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg, ds.train["text"].tolist())
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out / "tokenizer")
    stats: dict[str, Any] = {}
    val = ds.val if ds.val is not None else ds.train.iloc[:0]
    for split, frame in (("train", ds.train), ("val", val), ("test", ds.test)):
        table = encode_frame(tokenizer, frame, max_length)
        pq.write_table(table, out / f"{split}.parquet")
        n_tokens = table.column("n_tokens").to_numpy()
        stats[split] = {"n": table.num_rows}
        if table.num_rows:
            stats[split].update({
                "mean_tokens": round(float(n_tokens.mean()), 2),
                "p95_tokens": int(np.percentile(n_tokens, 95)),
                "truncated_share": round(float((n_tokens > max_length).mean()), 4),
            })
        stats[split]["label_counts"] = np.bincount(frame["label"], minlength=len(ds.classes)).tolist()
        if "difficulty" in frame.columns:
            stats[split]["difficulty_counts"] = np.bincount(frame["difficulty"], minlength=3).tolist()
    meta = {
        "name": name,
        "source": ds.source,
        "classes": ds.classes,
        "num_labels": len(ds.classes),
        "max_length": max_length,
        "vocab_size": len(tokenizer),
        "tokenizer": cfg.kind if cfg.kind == "wordpiece" else cfg.name_or_path,
        "has_difficulty": ds.has_difficulty,
        "splits": stats,
        **ds.extra,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_processed(directory: str | Path, split: str) -> dict[str, np.ndarray]:
    """A processed split as numpy arrays (input_ids [N, T] int64, attention_mask, label, ...)."""
    path = Path(directory) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; run the tokenize stage first (snakemake --cores 1 {directory}/meta.json)"
        )
    table = pq.read_table(path)
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
            out[name] = col.flatten().to_numpy().reshape(-1, width).astype(np.int64)
        else:
            out[name] = col.to_numpy()
    return out
