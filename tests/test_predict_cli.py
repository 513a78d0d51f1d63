"""`dht predict`: a trained model directory in, one row per text out, the bandits acting as the model's saved
`dht.inference` says unless `--inference` overrides it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from dht import cli, trainer
from dht.arm_features import arm_space, compute_arm_features
from dht.config import load_config, read_params
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.tokenization import train_wordpiece
from dht.trainer import Policy, save_trained

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
    save_trained(directory, model, policy, "t-dht", cfg, {"classes": ["a", "b"], "max_length": SEQ})
    save_file(feats, str(directory / "arm_features.safetensors"))
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {mode: save_model(root / mode, mode) for mode in ("greedy", "sample")}


def run_predict(monkeypatch, tmp_path, capsys, model_dir, *flags: str) -> tuple[list[bool], list[dict]]:
    """Run `dht predict` on a few texts; (the greedy argument of each trainer.predict call, the rows)."""
    calls: list[bool] = []
    original = trainer.predict

    def spy(*args, **kwargs):
        calls.append(kwargs["greedy"])
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "predict", spy)
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
