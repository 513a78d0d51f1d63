"""`dht predict`: a trained model directory in, one row per text out, the bandits acting as the model's saved
`dht.inference` says unless `--inference` overrides it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from dht import cli, policy
from dht.arm_features import arm_space, compute_arm_features
from dht.config_loading import load_config, read_params
from dht.integrity import MANIFEST_FILE, write_manifest
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.policy import Policy
from dht.tokenization import train_wordpiece
from dht.trainer import save_trained

SEQ = 16
TEXTS = ["the match ended in a draw", "shares fell sharply today", "a new chip for phones",
         "rain is expected in the north", "the striker scored twice", "the bank raised its rates"] * 4


def save_model(directory, inference: str):
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    raw["profiles"]["tiny"]["dht"]["inference"] = inference
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    tokenizer = train_wordpiece(TEXTS, vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    model = DHTForSequenceClassification(DHTConfig(
        vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=64, max_position_embeddings=SEQ, num_labels=2))
    enc = tokenizer(TEXTS, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    batches = [(enc["input_ids"][i : i + 8], enc["attention_mask"][i : i + 8]) for i in range(0, len(TEXTS), 8)]
    feats, _ = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    policy = Policy(cfg, cfg.dht.modes["t-dht"], feats, model.config)
    save_trained(directory, model, policy, "t-dht", cfg, {"dataset": "embedded-news", "classes": ["a", "b"],
                                                          "max_length": SEQ})
    save_file(feats, str(directory / "arm_features.safetensors"))
    tokenizer.save_pretrained(directory / "tokenizer")
    write_manifest(directory)  # as the train stage does, last
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {mode: save_model(root / mode, mode) for mode in ("greedy", "sample")}


def run_predict(monkeypatch, tmp_path, capsys, model_dir, *flags: str) -> tuple[list[bool], list[dict]]:
    """Run `dht predict` on a few texts; (the greedy argument of each policy.predict call, the rows)."""
    calls: list[bool] = []
    original = policy.predict

    def spy(*args, **kwargs):
        calls.append(kwargs["greedy"])
        return original(*args, **kwargs)

    monkeypatch.setattr(policy, "predict", spy)
    texts = tmp_path / "texts.txt"
    texts.write_text("the striker scored\nshares fell\n")
    code = cli.main(["predict", "--model", str(model_dir), "--input", str(texts), "--format", "jsonl",
                     "--device", "cpu", *flags])
    assert code == 0
    return calls, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize(("saved", "flags", "greedy"), [
    ("greedy", [], True), ("sample", [], False),  # the model's own setting
    ("sample", ["--inference", "greedy"], True), ("greedy", ["--inference", "sample"], False),  # overridden
])
def test_predict_follows_the_saved_inference_setting_unless_told(models, monkeypatch, tmp_path, capsys, saved, flags,
                                                                  greedy):
    calls, rows = run_predict(monkeypatch, tmp_path, capsys, models[saved], *flags)
    assert calls == [greedy]
    assert [r["text"] for r in rows] == ["the striker scored", "shares fell"]
    assert all(r["label"] in ("a", "b") and r["layers"] in (3, 6, 9, 12) for r in rows)


def test_an_unknown_inference_setting_is_refused(models, capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--model", str(models["greedy"]), "--inference", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err


# ---- what goes wrong: one line naming the problem and the fix, exit status 1 -------------------------------------

RETRAIN = "retrain it: snakemake --cores 4 --force results/embedded-news/t-dht/metrics.json"  # the train rule's output


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused: a local model directory must never reach for the hub
    (a missing tokenizer/ took ~45 s of retries, then said "check your internet connection")."""
    import socket

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return attempts


def predict_fails(capsys, model_dir, texts_file, *flags: str) -> str:
    code = cli.main(["predict", "--model", str(model_dir), "--input", str(texts_file), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("the striker scored\nshares fell\n")
    return path


@pytest.fixture
def damaged(models, tmp_path):
    """A copy of a saved model directory, to damage."""
    import shutil

    return shutil.copytree(models["greedy"], tmp_path / "model")


def test_input_that_is_not_utf8_or_not_there(models, capsys, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the striker scored\nun caf\xe9 cr\xe8me\n".encode("latin-1"))
    line = predict_fails(capsys, models["greedy"], latin)
    assert line == (f"error: {latin}, line 2: bytes b'\\xe9' are not UTF-8 (invalid continuation byte); save the "
                    "texts as UTF-8 (e.g. `iconv -f latin1 -t utf-8`, with their real encoding)")
    line = predict_fails(capsys, models["greedy"], tmp_path / "nope.txt")
    assert line.startswith(f"error: --input {tmp_path / 'nope.txt'}: no such file")


@pytest.mark.parametrize("manifest", [True, False], ids=["with checksums", "saved before checksums"])
def test_missing_or_truncated_weights(damaged, capsys, texts, manifest):
    if not manifest:
        (damaged / MANIFEST_FILE).unlink()
    weights = damaged / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    flags = [] if manifest else ["--allow-unverified"]  # without checksums: only when the user says so
    line = predict_fails(capsys, damaged, texts, *flags)
    if manifest:
        assert f"{weights}: checksum mismatch with {MANIFEST_FILE}" in line
    else:  # no checksums to compare: the read error itself, in one line
        assert f"{weights}: cannot be read (SafetensorError" in line
    assert line.endswith(RETRAIN)
    weights.unlink()
    line = predict_fails(capsys, damaged, texts, *flags)
    assert f"{weights}: missing" in line and line.endswith(RETRAIN)


@pytest.mark.parametrize("name", ["config.json", "arm_features.safetensors", "bandits.pt"])
def test_a_missing_file_names_it_and_a_target_that_exists(damaged, capsys, texts, name):
    """A missing config.json was a size-mismatch report against BERT-base's 768; a missing arm_features file
    suggested `snakemake ... models/<dataset>/<model>/arm_features.safetensors`, which no rule makes."""
    for manifest in (True, False):
        (damaged / name).unlink(missing_ok=True)
        if not manifest:
            (damaged / MANIFEST_FILE).unlink()
        line = predict_fails(capsys, damaged, texts, *([] if manifest else ["--allow-unverified"]))
        assert f"{damaged / name}: missing" in line and line.endswith(RETRAIN), line


def test_a_missing_or_broken_tokenizer_never_reaches_the_network(damaged, capsys, texts, no_network, monkeypatch):
    import shutil
    import time

    monkeypatch.chdir(damaged.parent)  # a relative "model/tokenizer" also reads as a hub id "namespace/name"
    start = time.perf_counter()
    shutil.rmtree("model/tokenizer")
    Path("model", MANIFEST_FILE).unlink()  # saved before checksums: nothing tells the tokenizer is gone but itself
    line = predict_fails(capsys, "model", texts, "--allow-unverified")
    assert line == f"error: model/tokenizer: missing; {RETRAIN}"
    Path("model/tokenizer").mkdir()  # there, but empty
    line = predict_fails(capsys, "model", texts, "--allow-unverified")
    assert line.startswith("error: model/tokenizer: cannot be read (") and line.endswith(RETRAIN)
    assert no_network == [] and time.perf_counter() - start < 30


def test_a_text_longer_than_the_model_is_truncated_with_a_note(models, capsys, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("shares fell\n" + " ".join(["the striker scored twice"] * 10) + "\n\nrain today\n")
    code = cli.main(["predict", "--model", str(models["greedy"]), "--input", str(path), "--device", "cpu",
                     "--format", "jsonl"])
    out = capsys.readouterr()
    assert code == 0 and len(out.out.splitlines()) == 3
    assert out.err.strip() == (f"note: 1 text(s) longer than the model's {SEQ} tokens were truncated to their first "
                               f"{SEQ} (line 2)")
