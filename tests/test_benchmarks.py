"""benchmarks/run.py: the report's structure and numbers on a tiny synthetic project (never a timing value).

The project is written the way the pipeline writes one (processed parquet splits, the initial model and arm
features, models saved by save_trained / save_pretrained / FastBERT.save), with random-init weights, so the
benchmark reads it through the same loaders; nas-prune-0.5 is left out to check that a missing model is
listed as skipped in --quick mode and stops a full run with the command that trains it. The report tests
are marked slow: building the project and the --quick run take ~20 s on a loaded 2-core machine.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, write_processed_split

from dht.arm_features import arm_space, compute_arm_features, save_arm_features
from dht.baselines.distil import student_from_teacher
from dht.baselines.fastbert import FastBERT
from dht.config_loading import load_config, read_params
from dht.integrity import write_manifest
from dht.model import model_from_params
from dht.policy import Policy
from dht.trainer import save_trained

DATASET = "embedded-news"
SEQ, VOCAB, LABELS = 16, 50, 4
MISSING = "nas-prune-0.5"


def load_run():
    """benchmarks/run.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def write_split(path: Path, n: int, gen: torch.Generator) -> None:
    """A processed split as the tokenize stage writes it (fixed-size lists, right padding)."""
    lengths = torch.randint(6, SEQ + 1, (n,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).to(torch.int8)
    ids = (torch.randint(5, VOCAB, (n, SEQ), generator=gen) * mask).to(torch.int32)
    write_processed_split(path, ids, mask, torch.randint(0, LABELS, (n,), generator=gen), lengths)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    tiny = raw["profiles"]["tiny"]
    tiny["model"] = {"hidden_size": 48, "intermediate_size": 64, "max_position_embeddings": SEQ}
    tiny["train"] = {**tiny["train"], "batch_size": 8, "eval_batch_size": 16}
    for name in tiny["datasets"]:
        tiny["datasets"][name]["max_length"] = SEQ
    # the sequential mode (docs/training.md T31) at the tiny profile's b = c = 3: its rows in every section
    raw["dht"]["modes"]["q-dht"] = {**raw["dht"]["modes"]["q-dht"], "layers": [3, 6, 9, 12]}
    tiny["run"] = {**tiny["run"], "models": [*raw["profiles"]["embedded"]["run"]["models"], "q-dht"]}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(root / "params.yaml", profile="tiny")

    gen = torch.Generator().manual_seed(0)
    processed = root / "data" / "processed" / DATASET
    processed.mkdir(parents=True)
    write_split(processed / "train.parquet", 48, gen)
    write_split(processed / "test.parquet", 24, gen)
    classes = [f"c{i}" for i in range(LABELS)]
    (processed / "meta.json").write_text(json.dumps({"name": DATASET, "classes": classes, "num_labels": LABELS,
                                                     "max_length": SEQ, "vocab_size": VOCAB}))

    torch.manual_seed(0)
    model = model_from_params(cfg, LABELS, VOCAB)
    features = root / "data" / "features" / DATASET
    model.save_pretrained(features / "init_model")
    batches = [(torch.randint(5, VOCAB, (32, SEQ), generator=gen), torch.ones(32, SEQ, dtype=torch.long))
               for _ in range(2)]
    feats, counts = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    save_arm_features(features, feats, counts, {"dataset": DATASET, "profile": "tiny"})

    models = root / "models" / DATASET
    for mode in cfg.run.models:
        out = models / mode
        save_trained(out, model, Policy(cfg, cfg.dht.modes[mode], feats, model.config), mode, cfg,
                     {"dataset": DATASET, "classes": classes, "max_length": SEQ})
        shutil.copy2(features / "arm_features.safetensors", out / "arm_features.safetensors")
    student_from_teacher(model, 3).save_pretrained(models / "distil-3")
    FastBERT(model, cla_hidden_size=8).save(models / "fastbert-0.5")
    for name in ("distil-3", "fastbert-0.5"):
        (models / name / "baseline.json").write_text(json.dumps({"model_name": name}))
    for directory in models.iterdir():
        write_manifest(directory)  # last, as the train and baseline stages do
    assert MISSING in cfg.run.baselines and not (models / MISSING).exists()
    return root


def run_args(project: Path, *extra: str) -> list[str]:
    return ["--root", str(project), "--profile", "tiny", "--dataset", DATASET, *extra]


@pytest.fixture(scope="module")
def quick_report(project) -> str:
    run = load_run()
    # --quick plus the smallest settings: one round, no warm-up, a 2-point-long grid (the test times nothing).
    out = run.main(run_args(project, "--quick", "--repeats", "1", "--warmup", "0", "--train-steps", "2",
                            "--scaling-seq", "8", "16", "--scaling-batch", "2", "4",
                            "--out", str(project / "bench.md")))
    return Path(out).read_text()


def section(report: str, number: int) -> str:
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", report, flags=re.S | re.M)
    assert match, f"section {number} missing"
    return match.group(0)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def ratios(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(-?\d+\.\d+)x\b", text)]


@pytest.mark.slow
def test_sections_runs_only_the_sections_asked_for(project):
    run = load_run()
    out = run.main(run_args(project, "--quick", "--repeats", "1", "--warmup", "0", "--sections", "scaling",
                            "--scaling-seq", "8", "--scaling-batch", "2", "--out", str(project / "scaling.md")))
    report = Path(out).read_text()
    section(report, 4)
    assert not re.search(r"^## [123]\. ", report, flags=re.M)


@pytest.mark.slow
def test_quick_report_has_every_section_and_machine(quick_report):
    for number in (1, 2, 3, 4):
        section(quick_report, number)
    for what in ("| CPU |", "| cores |", "| torch |", "| git commit |", "| date (UTC) |", "device / CUDA device"):
        assert what in quick_report
    assert "## Summary of shortfalls" in quick_report
    pipeline = section(quick_report, 3)
    assert "Pipeline runs: skipped (--quick)" in pipeline and "Test suite: skipped (--quick)" in pipeline


@pytest.mark.slow
def test_inference_rows_have_positive_finite_ratios(quick_report):
    inference = section(quick_report, 1)
    for name in ("vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht", "q-dht", "distil-3", "fastbert-0.5"):
        rows = table_rows(inference, name)
        assert rows, f"no row for {name}"
        row = rows[0]
        wall, flops = float(row[2].split("x")[0]), float(row[3].rstrip("x"))
        assert math.isfinite(wall) and wall > 0 and math.isfinite(flops) and flops > 0, row
        if name in ("t-dht", "s-dht", "f-dht", "p-dht", "q-dht"):
            assert row[6] in ("yes", "**no**")  # every DHT row is marked against the goal
            assert len(table_rows(inference, name)) == 2  # and has its where-the-time-goes row
    assert table_rows(inference, "vanilla-12")[0][2].startswith("1.00x")
    assert f"`{MISSING}`" in inference and f"results/{DATASET}/{MISSING}/metrics.json" in inference


@pytest.mark.slow
def test_training_and_scaling_ratios_are_positive_finite(quick_report):
    training = section(quick_report, 2)
    for mode in ("vanilla-12", "t-dht", "s-dht", "f-dht", "p-dht", "q-dht"):
        rows = table_rows(training, mode)
        assert len(rows) == 2, mode  # the ratio table and the share table
        assert re.fullmatch(r"\d+\.\d%", rows[1][4]), rows[1]  # the goal's share, a percentage
    scaling = section(quick_report, 4)
    assert len(table_rows(scaling, "8")) == 2 and len(table_rows(scaling, "16")) == 4  # grid (8,4) (16,4) (16,2)
    for text in (section(quick_report, 1), training, scaling):
        found = ratios(text)
        assert found and all(math.isfinite(x) and x > 0 for x in found)
    assert not re.search(r"\b(nan|inf)\b", quick_report)


@pytest.mark.slow
def test_full_run_names_the_command_for_a_missing_model(project):
    run = load_run()
    with pytest.raises(SystemExit) as err:
        run.main(run_args(project, "--skip-pipeline", "--skip-suite", "--out", str(project / "full.md")))
    message = str(err.value)
    assert f"snakemake --cores 4 results/{DATASET}/{MISSING}/metrics.json --config profile=tiny" in message
    assert not (project / "full.md").exists()


def test_interleaving_pairs_rounds_and_timers_restore_methods():
    load_run()  # puts benchmarks/ on sys.path and imports its modules
    common, inference = sys.modules["_common"], sys.modules["sections.inference"]
    calls: list[str] = []
    seconds = {"ref": [2.0, 4.0, 8.0], "other": [1.0, 2.0, 4.0]}

    def runner(name):
        def go():
            calls.append(name)
            return seconds[name][sum(c == name for c in calls) - 1]
        return go

    timing = common.interleaved({"ref": runner("ref"), "other": runner("other")}, "ref", repeats=2, warmup=1)
    assert calls == ["ref", "other", "other", "ref", "ref", "other"]  # rotated each round
    assert timing.ratios["other"] == [0.5, 0.5] and timing.seconds["ref"] == [4.0, 8.0]

    timers = common.Timers()
    original = Policy.choose_arms
    with common.instrumented(timers, inference.DECISION_TIMERS):
        assert Policy.choose_arms is not original
    assert Policy.choose_arms is original
