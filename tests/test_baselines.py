"""Tests for what the baselines share: the registry (dht.config.KINDS, re-exported by dht.baselines), from which the
names, their ranges, the `baselines:` section and the baseline rule's wildcard follow, and the training loop
(dht.baselines.loop)."""

import copy
import importlib
import re
import textwrap

import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from dht.baselines import KINDS, loop
from dht.config import (
    Baseline,
    BaselinesConfig,
    BaselineValue,
    ConfigError,
    DistilConfig,
    baseline_pattern,
    baselines_model,
    parse_baseline,
    registry,
)
from dht.config_loading import load_config, read_params
from dht.guard import FiniteGuard, NonFiniteError

RAW = read_params(ROOT / "params.yaml")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_has_its_section_a_runner_and_a_loader(kind):
    baseline = KINDS[kind]
    example = f"{kind}-{baseline.value.example}"
    assert parse_baseline(example) == (kind, float(baseline.value.example))
    assert baseline.value.problem(float(baseline.value.example), load_config(ROOT / "params.yaml")) is None
    assert isinstance(getattr(load_config(ROOT / "params.yaml").baselines, baseline.section), baseline.config)
    section = f"baselines.{baseline.section}"
    assert any(k == section or k.startswith(f"{section}.") for k in baseline.params)  # its section, or keys of it
    assert "model" not in baseline.params and "train" not in baseline.params  # read: the keys, not the sections
    module = importlib.import_module(baseline.module)
    assert callable(module.run) and callable(module.load)
    assert baseline.inference.format(value=0.5)  # dht predict's words for it


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    width: int = Field(ge=1)


# A kind the project does not have: its name takes a whole number from 2 up to the model's layer count.
TOY = Baseline("toy-net", BaselineValue("width", "4", integer=True, low=2, high="model.num_hidden_layers"),
               "toy_net", ToyConfig, "dht.baselines.distil", "a toy", "every text runs {value:g} widths",
               starts_from_reference=True)


def test_a_kind_added_to_the_registry_is_named_ranged_and_configured_from_its_entry(monkeypatch):
    """The entry alone makes its names valid (parse_baseline, the baseline rule's pattern), checks their range
    (dht.config_checks) and gives its `baselines:` section; nothing else is edited."""
    raw = copy.deepcopy(RAW)
    raw["run"]["baselines"] = ["toy-net-1", "toy-net-3"]
    with pytest.raises(ValueError, match="'toy-net-3' is not a baseline"):
        parse_baseline("toy-net-3")
    with pytest.raises(ConfigError, match=r"run.baselines\[0\] = \"toy-net-1\": 'toy-net-1' is not a baseline"):
        load_config(ROOT / "params.yaml", raw=raw)

    monkeypatch.setitem(KINDS, TOY.kind, TOY)
    assert parse_baseline("toy-net-3") == ("toy-net", 3.0)
    assert re.fullmatch(baseline_pattern(), "toy-net-3") and not re.fullmatch(baseline_pattern(), "toy-net-0.5")
    with pytest.raises(ValueError, match=r"write distil-<layers> \(e.g. distil-3\), .* or toy-net-<width> "
                                         r"\(e.g. toy-net-4\)$"):
        parse_baseline("toy-net-0.5")  # a whole number only

    # The range: [2, model.num_hidden_layers] (6 in the default profile), from the entry.
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", raw=raw)
    assert str(err.value).endswith("1 problem(s):\n  - run.baselines[0] = 'toy-net-1': out of range; toy-net-<width> "
                                   "takes width in [2, 6] (model.num_hidden_layers = 6)")
    raw["run"]["baselines"] = ["toy-net-3", "toy-net-6"]
    assert load_config(ROOT / "params.yaml", raw=raw).run.baselines == ["toy-net-3", "toy-net-6"]

    # The `baselines:` section: every kind's, each with its model, required (params.yaml states every key).
    section = baselines_model(KINDS)
    assert list(section.model_fields) == [*BaselinesConfig.model_fields, "toy_net"]
    stated = RAW["baselines"]
    assert section(**stated, toy_net={"width": 8}).toy_net == ToyConfig(width=8)
    with pytest.raises(ValidationError, match="toy_net"):
        section(**stated)  # its section left out of params.yaml
    with pytest.raises(ValidationError, match="toy_net.width"):
        section(**stated, toy_net={"width": 0})
    with pytest.raises(ValidationError, match="toy_net.depth"):
        section(**stated, toy_net={"width": 4, "depth": 2})  # unknown keys are errors, as everywhere in params.yaml


def test_the_baseline_rule_takes_the_names_of_a_kind_added_to_the_registry(project):
    """The baseline rule's wildcard constraint is the registry's: a workflow that registers one more kind before
    including the project's Snakefile plans its jobs (with its module as their code), and still refuses a name
    the kind's pattern does not take."""
    (project / "toy.smk").write_text(textwrap.dedent("""\
        from dht.config import KINDS, Baseline, BaselineValue, DistilConfig

        KINDS["toy-net"] = Baseline("toy-net", BaselineValue("width", "4", integer=True, low=2, high=8), "distil",
                                    DistilConfig, "dht.baselines.distil", "a toy", "{value:g}",
                                    starts_from_reference=True)

        include: "Snakefile"
        """))

    def dry_run(name):
        return run_cli(["snakemake", "-s", "toy.smk", "-n", "--cores", "1", f"results/embedded-news/{name}/metrics.json",
                        "--config", "profile=tiny"], cwd=project, check=False)

    planned = dry_run("toy-net-3")
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    out = planned.stdout + planned.stderr
    assert re.search(r"rule baseline:\n(.*\n)*?\s+wildcards: dataset=embedded-news, baseline=toy-net-3", out), out[-3000:]
    assert "dht/baselines/distil.py" in out  # the kind's module is the job's code
    refused = dry_run("toy-net-0.5")
    assert refused.returncode != 0
    assert "No rule to produce results/embedded-news/toy-net-0.5" in refused.stdout + refused.stderr


def test_a_bad_baseline_name_in_params_yaml_says_which_names_there_are(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["run"]["baselines"] = ["distil-3", "distil-three"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_cli(["dht", "config", "validate", "--params", str(tmp_path / "params.yaml")], cwd=tmp_path,
                   check=False)
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "run.baselines" in x)
    assert line.startswith("  - run.baselines[1] = \"distil-three\": 'distil-three' is not a baseline: write "
                           "distil-<layers> (e.g. distil-3), fastbert-<speed> (e.g. fastbert-0.5), ")
    for kind, baseline in KINDS.items():  # every form there is, a registered kind added later too
        assert f"{kind}-<{baseline.value.placeholder}> (e.g. {kind}-{baseline.value.example})" in line


@pytest.mark.parametrize("entry, problem", [
    (dict(kind="Toy"), "baseline kind 'Toy': lower-case words joined by '-'"),
    (dict(kind="toy_net"), "baseline kind 'toy_net'"),
    (dict(kind="toy-"), "baseline kind 'toy-'"),
    (dict(section="toy-net"), "section 'toy-net' is not a params.yaml key"),
])
def test_a_registry_entry_that_would_make_unsafe_names_is_refused(entry, problem):
    fields = {**TOY.__dict__, **entry}
    with pytest.raises(ValueError, match=re.escape(problem)):
        Baseline(**fields)


def test_the_registry_takes_each_kind_once_and_each_section_with_one_model():
    with pytest.raises(ValueError, match="'toy-net' registered twice"):
        registry(TOY, TOY)
    with pytest.raises(ValueError, match="section 'distil' has another kind's model, DistilConfig"):
        registry(KINDS["distil"], Baseline(**{**TOY.__dict__, "section": "distil"}))
    assert registry(KINDS["distil"], Baseline(**{**TOY.__dict__, "section": "distil", "config": DistilConfig}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["distil", "fastbert", "nas-prune"])  # flexibert: its search's own stage first
def test_what_a_kind_runs_is_what_its_load_reads_back(baseline_job, kind):
    """The contract of a kind's module (docs/baselines.md, "Adding a baseline"): ``run`` trains and writes the
    baseline, ``load`` reads the directory back to the same model, whose predictions are the run's."""
    from dht.baselines import LoadJob

    value = float(KINDS[kind].value.example)
    built = importlib.import_module(KINDS[kind].module).run(value, baseline_job)
    assert built.train_flops > 0 and len(built.history) >= 1
    teacher = baseline_job.teacher if KINDS[kind].runs_on_teacher else None
    loaded = importlib.import_module(KINDS[kind].module).load(
        LoadJob(baseline_job.out_model, baseline_job.device, value, "retrain it", teacher))
    assert (loaded.vocab_size, loaded.num_labels) == (60, 3)
    batch = baseline_job.cfg.train.eval_batch_size  # the run's batches: the same sums, in the same order
    ran, read = built.predict(baseline_job.val), loaded.predict(baseline_job.val, batch, baseline_job.seq_len)
    assert torch.equal(ran.labels, read.labels) and torch.equal(ran.layers, read.layers)
    torch.testing.assert_close(ran.probs, read.probs)


def _model_and_data():
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), lambda index: ((model(x[index]) - y[index]) ** 2).mean()


def test_train_stops_after_max_steps_within_an_epoch_and_draws_one_order_per_epoch():
    model, opt, loss_of = _model_and_data()
    gen = torch.Generator().manual_seed(3)
    history = loop.train(model, opt, loss_of, 10, epochs=3, batch_size=4, generator=gen,
                         guard=FiniteGuard("test", "nothing"), max_steps=5)
    assert [epoch.sizes for epoch in history] == [[4, 4, 2], [4, 4]]
    expected = torch.Generator().manual_seed(3)
    for _ in range(2):  # two epochs began, so two orders were drawn, and no third
        torch.randperm(10, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())
    first = history[0]
    by_hand = (first.losses[0] * 4 + first.losses[1] * 4 + first.losses[2] * 2) / 10
    assert first.sample_mean() == pytest.approx(by_hand, rel=1e-12)
    assert first.mean() == pytest.approx(sum(first.losses) / 3, rel=1e-12)


def test_update_names_the_epoch_only_when_given():
    model, opt, loss_of = _model_and_data()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    guard = FiniteGuard("test", "nothing")
    with pytest.raises(NonFiniteError, match=r"at epoch 2, step 7;"):
        loop.update(loss_of(torch.arange(4)), opt, guard, 7, 2, model=model)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 7;"):
        loop.update(loss_of(torch.arange(4)), opt, guard, 7, model=model)
