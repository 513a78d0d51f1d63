"""dht.modes.<mode>.init: reference (docs/training.md T30): a DHT mode starts from the trained run.reference of the
same dataset and seed, as the baselines do; its training counts in the mode's total."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, two_epoch_tiny
from pydantic import ValidationError
from test_pipeline import job_counts, set_params
from test_trainer import SEQ, make_cfg, setup  # noqa: F401 (setup is a fixture)

from dht.config import Config, run_param_keys
from dht.config_checks import check_semantics
from dht.integrity import write_manifest
from dht.policy import Policy, predict
from dht.results import training_metrics
from dht.trainer import Progress, TrainingError, fingerprint, initial_model, run_params, save_trained

DATASET = "embedded-news"


def with_init(cfg: Config, mode: str = "t-dht", init: str = "reference", **edits) -> Config:
    raw = cfg.model_dump(mode="json")
    raw["dht"]["modes"][mode]["init"] = init
    for section, values in edits.items():
        raw[section].update(values)
    return Config.model_validate(raw)


# ---- the configuration ---------------------------------------------------------------------------------------


def test_it_needs_another_mode_that_the_profile_trains():
    cfg = make_cfg()  # tiny: run.reference vanilla-12, in run.models
    assert not check_semantics(with_init(cfg))
    problems = check_semantics(with_init(cfg, "vanilla-12"))
    assert any("dht.modes.vanilla-12.init = 'reference': vanilla-12 is run.reference itself" in p for p in problems)
    without = with_init(cfg, run={"models": ["t-dht", "vanilla-3"], "baselines": []})
    assert any("dht.modes.t-dht.init = 'reference': the run starts from the trained reference 'vanilla-12', which "
               "run.models does not train" in p for p in check_semantics(without))
    raw = cfg.model_dump(mode="json")
    raw["dht"]["modes"]["t-dht"]["init"] = "fine-tuned"
    with pytest.raises(ValidationError, match="init"):
        Config.model_validate(raw)


def test_the_checkpoint_fingerprint_and_mlflow_params_name_the_start():
    cfg, meta = make_cfg(), {"data": 1}
    ref = with_init(cfg)
    assert "run.reference" in run_param_keys(ref, "t-dht") and "run.reference" not in run_param_keys(cfg, "t-dht")
    params = run_params(ref, "t-dht")
    assert params["mode"]["init"] == "reference" and params["reference_mode"]["arms"] == ["12L12H"]
    assert params["model.exit_heads"] == "shared"
    assert run_params(cfg, "vanilla-12")["mode"]["arms"] == ["12L12H"]  # the reference's own run: its `mode`
    assert fingerprint(ref, "t-dht", DATASET, meta) != fingerprint(cfg, "t-dht", DATASET, meta)
    per_depth = cfg.model_dump(mode="json")
    per_depth["model"]["exit_heads"] = "per_depth"
    assert fingerprint(Config.model_validate(per_depth), "t-dht", DATASET, meta) != fingerprint(cfg, "t-dht", DATASET, meta)


# ---- where the run starts ------------------------------------------------------------------------------------


@pytest.fixture
def saved(setup, tmp_path, monkeypatch):  # noqa: F811
    """The pipeline's layout below tmp_path (the working directory): the arm_features stage's initial model and
    a 'trained' reference (the initial model with changed weights) with its dht_policy.json, checksums and
    metrics.json."""
    monkeypatch.chdir(tmp_path)
    model, feats, _, _ = setup
    cfg = make_cfg()
    init_dir = tmp_path / "data/features" / DATASET / "init_model"
    model.save_pretrained(init_dir)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01)
    ref_dir = Path("models") / DATASET / "vanilla-12"
    save_trained(ref_dir, reference, Policy(cfg, cfg.dht.modes["vanilla-12"], feats, reference.config), "vanilla-12",
                 cfg, {"dataset": DATASET})
    write_manifest(ref_dir)
    metrics = Path("results") / DATASET / "vanilla-12" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"train_flop_ratio": 1.0, "start_flop_ratio": 0.0, "train_flop_ratio_total": 1.0,
                                   "epochs_own": 2, "epochs_total": 2, "accuracy": 0.5}))
    return init_dir, ref_dir, reference


def equal_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items() if k in sb)


@pytest.mark.parametrize("exit_heads", ["shared", "per_depth"])
def test_a_mode_starts_from_the_references_weights(saved, setup, exit_heads):  # noqa: F811
    init_dir, ref_dir, reference = saved
    base = make_cfg()
    raw = with_init(base).model_dump(mode="json")
    raw["model"]["exit_heads"] = exit_heads
    cfg = Config.model_validate(raw)
    model, start = initial_model(cfg, "t-dht", DATASET, init_dir)
    assert start.model_dir == ref_dir and start.metrics["train_flop_ratio"] == 1.0 and len(start.digest) == 64
    assert equal_weights(reference, model) and not equal_weights(setup[0], model)
    assert model.config.exit_heads == exit_heads
    if exit_heads == "per_depth":  # the reference trained its full-depth head alone: every exit starts from it
        assert sorted(model.exit_heads) == ["3", "6", "9"]
        for head in model.exit_heads.values():
            assert torch.equal(head.classifier.weight, reference.classifier.weight)
            assert torch.equal(head.pooler.dense.bias, reference.bert.pooler.dense.bias)
    # the same mode with init: pretrained starts from the initial model
    pretrained, none = initial_model(base, "t-dht", DATASET, init_dir)
    assert none is None and equal_weights(setup[0], pretrained)


def test_a_missing_foreign_damaged_or_other_architecture_reference_is_refused(saved, setup):  # noqa: F811
    init_dir, ref_dir, reference = saved
    cfg = with_init(make_cfg())
    seeded = with_init(make_cfg(), run={"training_seeds": [0, 1]}).for_training_seed(1)
    with pytest.raises(TrainingError, match=r"needs the trained reference 'vanilla-12', but "
                       r"models/embedded-news/vanilla-12/seed-1/dht_policy.json is missing; train it first: "
                       r"snakemake --cores 4 results/embedded-news/vanilla-12/seed-1/metrics.json"):
        initial_model(seeded, "t-dht", DATASET, init_dir)  # with several run.training_seeds: the same seed's reference
    policy_file = ref_dir / "dht_policy.json"
    original = policy_file.read_bytes()
    policy_file.write_text(json.dumps({**json.loads(original), "mode_name": "vanilla-3"}))
    with pytest.raises(TrainingError, match="not the trained reference 'vanilla-12' of embedded-news .* names "
                                            "'vanilla-3'"):
        initial_model(cfg, "t-dht", DATASET, init_dir)
    policy_file.write_bytes(original)
    weights = ref_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(TrainingError, match="model.safetensors: checksum mismatch .* retrain it: snakemake --cores 4 "
                                            "--force results/embedded-news/vanilla-12/metrics.json"):
        initial_model(cfg, "t-dht", DATASET, init_dir)
    # a reference of another architecture (here: other labels) than the initial model
    other = copy.deepcopy(reference)
    other.config.num_labels = 5
    other.classifier = torch.nn.Linear(other.config.hidden_size, 5)
    other.save_pretrained(ref_dir)
    write_manifest(ref_dir)
    with pytest.raises(TrainingError, match=r"the reference's architecture is not the initial model's \(num_labels 5 "
                                            r"\(initial model: 3\)\), so dht.modes.t-dht cannot start from it"):
        initial_model(cfg, "t-dht", DATASET, init_dir)


def test_its_metrics_count_the_references_training(setup):  # noqa: F811
    model, feats, _, test = setup
    cfg = make_cfg()
    policy = Policy(cfg, cfg.dht.modes["vanilla-3"], feats, model.config)
    pred = predict(model, policy, test, torch.device("cpu"), 16, SEQ)
    progress = Progress(train_flops=3.0, reference_flops=4.0, seconds=1.0)
    meta = {"max_length": SEQ, "difficulty_names": ["easy", "medium", "hard"]}
    own = training_metrics(cfg, pred, test, model.config, meta, progress)
    # from the initial model: the budget is its own (dht.results.training_budget), the same keys in every file
    assert (own["start_flop_ratio"], own["train_flop_ratio_total"], own["train_flop_ratio"]) == (0.0, 0.75, 0.75)
    assert own["epochs_own"] == own["epochs_total"] == cfg.train.epochs
    started = training_metrics(cfg, pred, test, model.config, meta, progress,
                               {"train_flop_ratio": 1.012345, "train_flop_ratio_total": 1.012345, "epochs_total": 3})
    assert started == {**own, "start_flop_ratio": 1.012345, "train_flop_ratio_total": round(1.012345 + 0.75, 6),
                       "epochs_own": cfg.train.epochs, "epochs_total": 3 + cfg.train.epochs}


# ---- through Snakemake ---------------------------------------------------------------------------------------


def test_the_train_job_depends_on_the_same_seeds_reference(project):
    def edit(raw):
        tiny = raw["profiles"]["tiny"]
        tiny["run"].update({"datasets": [DATASET], "models": ["vanilla-12", "t-dht"], "baselines": [],
                            "control": None, "training_seeds": [0, 1]})
        tiny["dht"]["modes"]["t-dht"] = {"init": "reference"}
    set_params(project, edit)
    target = f"results/{DATASET}/t-dht/seed-1/metrics.json"
    dry = run_cli(["snakemake", "-n", "--cores", "1", target, "--config", "profile=tiny"], cwd=project).stdout
    assert job_counts(dry)["train"] == 2
    assert f"results/{DATASET}/vanilla-12/seed-1/metrics.json" in dry and "seed-0" not in dry


@pytest.mark.slow
def test_a_mode_with_init_reference_trains_after_and_loads_the_reference(tiny_project):
    """The train job of t-dht with init: reference runs the reference's first, starts from its weights (a damaged
    reference stops it) and writes the reference's training as its start."""
    project = tiny_project

    def edit(raw):
        tiny = two_epoch_tiny(raw)["profiles"]["tiny"]
        tiny["dht"]["modes"]["t-dht"] = {"init": "reference"}
        tiny["model"]["exit_heads"] = "per_depth"
    set_params(project, edit)
    target = f"results/{DATASET}/t-dht/metrics.json"
    out = run_cli(["snakemake", "--cores", "1", target, "--config", "profile=tiny"], cwd=project)
    text = out.stdout + out.stderr
    assert job_counts(text)["train"] == 2
    assert f"train {DATASET}/t-dht: starting from the trained reference in models/{DATASET}/vanilla-12" in text
    reference = json.loads((project / f"results/{DATASET}/vanilla-12/metrics.json").read_text())
    metrics = json.loads((project / target).read_text())
    assert metrics["start_flop_ratio"] == reference["train_flop_ratio"]
    assert metrics["train_flop_ratio_total"] == pytest.approx(reference["train_flop_ratio"] + metrics["train_flop_ratio"],
                                                              abs=2e-6)
    assert (metrics["epochs_own"], metrics["epochs_total"]) == (2, 4)
    assert json.loads((project / f"models/{DATASET}/t-dht/config.json").read_text())["exit_heads"] == "per_depth"

    # the job reads the reference's weights: damaged, they stop it with the checksum error
    weights = project / f"models/{DATASET}/vanilla-12/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    failed = run_cli(["snakemake", "--cores", "1", target, "--force", "--config", "profile=tiny"], cwd=project,
                     check=False)
    assert failed.returncode != 0
    log = (project / f"logs/train/{DATASET}/t-dht.log").read_text()
    assert f"error: models/{DATASET}/vanilla-12/model.safetensors: checksum mismatch" in log
