"""A study's tables (dht.studies; the study_report rule of workflow/rules/studies.smk writes them to
reports/studies/<study>/<table>.md): every number of the validation split, read from the study's runs in
``results/studies/<study>/<setting>/<dataset>/<model>/``.

- ``summary``: per setting x dataset x model, accuracy with its 95% bootstrap interval (dht.evaluation, as the
  reports compute it), inference FLOPs relative to the reference, mean layers, the distance to the "random mixing"
  line between the control and the reference (the accuracy a mode would get by sending the same share of FLOPs deep
  at random: docs/real-text.md, section 3), the mean layers on the samples the control gets wrong and right
  (dht.evaluation.depth_analysis, the code of Table 1's "Where the depth goes") and the share of training samples
  run at b layers in the last epoch.
- ``selection``: the setting the study's rule (:func:`select`) chooses, and the table behind the choice.
- ``ladder``: what each trained DHT model's exits can do (its exit ladder, workflow/scripts/exit_ladder.py) beside
  what its router did with them.
- ``readings``: T25's and T27's readings (docs/training.md) re-derived on the validation split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dht.studies import DEFAULT_SETTING, SPLIT, ResolvedStudy, Run

TABLES = ("summary", "selection", "ladder", "readings")
LADDER = "ladder.npz"  # exit_ladder's output on the validation split, beside a DHT run's metrics.json
LADDER_TRAIN = "ladder-train.npz"  # the same on the training split: what the router's feedback could see


def run_dir(root: str | Path, run: Run) -> Path:
    """A study run's results folder below `root` (results/studies/<study>)."""
    return Path(root) / run.setting / run.dataset / run.model


def tables_of(resolved: ResolvedStudy) -> list[str]:
    """The tables a study has: the summary always; the selection, the ladder and the readings when it asks."""
    s = resolved.study
    return ["summary", *(["selection"] if s.select else []), *(["ladder"] if s.ladder else []),
            *(["readings"] if s.readings else [])]


def is_fixed(resolved: ResolvedStudy, run: Run) -> bool:
    return resolved.configs[run.setting].dht.modes[run.model].search == "fixed"


def ladder_runs(resolved: ResolvedStudy) -> list[Run]:
    """The runs with an exit ladder: the DHT ones (a fixed model has one exit)."""
    return [r for r in resolved.runs() if not is_fixed(resolved, r)]


def read_metrics(root: str | Path, run: Run) -> dict[str, Any]:
    """A run's metrics.json, which must be of the validation split (a study never reads the test split)."""
    path = run_dir(root, run) / "metrics.json"
    metrics = json.loads(path.read_text())
    if metrics.get("split") != SPLIT:
        raise ValueError(f"{path}: not of the validation split (\"split\": {metrics.get('split')!r}); a study reads "
                         f"the validation split only: delete it and rerun the study")
    return metrics


def _read(root: Path, run: Run) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    from dht.evaluation import read_predictions

    d = run_dir(root, run)
    return (read_metrics(root, run), read_predictions(d / "predictions.csv"),
            json.loads((d / "selections.json").read_text()))


def _acc(m: dict[str, Any]) -> str:
    from dht.evaluation import accuracy_text

    return accuracy_text(m)


def line_at(m: dict[str, Any], ref: dict[str, Any], ctrl: dict[str, Any]) -> float:
    """The random-mixing line at a run's FLOPs: the accuracy of sending that share of the samples through the
    reference and the rest through the control, at random (linear in the FLOP ratio)."""
    x0, x1 = ctrl["infer_flop_ratio"], ref["infer_flop_ratio"]
    t = (m["infer_flop_ratio"] - x0) / (x1 - x0)
    return ctrl["accuracy"] + t * (ref["accuracy"] - ctrl["accuracy"])


def _shallow_share(selections: dict[str, Any], b: int) -> float:
    """Share of the last epoch's training samples that ran the b fixed layers only."""
    last = selections[max(selections, key=int)]
    total = sum(v for k, v in last.items() if k.startswith("layers/"))
    return last.get(f"layers/{b}", 0) / total if total else float("nan")


def _settings(resolved: ResolvedStudy) -> list[str]:
    return list(dict.fromkeys(r.setting for r in resolved.runs()))


def summary(resolved: ResolvedStudy, root: str | Path) -> str:
    """The markdown table of every run of the study (settings in the study's order, then its extra runs')."""
    from dht.evaluation import depth_analysis

    root, cfg = Path(root), resolved.profile
    ref, control, b = cfg.run.reference, cfg.run.control, cfg.dht.fixed_layers
    lines = [
        f"# Study `{resolved.name}` (workflow/studies.yaml; profile {cfg.profile})",
        "",
        f"{resolved.study.about} One seed (training seed {cfg.training_seed}) per run; each setting is the profile with the named "
        f"overlays of workflow/studies.yaml. Reference {ref} and control {control} from the `{DEFAULT_SETTING}` runs.",
        "Every number on the validation split (data.val_fraction of the training split; never the test split). "
        "Accuracy [95% bootstrap interval over the validation samples, dht.evaluation]; FLOPs: inference FLOPs / the "
        f"reference's; vs line: accuracy minus the line from the control to the reference at the same FLOPs "
        f"(random mixing of {b} and {cfg.model.num_hidden_layers} layers; always the `{DEFAULT_SETTING}` runs' line, "
        "so under a setting that also changes the fixed modes, such as epochs-4, compare with its own fixed rows); "
        f"layers ctrl wrong / right: mean layers on the validation samples {control} gets wrong / right; train {b}L: "
        f"share of the last training epoch's samples run at {b} layers. Train time: one training at a time, as "
        "scheduled on the machine that ran it (indicative only).",
        "",
    ]
    for dataset in resolved.datasets:
        (rm, rp, _), (cm, cp, _) = (_read(root, Run(DEFAULT_SETTING, dataset, m)) for m in (ref, control))
        lines += [f"## {dataset}", "",
                  f"{ref}: {_acc(rm)} at 1.00x ({rm['train_seconds']:.0f} s); "
                  f"{control}: {_acc(cm)} at {cm['infer_flop_ratio']:.2f}x ({cm['train_seconds']:.0f} s)", "",
                  "| setting | mode | accuracy [95% CI] | FLOPs | mean layers | vs line | layers ctrl wrong / right "
                  f"| train {b}L | train time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        runs = [r for r in resolved.runs() if r.dataset == dataset
                and not (r.setting == DEFAULT_SETTING and r.model in (ref, control))]
        for setting in _settings(resolved):
            mine = [r for r in runs if r.setting == setting]
            for run in [*(r for r in mine if not is_fixed(resolved, r)), *(r for r in mine if is_fixed(resolved, r))]:
                m, p, sel = _read(root, run)
                line = line_at(m, rm, cm)
                if is_fixed(resolved, run):
                    lines.append(f"| {setting} | {run.model} | {_acc(m)} | {m['infer_flop_ratio']:.2f}x | "
                                 f"{m['mean_layers']:.2f} | {100 * (m['accuracy'] - line):+.1f} pt | - | - | "
                                 f"{m['train_seconds']:.0f} s |")
                    continue
                analysis = depth_analysis({run.model: p}, (ref, rp), (control, cp))
                bins = {x.label: x for x in analysis.groupings["control"][1]}
                # "-" where the control gets no sample wrong (or none right): an empty group has no mean
                wrong, right = (f"{analysis.mean_layers(run.model, bins[k]):.2f}" if (k := f"{control} {w}") in bins
                                else "-" for w in ("wrong", "right"))
                lines.append(
                    f"| {setting} | {run.model} | {_acc(m)} | {m['infer_flop_ratio']:.2f}x | {m['mean_layers']:.2f} | "
                    f"{100 * (m['accuracy'] - line):+.1f} pt | {wrong} / {right} | "
                    f"{_shallow_share(sel, b):.2f} | {m['train_seconds']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


def select(resolved: ResolvedStudy, root: str | Path) -> tuple[str | None, list[str]]:
    """The setting of the study's ``select.model`` chosen on the validation split, and the table behind the choice.
    The rule: among the settings at no more than ``select.flop_budget`` of the reference's inference FLOPs on every
    dataset, the one whose validation accuracy lies furthest above the random-mixing line (mean over the datasets):
    the setting whose router adds the most over mixing the control and the reference at random for the same FLOPs.
    No test figure is read. A run that is missing makes its setting ineligible ("not run")."""
    rule = resolved.study.select
    if rule is None:
        raise ValueError(f"study {resolved.name!r} has no select rule in workflow/studies.yaml")
    root, cfg, datasets = Path(root), resolved.profile, resolved.datasets
    rows, scores = [], {}
    for setting in resolved.study.settings:
        above, within, cells = [], True, []
        for dataset in datasets:
            runs = [Run(setting, dataset, rule.model), Run(DEFAULT_SETTING, dataset, cfg.run.reference),
                    Run(DEFAULT_SETTING, dataset, cfg.run.control)]
            if not all((run_dir(root, r) / "metrics.json").is_file() for r in runs):
                cells.append("not run")
                within = False
                continue
            m, ref, ctrl = (read_metrics(root, r) for r in runs)
            d = m["accuracy"] - line_at(m, ref, ctrl)
            above.append(d)
            within &= m["infer_flop_ratio"] <= rule.flop_budget + 1e-9
            cells.append(f"{m['accuracy']:.3f} @ {m['infer_flop_ratio']:.2f}x ({100 * d:+.1f} pt)")
        if within and len(above) == len(datasets):
            scores[setting] = float(np.mean(above))
        rows.append(f"| {setting} | " + " | ".join(cells) + f" | {'yes' if within else 'no'} |")
    chosen = max(scores, key=lambda k: scores[k]) if scores else None
    head = [f"| setting | {' | '.join(datasets)} | within {rule.flop_budget}x |", "|---|" + "---|" * (len(datasets) + 1)]
    return chosen, head + rows


def selection(resolved: ResolvedStudy, root: str | Path) -> str:
    """The selection table as markdown (:func:`select`)."""
    rule = resolved.study.select
    chosen, table = select(resolved, root)
    return "\n".join([
        f"# {rule.model}: the setting chosen on the validation split (study `{resolved.name}`)", "",
        f"Validation accuracy @ inference FLOPs (points above the control-reference line at those FLOPs), one "
        f"seed. The rule (dht.study_report.select): among the settings within {rule.flop_budget}x on every dataset, "
        "the one furthest above the line on average.", "", *table, "",
        f"Chosen: {chosen or 'none within the budget'}"])


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


def ladder_table(resolved: ResolvedStudy, root: str | Path) -> str:
    """What each trained DHT model's exits can do (its exit ladder) beside what its router did with them."""
    root = Path(root)
    lines = [
        f"# The trained models' exits beside their routers (study `{resolved.name}`)",
        "",
        "All on the validation split. exits: accuracy of the exit heads (the shared classifier, or each depth's own "
        "with exit-heads-per-depth) read after each depth option with every head (one pass, no router); run: the "
        "mode's own inference policy, accuracy @ mean layers; confidence routing: the same model, its least "
        "confident samples at the shallowest exit (1 - top probability) sent to the deepest exit, the rest stopped "
        "at the shallowest, with the share that gives the run's mean layers / 3 mean layers (0.5x of the layers); "
        "oracle: a sample right at the shallowest or the deepest exit counts right.",
        "",
    ]
    for dataset in resolved.datasets:
        lines += [f"## {dataset}", "",
                  "| setting | mode | exits (layers: accuracy) | run | confidence routing at the run's layers | "
                  "at 3 layers | oracle shallowest / deepest |",
                  "|---|---|---|---|---|---|---|"]
        for run in (r for r in ladder_runs(resolved) if r.dataset == dataset):
            ladder = dict(np.load(run_dir(root, run) / LADDER))
            m = read_metrics(root, run)
            depths = ladder["depths"].tolist()
            correct = ladder["probs"].argmax(-1) == ladder["label"][:, None]
            lo, hi = depths[0], depths[-1]
            share = (m["mean_layers"] - lo) / (hi - lo) if hi > lo else 0.0
            exits = ", ".join(f"{k}: {a:.3f}" for k, a in zip(depths, correct.mean(0), strict=True))
            lines.append(
                f"| {run.setting} | {run.model} | {exits} | {m['accuracy']:.3f} @ {m['mean_layers']:.2f} | "
                f"{confidence_routing(ladder, share):.3f} | "
                f"{confidence_routing(ladder, (3 - lo) / (hi - lo)) if hi > lo else float('nan'):.3f} | "
                f"{(correct[:, 0] | correct[:, -1]).mean():.3f} |")
        lines.append("")
    return "\n".join(lines)


def _p_true(pred_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's probability of its true class and whether it was right, from a binary task's
    predictions.csv (which keeps the top class's probability only)."""
    import pandas as pd

    df = pd.read_csv(pred_path)
    right = (df["pred"] == df["label"]).to_numpy()
    return np.where(right, df["prob"], 1.0 - df["prob"]).astype(float), right


def depth_gain_shares(resolved: ResolvedStudy, root: str | Path) -> list[str]:
    """T25's and T27's readings on the validation split: among the samples the control gets wrong / right, the
    share where the reference's full depth pays under each reward: loss x L (Section 4.3's ratio), a price per
    layer on the cross-entropy (T25's difference) and on 1 - p(true class) (T27). From the default setting's fixed
    models on ``readings.dataset`` (a binary dataset: predictions.csv keeps the top probability only)."""
    from dht.report import fixed_layers_of

    cfg, r = resolved.profile, resolved.study.readings
    ref, ctrl = cfg.run.reference, cfg.run.control
    runs = {m: run_dir(root, Run(DEFAULT_SETTING, r.dataset, m)) for m in (ref, ctrl)}
    for m in runs:
        read_metrics(root, Run(DEFAULT_SETTING, r.dataset, m))  # of the validation split
    p6, _ = _p_true(runs[ref] / "predictions.csv")
    p2, right2 = _p_true(runs[ctrl] / "predictions.csv")
    l6, l2 = -np.log(np.clip(p6, 1e-12, 1)), -np.log(np.clip(p2, 1e-12, 1))
    deep, shallow = fixed_layers_of(cfg, ref), fixed_layers_of(cfg, ctrl)
    rules = {f"loss x L (ratio: {deep} layers win when their loss is {deep / shallow:.0f}x lower)":
             l6 * deep < l2 * shallow}
    for p in r.prices:
        rules[f"cross-entropy, price {p} per layer"] = l2 - l6 > p * (deep - shallow)
        rules[f"1 - p(true class), price {p} per layer"] = (1 - p2) - (1 - p6) > p * (deep - shallow)
    lines = [f"{r.dataset}, validation split ({len(p6)} samples; {ctrl} wrong on {int((~right2).sum())}): share of "
             f"samples where {deep} layers pay over {shallow}",
             "", f"| reward | {ctrl} wrong | {ctrl} right |", "|---|---|---|"]
    for name, pays in rules.items():
        lines.append(f"| {name} | {pays[~right2].mean():.0%} | {pays[right2].mean():.0%} |")
    return lines


def exit_quartiles(root: str | Path, run: Run) -> list[str]:
    """T27's reading on the validation split, from a trained DHT model's exit ladder: by quarter of the shallowest
    exit's uncertainty (1 - top probability), the accuracy, cross-entropy and 1 - p(true class) of the shallowest
    and the deepest exit."""
    read_metrics(root, run)
    ladder = dict(np.load(run_dir(root, run) / LADDER))
    probs, label = ladder["probs"], ladder["label"]
    pt = probs[np.arange(len(label)), :, label]  # [N, K] p(true class) at each exit
    unc = 1.0 - probs[:, 0].max(-1)
    quarter = np.minimum((np.argsort(np.argsort(unc, kind="stable"), kind="stable") * 4) // len(unc), 3)
    lo, hi = ladder["depths"][0], ladder["depths"][-1]
    lines = [f"{run.setting}, {run.dataset}/{run.model}, validation split: by quarter of the {lo}-layer exit's "
             "uncertainty", "", f"| quarter | accuracy {lo} / {hi} | cross-entropy {lo} / {hi} | "
             f"1 - p(true) {lo} / {hi} |", "|---|---|---|---|"]
    for q in range(4):
        s = quarter == q
        acc = (probs[s].argmax(-1) == label[s, None]).mean(0)
        ce = -np.log(np.clip(pt[s], 1e-12, 1)).mean(0)
        ep = (1 - pt[s]).mean(0)
        lines.append(f"| {q + 1} ({'most' if q == 0 else 'least' if q == 3 else 'mid'} confident) | "
                     f"{acc[0]:.2f} / {acc[-1]:.2f} | {ce[0]:.2f} / {ce[-1]:.2f} | {ep[0]:.2f} / {ep[-1]:.2f} |")
    return lines


def readings(resolved: ResolvedStudy, root: str | Path) -> str:
    """T25's reward shares, then T27's exit quartiles of ``readings.setting`` on every dataset of the study."""
    r = resolved.study.readings
    if r is None:
        raise ValueError(f"study {resolved.name!r} has no readings in workflow/studies.yaml")
    parts = [depth_gain_shares(resolved, root)]
    parts += [exit_quartiles(root, Run(r.setting, d, r.model)) for d in resolved.datasets]
    return "\n\n".join("\n".join(p) for p in parts)


def readings_runs(resolved: ResolvedStudy) -> tuple[list[Run], list[Run]]:
    """What :func:`readings` reads: (runs whose predictions it reads, runs whose exit ladder it reads)."""
    r = resolved.study.readings
    cfg = resolved.profile
    return ([Run(DEFAULT_SETTING, r.dataset, m) for m in (cfg.run.reference, cfg.run.control)],
            [Run(r.setting, d, r.model) for d in resolved.datasets])


def table(resolved: ResolvedStudy, root: str | Path, name: str) -> str:
    """One of the study's tables (:data:`TABLES`) as markdown."""
    if name not in tables_of(resolved):
        raise ValueError(f"study {resolved.name!r} has no {name} table (its tables: {', '.join(tables_of(resolved))})")
    return {"summary": summary, "selection": selection, "ladder": ladder_table, "readings": readings}[name](
        resolved, root)


def exit_ladder(model: Any, data: Any, device: Any, batch_size: int, depths: list[int]) -> dict[str, np.ndarray]:
    """Every sample's class probabilities (of the split given: validation, or train) read by the exit heads (the
    shared classifier, or each depth's own with model.exit_heads: per_depth) after each depth option with every
    head (dht.policy.exit_logits): ``probs`` [N, K, C] for ``depths`` [K], and ``label`` [N]. What the trained
    model's exits can do whatever the router: the accuracy of each exit, and what routing on the shallow exit's own
    confidence would reach (:func:`ladder_table`)."""
    import torch

    from dht.policy import exit_logits

    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for lo in range(0, len(data), batch_size):
            ids, mask, y = data.batch(torch.arange(lo, min(lo + batch_size, len(data))), device)
            logits = exit_logits(model, ids, mask, depths)
            probs.append(torch.stack([x.float().softmax(-1).cpu() for x in logits], dim=1))
            labels.append(y.cpu())
    return {"depths": np.array(depths), "probs": torch.cat(probs).numpy(), "label": torch.cat(labels).numpy()}
