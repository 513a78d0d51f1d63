"""What is wrong with a profile: one message per problem, each ``<key> = <value>: <what is wrong>;
<what is allowed>``, so that a user can fix params.yaml without reading code.

After validation, :func:`check_semantics` checks a :class:`~dht.config.Config` against the rules the paper
imposes (Section 6.1: ``(L - b)`` must be a multiple of ``c``; heads must divide the hidden size; ...) and the
pipeline's own (reference and control modes, baselines, pretrained packages), and :func:`dataset_path_problems`
looks for the csv datasets' files. Before it, :func:`booleans_for_numbers` finds a YAML yes/no given for a
number, and :func:`format_validation_error` words pydantic's errors the same way.
:func:`dht.config_loading.load_config` runs them all.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from dht.arms import Arm, parse_arm
from dht.config import (
    KINDS,
    MODE_BANDIT_KEYS,
    Config,
    CsvDatasetSpec,
    EmbeddedDatasetSpec,
    ModeSpec,
    PoolingConfig,
    parse_baseline,
)

# --- after validation: the rules across fields --------------------------------------------------------------


def check_semantics(cfg: Config) -> list[str]:
    """Cross-field rules of the paper and of the pipeline; returns one message per problem."""
    problems: list[str] = []
    m, d = cfg.model, cfg.dht
    b, c = d.fixed_layers, d.group_size

    if m.hidden_size % m.num_attention_heads:
        divisors = [h for h in range(1, m.hidden_size + 1) if m.hidden_size % h == 0 and h <= 64]
        problems.append(
            f"model.num_attention_heads = {m.num_attention_heads}: must divide model.hidden_size = "
            f"{m.hidden_size}; allowed: {', '.join(map(str, divisors))} (or change hidden_size)"
        )
    if b > m.num_hidden_layers:
        problems.append(
            f"dht.fixed_layers = {b}: b cannot exceed model.num_hidden_layers = {m.num_hidden_layers}"
        )
    for bandit, pool in cfg.dht.features:
        if not isinstance(pool, PoolingConfig):
            continue
        bad = [h for h in pool.hidden_splits if m.hidden_size % h]
        if bad:
            problems.append(
                f"dht.features.{bandit}.hidden_splits = {pool.hidden_splits}: {', '.join(map(str, bad))} do not "
                f"divide model.hidden_size = {m.hidden_size}; use divisors of the hidden size"
            )
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", cfg.device):
        problems.append(f"device = {cfg.device!r}: allowed: auto, cpu, cuda, cuda:N, mps")
    distributed = cfg.train.distributed
    if distributed.nproc_per_node > 1:
        if cfg.device not in ("auto", "cpu", "cuda"):
            problems.append(
                f"device = {cfg.device!r}: train.distributed.nproc_per_node = {distributed.nproc_per_node} gives each "
                "process its own device (cuda:<local rank>); use auto, cuda or cpu"
            )
        if cfg.device == "cpu" and distributed.backend == "nccl":
            problems.append("train.distributed.backend = 'nccl' needs CUDA GPUs, but device = 'cpu'; use gloo")
        if distributed.batch == "split" and cfg.train.batch_size % distributed.nproc_per_node:
            n = distributed.nproc_per_node
            problems.append(
                f"train.distributed.batch = 'split' gives each of the {n} ranks train.batch_size / {n} samples a step, "
                f"but train.batch_size = {cfg.train.batch_size} is not divisible by nproc_per_node = {n}; use a "
                f"multiple of {n} (e.g. {cfg.train.batch_size // n * n or n}) or batch: per_rank"
            )

    for name in cfg.run.datasets:
        if name not in cfg.datasets:
            problems.append(
                f"run.datasets: {name!r} is not a dataset; allowed (defined under datasets:): "
                f"{', '.join(cfg.datasets)}"
            )
        elif cfg.datasets[name].max_length > m.max_position_embeddings:
            problems.append(
                f"datasets.{name}.max_length = {cfg.datasets[name].max_length}: exceeds "
                f"model.max_position_embeddings = {m.max_position_embeddings}; lower max_length or raise "
                "max_position_embeddings"
            )
    for name in cfg.run.models:
        if name not in d.modes:
            problems.append(
                f"run.models: {name!r} is not a mode; allowed (defined under dht.modes:): {', '.join(d.modes)}"
            )

    for i, name in enumerate(cfg.run.baselines):
        kind, value = parse_baseline(name)  # a baseline's name: validated by its type (dht.config.BaselineName)
        wrong = KINDS[kind].value.problem(value, cfg)  # the range its registry entry gives
        if wrong:
            problems.append(f"run.baselines[{i}] = {name!r}: out of range; {kind}-<{KINDS[kind].value.placeholder}> "
                            f"takes {wrong}")
    fx = cfg.baselines.flexibert
    if any(n.startswith("flexibert-") for n in cfg.run.baselines) and cfg.data.val_fraction == 0:
        problems.append(
            "data.val_fraction = 0: the FlexiBERT search of run.baselines scores its queries on the validation "
            "split, and 0 holds none out; set a fraction (e.g. 0.1) or drop the flexibert-<ratio> baselines"
        )
    problems += _validation_split_problems(cfg)
    if any(n.startswith("flexibert-") for n in cfg.run.baselines):
        if not any(h % n == 0 for h in fx.hidden for n in fx.heads):
            problems.append(f"baselines.flexibert.heads = {fx.heads}: none divides a hidden size in {fx.hidden}")
        if fx.n_init > fx.evaluations:
            problems.append(f"baselines.flexibert.n_init = {fx.n_init}: at most evaluations = {fx.evaluations}")
    problems += _check_reference(cfg)
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.name_or_path:
        problems.append(
            "tokenizer.name_or_path = null: tokenizer.kind = pretrained needs a hub name, a local directory "
            "(e.g. bert-base-uncased) or package:NAME"
        )
    problems += _pretrained_package_problems(cfg)

    allowed_l = allowed_layer_counts(cfg)
    layer_rule = (
        f"(L - b) must be a multiple of c; with b = {b}, c = {c} and {m.num_hidden_layers} layers the allowed "
        f"layer counts are {', '.join(map(str, allowed_l)) or 'none'}"
    )
    in_use = modes_in_use(cfg)
    for mode_name, mode in d.modes.items():
        if mode_name not in in_use:
            continue  # a profile may keep modes of another model shape (the paper's 12-layer arms) that it never runs
        key = f"dht.modes.{mode_name}"
        bad_heads: set[int] = {h for h in mode.heads or [] if not 1 <= h <= m.num_attention_heads}
        if mode.search == "sequential":
            problems += _sequential_problems(cfg, key, mode, allowed_l)
        elif ((mode.exit_weights, mode.distil_weight, mode.continue_reward, mode.prices)
              != ("uniform", 0.0, "next", None)):
            problems.append(
                f"{key}: exit_weights, distil_weight, continue_reward and prices are read by search: sequential only "
                f"(docs/training.md T31); this mode's search is {mode.search}: remove them")
        if mode.depth_feedback == "all_depths" and mode.search not in ("tree", "sequential"):
            problems.append(
                f"{key}.depth_feedback = 'all_depths': needs search: tree (UCB_L's options are depths; an "
                f"integrated mode's arms are (L, H) plans, one pass each); use `chosen` for a {mode.search} mode")
        own = [k for k in MODE_BANDIT_KEYS if getattr(mode, k) is not None]
        if own and mode.depth_feedback != "all_depths":
            problems.append(
                f"{key}: {', '.join(own)} set, but they act only with depth_feedback: all_depths (T24), which this "
                "mode does not use; set depth_feedback: all_depths or remove them")
        if mode.init == "reference":
            problems += _init_reference_problems(cfg, mode_name)
        if mode.search == "sequential":
            pass  # checked above
        elif mode.search == "tree":
            if not mode.layers or not mode.heads:
                problems.append(f"{key}: search = tree needs both `layers` (UCB_L) and `heads` (UCB_H) lists")
            if mode.arms:
                problems.append(f"{key}.arms: search = tree takes `layers` and `heads`, not `arms`")
            for i, layers in enumerate(mode.layers or []):
                if layers not in allowed_l:
                    problems.append(f"{key}.layers[{i}] = {layers}: {layer_rule}")
        else:
            if not mode.arms:
                problems.append(f"{key}: search = {mode.search} needs an `arms` list (e.g. [6L8H, 12L12H])")
            if mode.layers or mode.heads:
                problems.append(f"{key}: search = {mode.search} takes `arms`, not `layers`/`heads`")
            if mode.search == "fixed" and mode.arms and len(mode.arms) != 1:
                problems.append(f"{key}.arms = {mode.arms}: search = fixed takes exactly one arm")
            for i, text in enumerate(mode.arms or []):
                try:
                    arm = parse_arm(text)
                except ValueError as err:
                    problems.append(f"{key}.arms[{i}] = {text!r}: {err}")
                    continue
                if arm.num_layers not in allowed_l:
                    problems.append(f"{key}.arms[{i}] = {text!r}: has L = {arm.num_layers} layers; {layer_rule}")
                bad_heads |= {h for _, h in arm.segments if not 1 <= h <= m.num_attention_heads}
            problems += _same_plan_arms(key, mode.arms or [], b, m.num_attention_heads)
        if bad_heads:
            problems.append(
                f"{key}: head counts {', '.join(map(str, sorted(bad_heads)))} are outside 1.."
                f"{m.num_attention_heads} (model.num_attention_heads)"
            )
        if mode.warmup_mode is not None:
            if mode.warmup_mode not in d.modes or mode.warmup_mode == mode_name:
                problems.append(
                    f"{key}.warmup_mode = {mode.warmup_mode!r}: must name another mode; allowed: "
                    f"{', '.join(n for n in d.modes if n != mode_name)}"
                )
            if mode.warmup_epochs >= cfg.train.epochs and mode_name in cfg.run.models:
                problems.append(
                    f"{key}.warmup_epochs = {mode.warmup_epochs}: must be fewer than train.epochs = "
                    f"{cfg.train.epochs}, or the mode never leaves its warm-up"
                )
    return problems


def _init_reference_problems(cfg: Config, mode_name: str) -> list[str]:
    """``init: reference`` (docs/training.md T30): the mode starts from the trained run.reference, so that must be
    another mode, and one the profile trains (the train job depends on it)."""
    key, ref = f"dht.modes.{mode_name}.init = 'reference'", cfg.run.reference
    if mode_name == ref:
        return [f"{key}: {mode_name} is run.reference itself, which cannot start from its own training; use "
                "`pretrained` for the reference"]
    if ref not in cfg.run.models:
        return [f"{key}: the run starts from the trained reference {ref!r}, which run.models does not train "
                f"(run.models: {', '.join(cfg.run.models)}); add {ref} to run.models or use `pretrained`"]
    return []


def _validation_split_problems(cfg: Config) -> list[str]:
    """An embedded dataset whose validation split (data.val_fraction x n_train generated samples) would miss a
    class: known before any job runs (a csv or hub dataset's size only once the data stage reads it, which then
    says so)."""
    problems = []
    for name in cfg.run.datasets:
        spec = cfg.datasets.get(name)
        if not isinstance(spec, EmbeddedDatasetSpec) or cfg.data.val_fraction == 0:
            continue
        n_val = cfg.data.val_rows(spec.n_train)
        if n_val < spec.num_classes:
            problems.append(
                f"datasets.{name}.n_train = {spec.n_train}: data.val_fraction = {cfg.data.val_fraction} gives a "
                f"validation split of {n_val} samples, fewer than the {spec.num_classes} classes; raise n_train or "
                "data.val_fraction"
            )
    return problems


def allowed_layer_counts(cfg: Config) -> list[int]:
    b, c, n = cfg.dht.fixed_layers, cfg.dht.group_size, cfg.model.num_hidden_layers
    return [layers for layers in range(max(b, 1), n + 1) if (layers - b) % c == 0]


def modes_in_use(cfg: Config) -> set[str]:
    """The modes a profile runs: run.models, the warm-up modes they start with, and the reference and control.
    Only these are checked against the model's shape."""
    used = set(cfg.run.models)
    for name in (cfg.run.reference, cfg.run.control):
        if name:
            used.add(name)
    for name in list(used):
        mode = cfg.dht.modes.get(name)
        if mode is not None and mode.warmup_mode:
            used.add(mode.warmup_mode)
    return used


def _same_plan_arms(key: str, arms: list[str], b: int, num_heads: int) -> list[str]:
    """One message per group of arms that run the same per-layer plan (they would be one arm under several
    names: the bandit splits its updates between them, and the reward's H of the ones written with fewer heads
    in the first b layers is not the H they run)."""
    runs: dict[Arm, list[Arm]] = {}
    for text in arms:
        with contextlib.suppress(ValueError):  # unparsable arms have their own message
            arm = parse_arm(text)
            runs.setdefault(arm.runs_as(b, num_heads), []).append(arm)
    problems = []
    for plan, same in runs.items():
        if len(same) < 2:
            continue
        k = next((i for i, a in enumerate(same) if a.heads_per_layer() == plan.heads_per_layer()), 0)
        keep, drop = same[k], [str(a) for i, a in enumerate(same) if i != k]
        problems.append(
            f"{key}.arms: {', '.join(map(str, same))} all run {plan} (the first b = {b} layers always keep all "
            f"{num_heads} heads), so they are one arm under {len(same)} names; keep {keep} and drop "
            f"{', '.join(drop)}, or make them differ after layer {b}"
        )
    return problems


def _check_reference(cfg: Config) -> list[str]:
    """run.reference: a fixed mode running all N_L layers with all heads (the 1.00x of the FLOP ratios and the
    baselines' teacher; in run.models when baselines are run); run.control, when set: a fixed mode."""
    problems: list[str] = []
    m, modes, ref = cfg.model, cfg.dht.modes, cfg.run.reference
    fixed = [n for n, mode in modes.items() if mode.search == "fixed"]
    full = f"{m.num_hidden_layers}L{m.num_attention_heads}H"
    if ref not in modes or modes[ref].search != "fixed":
        problems.append(
            f"run.reference = {ref!r}: must be a fixed mode of dht.modes (search: fixed, arms: [{full}]); "
            f"fixed modes: {', '.join(fixed) or 'none'}"
        )
    else:
        try:
            arm = parse_arm((modes[ref].arms or [""])[0])
        except ValueError:
            arm = None  # reported with the mode's own arms
        if arm is not None and arm.heads_per_layer() != [m.num_attention_heads] * m.num_hidden_layers:
            problems.append(
                f"run.reference = {ref!r}: its arm {arm} must run every layer with every head ({full}, "
                f"model.num_hidden_layers x model.num_attention_heads): it is the 1.00x of every FLOP ratio"
            )
    if cfg.run.baselines and ref not in cfg.run.models:
        problems.append(
            f"run.reference = {ref!r}: the baselines are built from the trained reference, so run.models must "
            f"include it (run.models: {', '.join(cfg.run.models)})"
        )
    control = cfg.run.control
    if control is not None and (control not in modes or modes[control].search != "fixed"):
        problems.append(
            f"run.control = {control!r}: must be a fixed mode of dht.modes (e.g. {cfg.dht.fixed_layers}L"
            f"{m.num_attention_heads}H), or null; fixed modes: {', '.join(fixed) or 'none'}"
        )
    return problems


# The checkpoint's architecture wins over `model:` (model_from_params), but the arms, the layer rule and the
# feature splits above are checked against `model:`; so for a package, whose config.json is at hand, they must agree.
_CHECKPOINT_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _pretrained_package_problems(cfg: Config) -> list[str]:
    """``package:NAME`` values (dht/pretrained.py): a known, importable package whose architecture is `model:`'s,
    used with its own tokenizer. The weights' checksum is not computed here (0.3 s a profile, at every job's
    config load); it is verified when the model or tokenizer is loaded."""
    from dht import pretrained

    problems: list[str] = []
    m, tok = cfg.model, cfg.tokenizer
    usable: dict[str, bool] = {}
    refs = [("model.init", m.init)]
    if tok.kind == "pretrained":
        refs.append(("tokenizer.name_or_path", tok.name_or_path))
    for key, value in refs:
        if not pretrained.is_package_ref(value):
            continue
        try:
            pretrained.package_dir(value)
            usable[key] = True
        except pretrained.PretrainedPackageError as err:
            problems.append(f"{key} = {err}")
            usable[key] = False
    if not usable.get("model.init"):
        return problems
    entry = pretrained.lookup(m.init)
    own_tokenizer = (
        tok.kind == "pretrained"
        and pretrained.is_package_ref(tok.name_or_path)
        and (not usable["tokenizer.name_or_path"] or pretrained.lookup(tok.name_or_path) == entry)
    )  # an unusable tokenizer package is reported above already
    if not own_tokenizer:
        problems.append(
            f"tokenizer.name_or_path = {tok.name_or_path!r} (kind: {tok.kind}): model.init = {m.init!r} needs its "
            "own tokenizer, since token ids index its embeddings; set tokenizer.kind: pretrained and "
            f"tokenizer.name_or_path: {m.init}"
        )
    try:
        ckpt = pretrained.checkpoint_config(m.init)
    except pretrained.PretrainedPackageError as err:
        return [*problems, f"model.init = {err}"]
    for field in _CHECKPOINT_SIZES:
        if getattr(m, field) != ckpt.get(field):
            problems.append(
                f"model.{field} = {getattr(m, field)}: model.init = {m.init!r} has {ckpt.get(field)}; set "
                f"model.{field}: {ckpt.get(field)} (the checkpoint's architecture is what runs, and the arms and "
                "feature splits are checked against model:)"
            )
    limit = ckpt.get("max_position_embeddings")
    if isinstance(limit, int) and m.max_position_embeddings > limit:
        problems.append(
            f"model.max_position_embeddings = {m.max_position_embeddings}: model.init = {m.init!r} has {limit} "
            f"positions; allowed: at most {limit}"
        )
    return problems


def dataset_path_problems(cfg: Config, params_dir: str | Path = ".") -> list[str]:
    """A `csv` dataset the profile runs must be there (relative paths from ``params_dir``, the folder of the
    params file: :meth:`~dht.config.CsvDatasetSpec.folder`): checked with every other parameter, not in its
    first job."""
    problems = []
    for name in cfg.run.datasets:
        spec = cfg.datasets.get(name)
        if not isinstance(spec, CsvDatasetSpec):
            continue
        directory = spec.folder(params_dir)
        if not directory.is_dir():
            problems.append(f"datasets.{name}.path = {spec.path!r}: no such directory; point it at the folder that "
                            f"holds train.csv and test.csv (looked for {directory}: a relative path starts at the "
                            "folder of params.yaml)")
            continue
        missing = [f for f in ("train.csv", "test.csv") if not (directory / f).is_file()]
        if missing:
            problems.append(f"datasets.{name}.path = {spec.path!r}: no {' and no '.join(missing)} in it; a csv "
                            "dataset is a folder with train.csv and test.csv (and optionally classes.txt)")
    return problems


# --- before validation: yes/no for a number, pydantic's errors rephrased ------------------------------------


def booleans_for_numbers(model: type[BaseModel], data: Any, prefix: str = "") -> list[str]:
    """Keys given a boolean where a number is needed. YAML 1.1 reads yes/no/on/off (and true/false) as
    booleans, which pydantic would take as 1 and 0: `checkpoint_every: yes` would checkpoint every step."""
    if not isinstance(data, Mapping):
        return []
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(str(key))
        if field is None:
            continue  # unknown keys are the validation's to report
        name = f"{prefix}{key}"
        items = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, bool) for v in items) and _wants_number(field.annotation):
            problems.append(f"{name} = {json.dumps(value)}: a number is needed, not a yes/no (YAML reads yes, no, "
                            "on, off, true and false as booleans)")
        elif isinstance(value, Mapping):
            annotation = field.annotation
            if get_origin(annotation) is dict:  # name -> model (datasets, dht.modes)
                inner = _models_in(get_args(annotation)[1])
                for sub, sub_value in value.items():
                    problems += booleans_for_numbers(_pick(inner, sub_value), sub_value, f"{name}.{sub}.")
            elif _models_in(annotation):
                problems += booleans_for_numbers(_pick(_models_in(annotation), value), value, f"{name}.")
    return problems


def _wants_number(annotation: Any) -> bool:
    """Whether a field takes an int or a float (alone, optional, or as the items of a list or tuple)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Annotated:
        return _wants_number(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType, list, tuple):
        args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
        return bool(args) and bool not in args and all(_wants_number(a) for a in args)
    return False


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's value may be (through Annotated, unions and optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Annotated, Union, UnionType):
        args = get_args(annotation)[:1] if get_origin(annotation) is Annotated else get_args(annotation)
        return [m for a in args for m in _models_in(a)]
    return []


def _pick(models: list[type[BaseModel]], value: Any) -> type[BaseModel]:
    """The model of a discriminated union (by `source`) that `value` is; the first when it says nothing."""
    if not models:
        return BaseModel
    source = value.get("source") if isinstance(value, Mapping) else None
    for m in models:
        if "source" in m.model_fields and source in get_args(m.model_fields["source"].annotation):
            return m
    return models[0]


def format_validation_error(where: str, err: ValidationError, data: Mapping[str, Any],
                            also: list[str] | None = None) -> str:
    """pydantic's validation errors as ``<key> = <value>: <what is wrong>`` lines (`also`: problems found before)."""
    lines = list(also or [])
    for e in err.errors():
        # Drop pydantic's discriminated-union tags ('embedded', 'hub', ...) from the key path; list positions as [i].
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p in ("embedded", "hub", "csv"))]
        is_key = bool(loc) and loc[-1] == "[key]"  # a mapping's key failed (a dataset or mode name): its parent's
        if is_key:
            loc = loc[:-2]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
        loc = [str(p) for p in loc]
        message = e["msg"].removeprefix("Value error, ")  # our validators' ValueErrors read as written
        if is_key:
            lines.append(f"{key}: key {json.dumps(e.get('input'))}: {message}")
        elif e["type"] == "extra_forbidden":
            parent = _lookup_model(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent is not None else "see params.yaml"
            lines.append(f"{key}: unknown key; allowed here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required but missing; {_where_to_state(loc)}")
        elif e["type"] == "union_tag_invalid":
            given = e["input"].get("source") if isinstance(e["input"], Mapping) else e["input"]
            lines.append(f"{key}.source = {given!r}: unknown source; allowed: embedded, hub, csv")
        else:
            value = json.dumps(e.get("input"), default=str)
            lines.append(f"{key} = {value}: {message}")
    return f"{where} has {len(lines)} problem(s):\n" + "\n".join(f"  - {line}" for line in lines)


def _where_to_state(loc: list[str]) -> str:
    """Where a missing key goes: params.yaml states every key (dht/config.py has no defaults), a dataset's or a
    mode's in its entry or in its collection's defaults."""
    if len(loc) == 3 and loc[0] == "datasets":
        return ("state it in the entry, or for every dataset of its source in dataset_defaults (params.yaml's "
                "default profile has each key with its comment)")
    if len(loc) == 4 and loc[:2] == ["dht", "modes"]:
        return "state it in the mode, or for every mode in dht.mode_defaults (params.yaml has each with its comment)"
    return "params.yaml states every key: copy it, with its comment, from the default profile (the file's top level)"


def _lookup_model(loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model at a key path, to list the keys allowed there."""
    model: Any = Config
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            # Inside a dict[str, Model]: the key is a name, the model is the dict's value type.
            return model if model is not Config else None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = args[1] if getattr(ann, "__origin__", None) is dict and args else ann
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def _sequential_problems(cfg: Config, key: str, mode: ModeSpec, allowed_l: list[int]) -> list[str]:
    """search: sequential (docs/training.md T31): stop or continue at every group boundary up to its deepest depth,
    full-information priced rewards (depth_feedback: all_depths, all_depths_reward: difference) and every exit on
    the path trained (exit_loss: path)."""
    b, c = cfg.dht.fixed_layers, cfg.dht.group_size
    problems = []
    layers = list(mode.layers or [])
    if not layers or not mode.heads:
        problems.append(f"{key}: search = sequential needs `layers` (the depths it may stop at: b, b + c, ... up to "
                        f"its deepest) and `heads` (UCB_H's options per group)")
    if mode.arms:
        problems.append(f"{key}.arms: search = sequential takes `layers` and `heads`, not `arms`")
    if layers:
        want = [d for d in allowed_l if d <= max(layers)]
        if layers != want or b not in layers:
            problems.append(
                f"{key}.layers = {layers}: search = sequential decides at every group boundary, so its depths are "
                f"b, b + c, ... up to the deepest (with b = {b}, c = {c}: {want if b in want else allowed_l}); "
                f"list them all, ascending")
    wrong = {"depth_feedback": (mode.depth_feedback, "all_depths"), "exit_loss": (mode.exit_loss, "path"),
             "all_depths_reward": (mode.all_depths_reward or cfg.dht.bandits.all_depths_reward, "difference")}
    for name, (value, need) in wrong.items():
        if value != need:
            problems.append(f"{key}.{name} = {value!r}: search = sequential reads every exit of every sample with a "
                            f"price per layer (T31: T24's pass, T25's reward, T26's exits); set {name}: {need}")
    if mode.warmup_mode:
        problems.append(f"{key}.warmup_mode: search = sequential has no warm-up; remove it")
    if mode.prices is not None and mode.continue_reward != "next":
        problems.append(f"{key}.prices: a curve moves the price at inference, which shifts the bandits' estimate by a "
                        f"known amount only for continue_reward: next (best's price is inside a minimum); set "
                        f"continue_reward: next or prices: null")
    if mode.prices and cfg.data.val_fraction == 0:
        problems.append(f"{key}.prices: the price is chosen on the validation split, and data.val_fraction = 0 holds "
                        f"none out; set data.val_fraction above 0 (e.g. 0.1) or prices: null")
    if mode.prices is not None and not mode.prices:
        problems.append(f"{key}.prices = []: list the prices per layer of the curve (e.g. [0.0, 0.01, 0.02, 0.04]) "
                        f"or set prices: null")
    return problems
