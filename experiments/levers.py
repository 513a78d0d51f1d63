"""Levers the paper leaves open, measured on the default profile (issue 16; docs/real-text.md, section 3).

Each *setting* is the default profile (params.yaml's top level: the pretrained MiniLM, SST-2 and the DBpedia
subset, 2 epochs at lr 2e-4) with one value changed: a dict overlay deep-merged into the resolved configuration
and validated again through the pydantic model and the semantic checks (dht.config_checks), so a typo in a lever
fails like a typo in params.yaml. params.yaml itself is never edited and no profile is added to it. A setting's name is
one or more atoms of ATOMS joined by ``+`` (``ucb_alpha-3+gamma-0.25`` applies both overlays, left to right).

Every run trains one mode as workflow/scripts/train.py does (the same seed_everything, the arm features and
initial model of the pipeline's arm_features stage, dht.trainer.Trainer, predict with the inference policy,
evaluate) without MLflow and without checkpoints, and evaluates it on the **validation split**
(data/processed/<dataset>/val.parquet, ``data.val_fraction`` of the training split, which no model trains on),
never on the test split: the sweep chooses settings, and a setting chosen on the test split would make its test
figures no longer measure what a user gets (docs/pipeline.md, "The validation split"). A chosen setting's test
figures come from the pipeline (params.yaml, `make reproduce`). It writes
``experiments/levers/<setting>/<dataset>/<model>/`` metrics.json (``"split": "val"``), selections.json,
predictions.csv (of the validation split) and loss.csv. A run whose metrics.json exists (of the validation split)
is skipped, so a killed sweep resumes by running the command again.
The reference (run.reference) and the control (run.control) train once, under ``default``: every lever's depth
analysis compares with them.

Steps (from the project root, with the worktree's dht package on PYTHONPATH)::

    # 1. data and arm features, through the pipeline (default profile)
    snakemake --cores 1 data/features/sst2/meta.json data/features/dbpedia-subset/meta.json
    # 2. the runs: the default first (with the reference and control), then each lever; one training at a time
    python experiments/levers.py run --threads 1
    # what summary.md also holds: a fixed 4-layer model, the fixed modes at 4 epochs, a combination
    python experiments/levers.py run --settings with-vanilla-4 --models vanilla-4
    python experiments/levers.py run --settings epochs-4 --models vanilla-2
    python experiments/levers.py run --settings epochs-4 --datasets dbpedia-subset --models vanilla-6
    python experiments/levers.py run --settings ucb_alpha-3+gamma-0.25 --datasets sst2
    # 3. the table (also written to experiments/levers/summary.md)
    python experiments/levers.py summary

``run`` without ``--settings`` runs DEFAULT_SETTINGS; ``--models`` defaults to t-dht and f-dht (plus the
reference and control under ``default``). ``python experiments/levers.py list`` prints the atoms.

The summary gives, per setting x dataset x mode, all on the validation split: accuracy with its 95% bootstrap
interval (dht.evaluation, as the reports compute it), inference FLOPs relative to the reference, mean layers, the
distance to the "random mixing" line between the control and the reference (the accuracy a mode would get by
sending the same share of FLOPs deep at random: docs/real-text.md, section 3), the mean layers on the samples the
control gets wrong and right, and the share of training samples run at b layers in the last epoch. The depth columns reuse
dht.evaluation.depth_analysis, the code of Table 1's "Where the depth goes".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dht.config import Config, ConfigError
from dht.config_checks import check_semantics
from dht.config_loading import deep_merge, load_config

OUT = Path("experiments/levers")
LADDER = "ladder.npz"  # exit_ladder's output on the validation split, next to a DHT run's metrics.json
SPLIT = "val"  # what every run is evaluated on (and what metrics.json's "split" says); never the test split
DATASETS = ["sst2", "dbpedia-subset"]
DHT_MODES = ["t-dht", "f-dht"]

# One lever value each (docs/training.md holds each key's reading); combined with "+".
ATOMS: dict[str, dict[str, Any]] = {
    "default": {},
    "ucb_alpha-0.1": {"dht": {"bandits": {"ucb_alpha": 0.1}}},
    "ucb_alpha-3": {"dht": {"bandits": {"ucb_alpha": 3.0}}},
    "refresh-epoch": {"dht": {"features": {"refresh": "epoch"}}},
    "epochs-4": {"train": {"epochs": 4}},
    "lr-3e-5": {"train": {"learning_rate": 3e-5}},  # with init-reference: adapt the fine-tuned model gently
    "per_queue": {"dht": {"bandits": {"reward_baseline": "per_queue"}}},
    "states-train": {"dht": {"decision_states": "train"}},
    "gamma-0.25": {"dht": {"bandits": {"cost_exponent": 0.25}}},
    "gamma-0.5": {"dht": {"bandits": {"cost_exponent": 0.5}}},
    "exit-confidence": {"dht": {"features": {"exit_confidence": True}}},
    # T24: UCB_L learns every depth of every sample against the sample's own mean (tree modes only: t-dht)
    "all-depths": {"dht": {"modes": {"t-dht": {"depth_feedback": "all_depths"}}}},
    # T25: with it, a price per layer in loss units instead of the ratio (combine: all-depths+difference)
    "difference": {"dht": {"bandits": {"all_depths_reward": "difference"}}},
    # T26: the loss also reads every shallower depth option the path passes (deep supervision of the exits)
    "path-exits": {"dht": {"modes": {m: {"exit_loss": "path"} for m in ("t-dht", "s-dht", "f-dht", "p-dht")}}},
    # T27: the depth options' losses read as 1 - p(true class); T25's price per layer, lower than the default 0.075
    "error-probability": {"dht": {"bandits": {"depth_loss": "error_probability"}}},
    "price-0.02": {"dht": {"bandits": {"depth_price": 0.02}}},
    "price-0.04": {"dht": {"bandits": {"depth_price": 0.04}}},
    # T28: UCB_L restarts each epoch, so the last epoch's router sees the exits as they are then
    "memory-epoch": {"dht": {"modes": {"t-dht": {"depth_memory": "epoch"}}}},
    # T30: the mode starts from the fine-tuned reference (the `default` run's, saved in its model/ directory), as
    # FastBERT and DistilBERT do, instead of the pretrained checkpoint
    "init-reference": {"dht": {"modes": {m: {"init": "reference"} for m in ("t-dht", "s-dht", "f-dht", "p-dht")}}},
    # T29: one classifier per exit depth instead of one shared by every depth
    "exit-heads-per-depth": {"model": {"exit_heads": "per_depth"}},
    # not a lever: a fixed 4-layer model (the middle depth), to compare with modes that settle on 4 layers
    "with-vanilla-4": {"dht": {"modes": {"vanilla-4": {"search": "fixed", "arms": ["4L12H"]}}}},
}
DEFAULT_SETTINGS = ["default", "ucb_alpha-0.1", "ucb_alpha-3", "refresh-epoch", "epochs-4", "per_queue",
                    "states-train"]


def overlay_of(setting: str) -> dict[str, Any]:
    """The overlay of a setting name: its atoms' overlays merged left to right."""
    out: dict[str, Any] = {}
    for atom in setting.split("+"):
        if atom not in ATOMS:
            raise ConfigError(f"setting {setting!r}: unknown lever {atom!r}; allowed: {', '.join(ATOMS)}")
        out = deep_merge(out, ATOMS[atom])
    return out


def setting_config(setting: str, params: str | Path = "params.yaml") -> Config:
    """The default profile with the setting's overlay, validated as params.yaml is (structure, then semantics)."""
    base = load_config(params, profile="default")
    data = deep_merge(base.model_dump(mode="json"), overlay_of(setting))
    try:
        cfg = Config.model_validate(data)
    except Exception as err:  # pydantic's ValidationError, named with the setting
        raise ConfigError(f"setting {setting!r}: {err}") from None
    problems = check_semantics(cfg)
    if problems:
        raise ConfigError(f"setting {setting!r}: " + "; ".join(problems))
    return cfg


def evaluation_split(processed: Path) -> Any:
    """The split every lever run is evaluated on: the processed validation split (SplitData); a clear error when
    the profile holds none out."""
    from dht.evaluation import SplitData
    from dht.tokenization import load_processed

    data = SplitData.from_arrays(load_processed(processed, SPLIT))
    if not len(data):
        raise ConfigError(f"{processed}/{SPLIT}.parquet is empty (data.val_fraction = 0): the levers are compared on "
                          "the validation split; set data.val_fraction above 0 and rerun the data stages")
    return data


def _done(out: Path) -> bool:
    """A run evaluated on the validation split (a metrics.json of the test split, from before, is run again)."""
    path = out / "metrics.json"
    return path.is_file() and json.loads(path.read_text()).get("split") == SPLIT


def run_one(cfg: Config, setting: str, dataset: str, model_name: str, threads: int) -> Path:
    """Train one mode as workflow/scripts/train.py does and evaluate it on the validation split; write its results
    directory."""
    from dht.arm_features import load_arm_features
    from dht.evaluation import SplitData, accuracy_text
    from dht.integrity import write_manifest
    from dht.policy import predict
    from dht.results import POLICY_FILE, training_metrics, write_results
    from dht.runtime import configure_threads, resolve_device, seed_everything
    from dht.tokenization import load_processed
    from dht.trainer import Trainer, initial_model, save_trained

    out = OUT / setting / dataset / model_name
    fixed = cfg.dht.modes[model_name].search == "fixed"
    keep_model = setting == "default" and model_name == cfg.run.reference  # init-reference starts from it
    done = (out / LADDER).is_file() or (fixed and (not keep_model or (out / "model" / POLICY_FILE).is_file()))
    if _done(out) and done:
        print(f"{setting} {dataset}/{model_name}: done before, skipped", flush=True)
        return out
    cfg.dataset(dataset)
    configure_threads(threads)
    seed_everything(cfg.training_seed)  # where train.py seeds (dht.runtime via _stage.runtime), before the model loads
    device = resolve_device(cfg.device)
    processed, features = Path("data/processed") / dataset, Path("data/features") / dataset
    meta = json.loads((processed / "meta.json").read_text())
    train = SplitData.from_arrays(load_processed(processed, "train"))
    val = evaluation_split(processed)
    reference = OUT / "default" / dataset / cfg.run.reference  # init: reference starts from the default's (T30)
    if cfg.dht.modes[model_name].init == "reference" and not (reference / "model" / POLICY_FILE).is_file():
        raise ConfigError(f"{setting}: no saved reference in {reference / 'model'}; run the default setting's "
                          f"{cfg.run.reference} first (delete its metrics.json to rerun it)")
    model, start = initial_model(cfg, model_name, dataset, features / "init_model", reference / "model",
                                 reference / "metrics.json")
    trainer = Trainer(cfg, model_name, model, load_arm_features(features), train, device, seq_len=meta["max_length"])
    progress = trainer.fit(progress_bar=False)
    pred = predict(trainer.model, trainer.policy, val, device, cfg.train.eval_batch_size, meta["max_length"],
                   greedy=cfg.dht.inference == "greedy")
    metrics = training_metrics(cfg, pred, val, trainer.model.config, meta, progress, start and start.metrics)
    metrics["n_val"] = metrics.pop("n_test")  # evaluate() names its split's size n_test
    metrics.update({"split": SPLIT, "setting": setting, "overlay": overlay_of(setting)})
    out.mkdir(parents=True, exist_ok=True)
    if keep_model:  # with its dht_policy.json, which names it the reference of `dataset` (dht.trainer.initial_model)
        save_trained(out / "model", trainer.model, trainer.policy, model_name, cfg, {"dataset": dataset})
        write_manifest(out / "model")  # as the train stage does, last: init-reference verifies it before loading
    if not fixed:
        depths = sorted(set(trainer.policy.layer_options))
        np.savez(out / LADDER, **exit_ladder(trainer.model, val, device, cfg.train.eval_batch_size, depths))
        # the same on the training split: what the router's feedback, read on trained samples, can see
        np.savez(out / "ladder-train.npz", **exit_ladder(trainer.model, train, device, cfg.train.eval_batch_size, depths))
    write_results(out, metrics, pred, val, progress)  # metrics.json last: marks the run as done
    print(f"{setting} {dataset}/{model_name}: validation accuracy {accuracy_text(metrics)}, inference FLOPs "
          f"{metrics['infer_flop_ratio']:.2f}x, mean layers {metrics['mean_layers']:.2f} ({progress.seconds:.0f} s)",
          flush=True)
    return out


def exit_ladder(model: Any, data: Any, device: Any, batch_size: int, depths: list[int]) -> dict[str, np.ndarray]:
    """Every sample's class probabilities (of the split given: validation, or train) read by the exit heads (the
    shared classifier, or each depth's own with model.exit_heads: per_depth) after each depth option with every head
    (dht.walk.exit_logits): ``probs`` [N, K, C] for ``depths`` [K], and
    ``label`` [N]. What the trained model's exits can do whatever the router: the accuracy of each exit, and what
    routing on the shallow exit's own confidence would reach (``ladder``)."""
    import torch

    from dht.walk import exit_logits

    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for lo in range(0, len(data), batch_size):
            ids, mask, y = data.batch(torch.arange(lo, min(lo + batch_size, len(data))), device)
            logits = exit_logits(model, ids, mask, depths)
            probs.append(torch.stack([x.float().softmax(-1).cpu() for x in logits], dim=1))
            labels.append(y.cpu())
    return {"depths": np.array(depths), "probs": torch.cat(probs).numpy(), "label": torch.cat(labels).numpy()}


def _read(setting: str, dataset: str, model: str) -> tuple[dict[str, Any], Any, dict[str, Any]] | None:
    from dht.evaluation import read_predictions

    d = OUT / setting / dataset / model
    if not _done(d):  # nothing, or a run evaluated on the test split before the validation split existed
        return None
    return (json.loads((d / "metrics.json").read_text()), read_predictions(d / "predictions.csv"),
            json.loads((d / "selections.json").read_text()))


def _shallow_share(selections: dict[str, Any], b: int) -> float:
    """Share of the last epoch's training samples that ran the b fixed layers only."""
    last = selections[max(selections, key=int)]
    total = sum(v for k, v in last.items() if k.startswith("layers/"))
    return last.get(f"layers/{b}", 0) / total if total else float("nan")


def summary(settings: list[str] | None = None, models: list[str] | None = None) -> str:
    """The markdown table of every finished run (rows in ATOMS order, then any other setting found)."""
    from dht.evaluation import depth_analysis

    cfg = load_config("params.yaml", profile="default")
    ref, control, b = cfg.run.reference, cfg.run.control, cfg.dht.fixed_layers
    found = sorted(p.name for p in OUT.iterdir() if p.is_dir()) if OUT.is_dir() else []
    order = settings or [*(s for s in DEFAULT_SETTINGS if s in found), *(s for s in found if s not in DEFAULT_SETTINGS)]
    models = models or DHT_MODES
    lines = [
        "# Levers on the default profile (experiments/levers.py)",
        "",
        f"One seed (training seed {cfg.training_seed}) per run; each setting is the default profile with one value changed "
        f"(`python experiments/levers.py list`). Reference {ref} and control {control} from the `default` runs.",
        "Every number on the validation split (data.val_fraction of the training split; never the test split). "
        "Accuracy [95% bootstrap interval over the validation samples, dht.evaluation]; FLOPs: inference FLOPs / the "
        f"reference's; vs line: accuracy minus the line from the control to the reference at the same FLOPs "
        f"(random mixing of {b} and {cfg.model.num_hidden_layers} layers; always the `default` runs' line, so under "
        "a setting that also changes the fixed modes, such as epochs-4, compare with its own fixed rows); "
        f"layers ctrl wrong / right: mean layers on "
        f"the validation samples {control} gets wrong / right; train {b}L: share of the last training epoch's samples run "
        f"at {b} layers. Train time: one training at a time, one thread, on 2 cores shared with other jobs "
        "(indicative only).",
        "",
    ]
    for dataset in DATASETS:
        r, c = _read("default", dataset, ref), _read("default", dataset, control)
        if r is None or c is None:
            lines.append(f"{dataset}: the default's {ref} / {control} have not run yet.\n")
            continue
        (rm, rp, _), (cm, cp, _) = r, c
        lines += [f"## {dataset}", "",
                  f"{ref}: {_acc(rm)} at 1.00x ({rm['train_seconds']:.0f} s); "
                  f"{control}: {_acc(cm)} at {cm['infer_flop_ratio']:.2f}x ({cm['train_seconds']:.0f} s)", "",
                  "| setting | mode | accuracy [95% CI] | FLOPs | mean layers | vs line | layers ctrl wrong / right "
                  f"| train {b}L | train time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for setting in order:
            # fixed modes run under a setting (the reference and control with more epochs, vanilla-4): no depth
            modes = setting_config(setting).dht.modes
            found_models = sorted(p.name for p in (OUT / setting / dataset).glob("*") if p.is_dir())
            fixed = [m for m in found_models if modes[m].search == "fixed" and setting != "default"]
            for model in [*models, *fixed]:
                got = _read(setting, dataset, model)
                if got is None:
                    continue
                m, p, sel = got
                line = _line(m, rm, cm)
                if model in fixed:
                    lines.append(f"| {setting} | {model} | {_acc(m)} | {m['infer_flop_ratio']:.2f}x | "
                                 f"{m['mean_layers']:.2f} | {100 * (m['accuracy'] - line):+.1f} pt | - | - | "
                                 f"{m['train_seconds']:.0f} s |")
                    continue
                analysis = depth_analysis({model: p}, (ref, rp), (control, cp))
                bins = {x.label: x for x in analysis.groupings["control"][1]}
                wrong, right = (analysis.mean_layers(model, bins[f"{control} {w}"]) for w in ("wrong", "right"))
                lines.append(
                    f"| {setting} | {model} | {_acc(m)} | {m['infer_flop_ratio']:.2f}x | {m['mean_layers']:.2f} | "
                    f"{100 * (m['accuracy'] - line):+.1f} pt | {wrong:.2f} / {right:.2f} | "
                    f"{_shallow_share(sel, b):.2f} | {m['train_seconds']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


def confidence_routing(ladder: dict[str, np.ndarray], share: float) -> float:
    """Accuracy when the ``share`` of samples least confident at the shallowest exit (1 - top probability, as
    T23's context entry) read the deepest exit and the rest the shallowest: routing FastBERT-style on the model's
    own exits, the router a bandit on that signal could at best learn (ties broken by sample order)."""
    probs, label = ladder["probs"], ladder["label"]
    correct = probs.argmax(-1) == label[:, None]  # [N, K]
    order = np.argsort(-(1.0 - probs[:, 0].max(-1)), kind="stable")
    deep = np.zeros(len(label), dtype=bool)
    deep[order[: int(round(share * len(label)))]] = True
    return float(np.where(deep, correct[:, -1], correct[:, 0]).mean())


def ladder_summary(settings: list[str] | None = None) -> str:
    """What each trained DHT model's exits can do (exit_ladder) beside what its router did with them."""
    found = sorted(p.parent.parent.parent.name for p in OUT.glob(f"*/*/*/{LADDER}"))
    order = settings or [*(s for s in ATOMS if s in found), *(s for s in dict.fromkeys(found) if s not in ATOMS)]
    lines = [
        "# The trained models' exits beside their routers (experiments/levers.py ladder)",
        "",
        "All on the validation split. exits: accuracy of the exit heads (the shared classifier, or each depth's own "
        "with exit-heads-per-depth) read after each depth option with every head (one pass, no router); run: the mode's own inference policy, accuracy @ mean layers; confidence routing: the same model, "
        "its least confident samples at the shallowest exit (1 - top probability) sent to the deepest exit, the "
        "rest stopped at the shallowest, with the share that gives the run's mean layers / 3 mean layers (0.5x of "
        "the layers); oracle: a sample right at the shallowest or the deepest exit counts right.",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"## {dataset}", "",
                  "| setting | mode | exits (layers: accuracy) | run | confidence routing at the run's layers | "
                  "at 3 layers | oracle shallowest / deepest |",
                  "|---|---|---|---|---|---|---|"]
        for setting in order:
            for d in sorted((OUT / setting / dataset).glob(f"*/{LADDER}")):
                if not _done(d.parent):  # a ladder of the test split, from before the validation split
                    continue
                ladder = dict(np.load(d))
                m = json.loads((d.parent / "metrics.json").read_text())
                depths = ladder["depths"].tolist()
                correct = ladder["probs"].argmax(-1) == ladder["label"][:, None]
                lo, hi = depths[0], depths[-1]
                share = (m["mean_layers"] - lo) / (hi - lo) if hi > lo else 0.0
                exits = ", ".join(f"{k}: {a:.3f}" for k, a in zip(depths, correct.mean(0), strict=True))
                lines.append(
                    f"| {setting} | {d.parent.name} | {exits} | {m['accuracy']:.3f} @ {m['mean_layers']:.2f} | "
                    f"{confidence_routing(ladder, share):.3f} | "
                    f"{confidence_routing(ladder, (3 - lo) / (hi - lo)):.3f} | "
                    f"{(correct[:, 0] | correct[:, -1]).mean():.3f} |")
        lines.append("")
    return "\n".join(lines)


# The rule `select` applies, stated before the sweep's results were read (docs/real-text.md section 5).
FLOP_BUDGET = 0.6  # the paper's goal: at most 0.6x the reference's inference FLOPs


def _line(m: dict[str, Any], ref: dict[str, Any], ctrl: dict[str, Any]) -> float:
    """The random-mixing line at a run's FLOPs: the accuracy of sending that share of the samples through the
    reference and the rest through the control, at random (linear in the FLOP ratio)."""
    x0, x1 = ctrl["infer_flop_ratio"], ref["infer_flop_ratio"]
    t = (m["infer_flop_ratio"] - x0) / (x1 - x0)
    return ctrl["accuracy"] + t * (ref["accuracy"] - ctrl["accuracy"])


def select(settings: list[str], model: str) -> tuple[str | None, list[str]]:
    """The setting of `model` chosen on the validation split, and the table behind the choice. The rule: among the
    settings at no more than FLOP_BUDGET of the reference's inference FLOPs on every dataset, the one whose
    validation accuracy lies furthest above the random-mixing line (mean over the datasets): the setting whose
    router adds the most over mixing the control and the reference at random for the same FLOPs. No test figure
    is read."""
    cfg = load_config("params.yaml", profile="default")
    rows, scores = [], {}
    for setting in settings:
        above, within, cells = [], True, []
        for dataset in DATASETS:
            run, ref, ctrl = (_read(s, dataset, m) for s, m in ((setting, model), ("default", cfg.run.reference),
                                                                  ("default", cfg.run.control)))
            if run is None or ref is None or ctrl is None:
                cells.append("not run")
                within = False
                continue
            m = run[0]
            d = m["accuracy"] - _line(m, ref[0], ctrl[0])
            above.append(d)
            within &= m["infer_flop_ratio"] <= FLOP_BUDGET + 1e-9
            cells.append(f"{m['accuracy']:.3f} @ {m['infer_flop_ratio']:.2f}x ({100 * d:+.1f} pt)")
        if within and len(above) == len(DATASETS):
            scores[setting] = float(np.mean(above))
        rows.append(f"| {setting} | " + " | ".join(cells) + f" | {'yes' if within else 'no'} |")
    chosen = max(scores, key=lambda k: scores[k]) if scores else None
    head = [f"| setting | {' | '.join(DATASETS)} | within {FLOP_BUDGET}x |", "|---|" + "---|" * (len(DATASETS) + 1)]
    return chosen, head + rows


def _p_true(pred_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's probability of its true class and whether it was right, from a binary task's
    predictions.csv (which keeps the top class's probability only)."""
    import pandas as pd

    df = pd.read_csv(pred_path)
    right = (df["pred"] == df["label"]).to_numpy()
    return np.where(right, df["prob"], 1.0 - df["prob"]).astype(float), right


def depth_gain_shares(dataset: str = "sst2", prices: tuple[float, ...] = (0.02, 0.04, 0.075)) -> list[str]:
    """T25's and T27's readings on the validation split: among the samples the control gets wrong / right, the
    share where the reference's full depth pays under each reward: loss x L (Section 4.3's ratio), a price per
    layer on the cross-entropy (T25's difference) and on 1 - p(true class) (T27). From the `default` runs' fixed
    models (a binary dataset: predictions.csv keeps the top probability only)."""
    from dht.report import fixed_layers_of

    cfg = load_config("params.yaml", profile="default")
    ref, ctrl = cfg.run.reference, cfg.run.control
    root = OUT / "default" / dataset
    if not (_done(root / ref) and _done(root / ctrl)):
        return [f"{dataset}: the default setting's {ref} / {ctrl} have not run on the validation split yet."]
    p6, _ = _p_true(root / ref / "predictions.csv")
    p2, right2 = _p_true(root / ctrl / "predictions.csv")
    l6, l2 = -np.log(np.clip(p6, 1e-12, 1)), -np.log(np.clip(p2, 1e-12, 1))
    deep, shallow = fixed_layers_of(cfg, ref), fixed_layers_of(cfg, ctrl)
    rules = {f"loss x L (ratio: {deep} layers win when their loss is {deep / shallow:.0f}x lower)":
             l6 * deep < l2 * shallow}
    for p in prices:
        rules[f"cross-entropy, price {p} per layer"] = l2 - l6 > p * (deep - shallow)
        rules[f"1 - p(true class), price {p} per layer"] = (1 - p2) - (1 - p6) > p * (deep - shallow)
    lines = [f"{dataset}, validation split ({len(p6)} samples; {ctrl} wrong on {int((~right2).sum())}): share of "
             f"samples where {deep} layers pay over {shallow}",
             "", f"| reward | {ctrl} wrong | {ctrl} right |", "|---|---|---|"]
    for name, pays in rules.items():
        lines.append(f"| {name} | {pays[~right2].mean():.0%} | {pays[right2].mean():.0%} |")
    return lines


def exit_quartiles(setting: str, dataset: str, model: str = "t-dht") -> list[str]:
    """T27's reading on the validation split, from a trained DHT model's exit ladder: by quarter of the shallowest
    exit's uncertainty (1 - top probability), the accuracy, cross-entropy and 1 - p(true class) of the shallowest
    and the deepest exit."""
    path = OUT / setting / dataset / model / LADDER
    if not (_done(path.parent) and path.is_file()):
        return [f"{setting} {dataset}/{model}: no exit ladder of the validation split."]
    ladder = dict(np.load(path))
    probs, label = ladder["probs"], ladder["label"]
    pt = probs[np.arange(len(label)), :, label]  # [N, K] p(true class) at each exit
    unc = 1.0 - probs[:, 0].max(-1)
    quarter = np.minimum((np.argsort(np.argsort(unc, kind="stable"), kind="stable") * 4) // len(unc), 3)
    lo, hi = ladder["depths"][0], ladder["depths"][-1]
    lines = [f"{setting}, {dataset}/{model}, validation split: by quarter of the {lo}-layer exit's uncertainty",
             "", f"| quarter | accuracy {lo} / {hi} | cross-entropy {lo} / {hi} | 1 - p(true) {lo} / {hi} |",
             "|---|---|---|---|"]
    for q in range(4):
        s = quarter == q
        acc = (probs[s].argmax(-1) == label[s, None]).mean(0)
        ce = -np.log(np.clip(pt[s], 1e-12, 1)).mean(0)
        ep = (1 - pt[s]).mean(0)
        lines.append(f"| {q + 1} ({'most' if q == 0 else 'least' if q == 3 else 'mid'} confident) | "
                     f"{acc[0]:.2f} / {acc[-1]:.2f} | {ce[0]:.2f} / {ce[-1]:.2f} | {ep[0]:.2f} / {ep[-1]:.2f} |")
    return lines


def _acc(m: dict[str, Any]) -> str:
    from dht.evaluation import accuracy_text

    return accuracy_text(m)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate the settings' runs (one at a time)")
    r.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    r.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    r.add_argument("--models", nargs="+", default=DHT_MODES)
    r.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summary", help="write experiments/levers/summary.md from the finished runs")
    s.add_argument("--settings", nargs="+", default=None)
    sub.add_parser("list", help="print each lever atom and its overlay")
    lad = sub.add_parser("ladder", help="write experiments/levers/ladder.md: each DHT run's exits and routers")
    lad.add_argument("--settings", nargs="+", default=None)
    sel = sub.add_parser("select", help="the setting chosen on the validation split by the rule of select()")
    sel.add_argument("--settings", nargs="+", required=True)
    sel.add_argument("--model", default="t-dht")
    rd = sub.add_parser("readings", help="T25's and T27's readings re-derived on the validation split")
    rd.add_argument("--setting", default="init-reference+path-exits", help="the run whose exit ladder T27 reads")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            for name, overlay in ATOMS.items():
                print(f"{name}: {json.dumps(overlay)}")
        elif args.command == "run":
            configs = {s: setting_config(s) for s in args.settings}  # every setting validated before any run
            for setting in args.settings:
                cfg = configs[setting]
                extra = [cfg.run.reference, cfg.run.control] if setting == "default" else []
                for dataset in args.datasets:
                    for model in dict.fromkeys([*extra, *args.models]):
                        if model is None:
                            continue
                        start = time.perf_counter()
                        run_one(cfg, setting, dataset, model, args.threads)
                        print(f"  ({time.perf_counter() - start:.0f} s wall)", flush=True)
        elif args.command == "select":
            chosen, table = select(args.settings, args.model)
            text = "\n".join([
                f"# {args.model}: the setting chosen on the validation split (experiments/levers.py select)", "",
                f"Validation accuracy @ inference FLOPs (points above the control-reference line at those FLOPs), one "
                f"seed. The rule (select()): among the settings within {FLOP_BUDGET}x on every dataset, the one "
                "furthest above the line on average.", "", *table, "",
                f"Chosen: {chosen or 'none within the budget'}"])
            (OUT / "selection.md").write_text(text + "\n")
            print(text)
        elif args.command == "readings":
            print("\n".join(depth_gain_shares()))
            for dataset in DATASETS:
                print()
                print("\n".join(exit_quartiles(args.setting, dataset)))
        elif args.command == "ladder":
            text = ladder_summary(args.settings)
            (OUT / "ladder.md").write_text(text + "\n")
            print(text)
        else:
            text = summary(args.settings)
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "summary.md").write_text(text + "\n")
            print(text)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
