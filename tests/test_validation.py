"""The validation split in the pipeline and in what chooses settings: every model's metrics.json carries its
val_accuracy (the same inference as its test figures), no model trains on the split, and the FlexiBERT search,
experiments/routing_probe.py and the studies (tests/test_studies.py) read it, never the test split. In the tiny profile the two
splits differ in size and rows (32 validation, 96 test samples of embedded-news), so a selection that read the
test split would report on 96 samples and other mistakes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_DATASET

from dht.config_loading import load_config
from dht.evaluation import SplitData
from dht.policy import predict
from dht.tokenization import load_processed
from dht.trainer import load_trained

N_TRAIN, N_VAL, N_TEST = 320, 32, 96  # tiny: n_train 320, a validation stream of a tenth of that, n_test 96


def experiment(name: str):
    """A script of experiments/ as a module (they are run as scripts, not installed)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split(project: Path, name: str) -> SplitData:
    return SplitData.from_arrays(load_processed(project / "data/processed" / TINY_DATASET, name))


def assert_every_model_reports_val_accuracy_and_the_search_and_the_probe_read_the_validation_split(
        project: Path, models: list[str]) -> None:
    """After a real tiny run (the end-to-end test's DAG calls this) of `models` on embedded-news, among them
    t-dht, the control vanilla-3 and flexibert-0.5."""
    ds = TINY_DATASET
    raw = json.loads((project / f"data/raw/{ds}/meta.json").read_text())
    assert (raw["n_train"], raw["n_val"], raw["n_test"]) == (N_TRAIN, N_VAL, N_TEST)
    val, test = split(project, "val"), split(project, "test")
    assert (len(split(project, "train")), len(val), len(test)) == (N_TRAIN, N_VAL, N_TEST)

    metrics = {m: json.loads((project / f"results/{ds}/{m}/metrics.json").read_text()) for m in models}
    for m, got in metrics.items():
        assert got["n_val"] == N_VAL and got["n_test"] == N_TEST, m
        assert 0 <= got["val_accuracy"] <= 1 and 0 <= got["val_macro_f1"] <= 1 and got["val_infer_flop_ratio"] > 0, m
    # val_accuracy is the model's accuracy on the validation split, with its inference policy
    cfg = load_config(project / "params.yaml", profile="tiny")
    model, policy, _ = load_trained(project / f"models/{ds}/t-dht", torch.device("cpu"))
    pred = predict(model, policy, val, torch.device("cpu"), cfg.train.eval_batch_size, 40)
    assert metrics["t-dht"]["val_accuracy"] == round(float((pred.labels == val.labels).float().mean()), 6)
    # no model trains on it: the fixed control ran every training row, and only those, in each epoch
    selections = json.loads((project / f"results/{ds}/vanilla-3/selections.json").read_text())
    assert len(selections) == cfg.train.epochs and all(e["layers/3"] == N_TRAIN for e in selections.values())

    # the FlexiBERT search scored its queries on the validation split
    trace = json.loads((project / f"results/{ds}/flexibert-search/trace.json").read_text())
    assert (trace["n_train"], trace["n_val"]) == (N_TRAIN, N_VAL)
    assert all(round(q["accuracy"] * N_VAL, 6).is_integer() for q in trace["queries"])

    # the routing probe: the control's mistakes and the contexts of the validation samples
    r = experiment("routing_probe").probe(project, ds, "t-dht", "vanilla-3")
    assert r["n"] == N_VAL and r["wrong"].shape == (N_VAL,)
    assert 1 - r["wrong"].mean() == pytest.approx(metrics["vanilla-3"]["val_accuracy"], abs=1e-6)
