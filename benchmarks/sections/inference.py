"""Section 1: every trained model of the profile through the pipeline's own evaluation path on the test split;
its wall-time ratio to 12-VaBERT next to its inference FLOP ratio (goal for the DHT modes: wall <= 1.25 x FLOPs),
and, to name the cause of a miss, counterfactuals timed in the same rounds (one head set per head count,
12-VaBERT split into the DHT's depth groups) and the bandits' decision time inside predict.

Read top to bottom: loading the trained models, the counterfactuals, the measures, the section."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import Timers, fmt_pct, fmt_ratio, fmt_seconds, instrumented, interleaved, sync, table
from report import Section, shortfall_text

from dht.config import KINDS, Config, parse_baseline
from dht.evaluation import Predictions, SplitData, evaluate
from dht.flops import forward_flops
from dht.model import DHTForSequenceClassification
from dht.policy import Policy, predict
from dht.results import POLICY_FILE, run_subdir
from dht.trainer import load_trained
from sections.inputs import BenchmarkError, DataInfo

WALL_GOAL = 1.25  # wall ratio <= 1.25 x FLOP ratio (inference, DHT modes)

# The bandits' decisions inside predict (pooling, normalisation and selection are nested in these).
DECISION_TIMERS: list[tuple[Any, str, str]] = [
    (Policy, "choose_arms", "decide"),
    (Policy, "choose_heads", "decide"),
    (Policy, "layers_of", "decide"),
    (Policy, "stop_context", "decide"),  # search: sequential: each boundary's context and stop decision (T31)
    (Policy, "decide_stops", "decide"),
]


# --------------------------------------------------------------------------------------------------------------
# The trained models
# --------------------------------------------------------------------------------------------------------------


def pipeline_command(dataset: str, model: str, profile: str) -> str:
    """The command that trains `model` (baselines are built from 12-VaBERT by the same target)."""
    extra = "" if profile == "default" else f" --config profile={profile}"
    return f"snakemake --cores 4 results/{dataset}/{model}/metrics.json{extra}"


@dataclass
class Loaded:
    """A trained model with the pipeline's prediction function for it."""

    name: str
    kind: str  # dht (12-VaBERT included), distil, fastbert, nas-prune
    run: Callable[[SplitData], Predictions]
    model: Any = None
    policy: Policy | None = None


def load_models(root: Path, dataset: str, names: list[str], cfg: Config, data: DataInfo, device: torch.device,
                batch: int, seq_len: int) -> tuple[dict[str, Loaded], dict[str, str]]:
    """The models found (name -> Loaded) and the ones that cannot be used (name -> why); with several training
    seeds, the first seed's."""
    from dht.baselines import BASELINE_FILE
    from dht.baselines.saved import SavedBaseline, load_baseline

    greedy = cfg.dht.inference == "greedy"
    reference = cfg.run.reference  # FastBERT's backbone: the baselines' teacher
    loaded: dict[str, Loaded] = {}
    unusable: dict[str, str] = {}
    for name in names:
        directory = root / "models" / run_subdir(cfg, dataset, name, cfg.training_seeds[0])
        if name in cfg.dht.modes:
            if not (directory / POLICY_FILE).is_file():
                unusable[name] = f"not trained ({directory} has no {POLICY_FILE})"
                continue
            model, policy, info = load_trained(directory, device)
            trained = info.get("config", {}).get("profile")
            if trained != cfg.profile:
                unusable[name] = f"trained under profile '{trained}', this run uses '{cfg.profile}'"
                continue
            if info.get("max_length") not in (None, seq_len):
                unusable[name] = f"trained at max_length {info['max_length']}, the data has {seq_len}"
                continue
            c = model.config
            why = data.problem(str(directory), c.vocab_size, c.max_position_embeddings, c.num_labels)
            if why:
                unusable[name] = why
                continue

            def run_dht(split: SplitData, m: Any = model, pol: Policy = policy) -> Predictions:
                return predict(m, pol, split, device, batch, seq_len, greedy=greedy)

            loaded[name] = Loaded(name, "dht", run_dht, model, policy)
            continue
        try:
            kind, _ = parse_baseline(name)
        except ValueError as err:
            unusable[name] = str(err)
            continue
        if not (directory / BASELINE_FILE).is_file():  # written last by the baseline stage: a complete model
            unusable[name] = f"not trained ({directory} has no {BASELINE_FILE})"
            continue
        on_teacher = KINDS[kind].runs_on_teacher  # FastBERT's students
        if on_teacher and reference not in loaded:
            unusable[name] = f"{name} runs on {reference}, which is not usable"
            continue
        # checked against its checksums first; a kind that runs on the teacher, on the reference loaded above
        saved = load_baseline(directory, device, teacher=loaded[reference].model if on_teacher else None)
        why = data.problem(str(directory), saved.vocab_size, saved.max_positions, saved.num_labels)

        def run_baseline(split: SplitData, s: SavedBaseline = saved) -> Predictions:
            return s.predict(split, batch, seq_len)

        entry = Loaded(name, kind, run_baseline, saved.model)
        if why:
            unusable[name] = why
        else:
            loaded[name] = entry
    return loaded, unusable


# --------------------------------------------------------------------------------------------------------------
# Counterfactuals, timed in the same rounds
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def shared_head_sets(policy: Policy) -> Iterator[None]:
    """The TSB still decides (its cost stays), but every sample keeping k heads keeps heads 0..k-1: one head
    set per head count, so the sliced attention runs one F.linear per count instead of per-sample sets."""
    tsb = policy.tsb
    if tsb is None:
        yield
        return
    original = tsb.select

    def select(contexts: torch.Tensor, k: Any, greedy: bool = False, allowed: Any = None) -> torch.Tensor:
        chosen = original(contexts, k, greedy=greedy, allowed=allowed)
        n_heads = chosen.shape[1]
        return torch.arange(n_heads, device=chosen.device)[None, :] < chosen.sum(-1, keepdim=True)

    tsb.select = select  # an instance attribute shadows the method; deleted on exit
    try:
        yield
    finally:
        del tsb.select


@contextmanager
def shared_head_sets_all(loaded: dict[str, Loaded], names: list[str]) -> Iterator[None]:
    with ExitStack() as stack:
        for n in names:
            stack.enter_context(shared_head_sets(loaded[n].policy))
        yield


@torch.no_grad()
def full_model_in_groups(model: DHTForSequenceClassification, data: SplitData, device: torch.device, batch: int,
                         layers: torch.Tensor) -> float:
    """12-VaBERT executed like DHT's predict (the first b layers on the whole batch, then each depth group on
    its own) but with every layer and head: what splitting the batch costs by itself. Returns seconds."""
    model.eval()
    conf = model.config
    b, n_layers = min(conf.fixed_layers, conf.num_hidden_layers), conf.num_hidden_layers
    sync(device)
    start = time.perf_counter()
    for lo in range(0, len(data), batch):
        index = torch.arange(lo, min(lo + batch, len(data)))
        ids, mask, _ = data.batch(index, device)
        hidden, keep = model.embed(ids, mask)
        hidden = model.run_layers(hidden, keep, 0, b)
        depth = layers[index]
        for value in depth.unique().tolist():
            sel = (depth == value).nonzero().squeeze(1).to(device)
            k = None if keep is None else keep[sel]
            h = model.run_layers(hidden[sel], k, b, n_layers)
            model.classify(h, k).float().softmax(-1).cpu()
    sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------------------------


def trimmed_flop_ratio(pred: Predictions, data: SplitData, conf: Any, batch: int) -> float:
    """The FLOP ratio at the widths the batches really have (trimmed to their longest sample), not at the
    padded max_length the pipeline counts: the work the CPU does, so padding shows as a difference."""
    cache: dict[tuple[int, tuple[int, ...]], int] = {}
    num = den = 0.0
    full = [conf.num_attention_heads] * conf.num_hidden_layers
    for lo in range(0, len(data), batch):
        width = max(int(data.attention_mask[lo : lo + batch].sum(1).max()), 1)
        ref = forward_flops(width, full, conf)
        for row in pred.heads[lo : lo + batch].tolist():
            key = (width, tuple(h for h in row if h))
            if key not in cache:
                cache[key] = forward_flops(width, list(key[1]), conf)
            num += cache[key]
            den += ref
    return num / den


def median_decision_seconds(run: Callable[[], Predictions], times: int) -> float:
    """Seconds spent in the bandits' decisions during one predict run, median over `times` runs."""
    decide = []
    timers = Timers()
    for _ in range(times):
        timers.reset()
        with instrumented(timers, DECISION_TIMERS):
            run()
        decide.append(timers.exclusive.get("decide", 0.0))
    return statistics.median(decide)


def mean_groups(layers: torch.Tensor, batch: int) -> float:
    counts = [len(layers[lo : lo + batch].unique()) for lo in range(0, len(layers), batch)]
    return sum(counts) / max(len(counts), 1)


def read_metric(path: Path, key: str) -> float | None:
    try:
        return float(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------------------------------------------


def skipped_list(unusable: dict[str, str], dataset: str, profile: str) -> str:
    if not unusable:
        return "Skipped models: none."
    lines = [f"- `{n}`: {why}; make it with `{pipeline_command(dataset, n, profile)}`" for n, why in unusable.items()]
    return "Skipped models (not measured):\n\n" + "\n".join(lines)


def inference_section(cfg: Config, args: argparse.Namespace, root: Path, device: torch.device) -> Section:
    dataset = args.dataset
    title = "1. Inference: wall time vs FLOPs, trained models"
    processed = root / "data" / "processed" / dataset
    reference = cfg.run.reference
    names = list(dict.fromkeys([reference, *cfg.run.models, *cfg.run.baselines]))
    if not (processed / "test.parquet").is_file():
        why = (f"{processed}/test.parquet not found; make it with "
               f"`snakemake --cores 4 {processed.relative_to(root)}/meta.json`")
        if not args.quick:
            raise BenchmarkError(why)
        return Section(title, f"Skipped: {why}.", [f"inference not measured: {why}"])
    data = DataInfo.load(processed, "test", args.max_test)
    seq_len = int(data.meta["max_length"])
    batch = cfg.train.eval_batch_size
    loaded, unusable = load_models(root, dataset, names, cfg, data, device, batch, seq_len)
    if unusable and not args.quick:
        lines = [f"  - {n}: {why}" for n, why in unusable.items()]
        cmds = [f"  {pipeline_command(dataset, n, cfg.profile)}" for n in unusable]
        raise BenchmarkError(
            f"{len(unusable)} model(s) of profile '{cfg.profile}' cannot be benchmarked on {processed}:\n"
            + "\n".join(lines) + "\nTrain them (with the data they are evaluated on) first:\n" + "\n".join(cmds)
            + "\nor pass --quick to list them as skipped, or --root for a project where they are trained."
        )
    if reference not in loaded:
        why = unusable.get(reference, "missing")
        return Section(title, f"Skipped: the reference {reference} is unusable ({why}); nothing to compare with.\n\n"
                       + skipped_list(unusable, dataset, cfg.profile), [f"inference not measured: {reference} {why}"])
    ref = loaded[reference]
    test = data.split

    # One untimed pass per model: the predictions the FLOP ratios and depth groups come from (and a warm-up).
    preds = {name: m.run(test) for name, m in loaded.items()}
    dht_names = [n for n, m in loaded.items() if m.kind == "dht" and n != reference]
    runners: dict[str, Callable[[], float]] = {name: (lambda m=m: m.run(test).seconds) for name, m in loaded.items()}
    for name in dht_names:
        policy = loaded[name].policy

        def run_shared(m: Loaded = loaded[name], pol: Policy = policy) -> float:
            with shared_head_sets(pol):
                return m.run(test).seconds

        runners[f"{name} [one head set per count]"] = run_shared
        runners[f"{name} [12-VaBERT in its depth groups]"] = (
            lambda layers=preds[name].layers: full_model_in_groups(ref.model, test, device, batch, layers))
    with shared_head_sets_all(loaded, dht_names):
        shared_preds = {n: loaded[n].run(test) for n in dht_names}
    print(f"[inference] {len(runners)} runners x {args.warmup + args.repeats} rounds on {len(test)} test samples",
          flush=True)
    timing = interleaved(runners, reference, args.repeats, args.warmup)
    decisions = {n: median_decision_seconds(lambda m=loaded[n]: m.run(test), max(1, args.repeats // 2))
                 for n in [reference, *dht_names]}

    conf = ref.model.config
    rows, dht_rows, shortfalls = [], [], []
    t_ref = timing.median(reference)
    for name in loaded:
        flops = evaluate(preds[name], test, conf, seq_len, None)["infer_flop_ratio"]
        recorded = read_metric(root / "results" / run_subdir(cfg, dataset, name, cfg.training_seeds[0]) / "metrics.json",
                               "infer_flop_ratio")
        wall = timing.ratio(name)
        lo, hi = timing.spread(name)
        goal = "—"
        if name in dht_names:
            goal = "yes" if wall <= WALL_GOAL * flops else "**no**"
        rows.append([name, fmt_seconds(timing.median(name)), f"{wall:.2f}x ({lo:.2f}-{hi:.2f})", fmt_ratio(flops),
                     fmt_ratio(recorded), f"{wall / flops:.2f}", goal])
        if name not in dht_names:
            continue
        trimmed = trimmed_flop_ratio(preds[name], test, conf, batch)
        shared_flops = evaluate(shared_preds[name], test, conf, seq_len, None)["infer_flop_ratio"]
        heads_cost = statistics.median(
            a - b for a, b in zip(timing.ratios[name], timing.ratios[f"{name} [one head set per count]"], strict=True)
        ) - (flops - shared_flops)
        grouped = timing.ratio(f"{name} [12-VaBERT in its depth groups]") - 1.0
        decide_s = decisions[name]
        causes = {
            "bandit decisions at inference": decide_s / t_ref,
            "per-sample head sets (vs one set per head count)": heads_cost,
            "depth groups: smaller matrices after the b shared layers": grouped * flops,
            "padding (FLOPs at trimmed widths - at max_length)": trimmed - flops,
        }
        unexplained = wall - flops - sum(causes.values())
        groups_per_batch = mean_groups(preds[name].layers, batch)
        dht_rows.append([name, fmt_ratio(flops), fmt_ratio(trimmed), fmt_ratio(wall),
                         f"{decide_s * 1e3:.1f} ms ({fmt_pct(causes['bandit decisions at inference'])})",
                         f"{heads_cost:+.3f}", f"{groups_per_batch:.1f} / {grouped:+.1%}",
                         f"{unexplained:+.3f}"])
        if wall > WALL_GOAL * flops:
            named = sorted(((v, k) for k, v in causes.items() if v > 0.01), reverse=True)
            cause = "; ".join(f"{k} {v:+.3f}" for v, k in named) or "no single measured cause above 0.01"
            if unexplained > 0.01:
                cause += (f"; unattributed {unexplained:+.3f} (costs FLOPs do not count: embeddings, LayerNorm, "
                          "GELU, softmax, weight slicing, per-call dispatch of small matrices on CPU)")
            shortfalls.append(f"inference {name}: wall {wall:.2f}x for {flops:.2f}x FLOPs "
                              f"({wall / flops:.2f} > {WALL_GOAL}); measured causes (in 12-VaBERT time): {cause}")

    body = [
        f"Test split `{processed.relative_to(root) if processed.is_relative_to(root) else processed}/test.parquet`"
        f" ({len(test)} samples, max_length {seq_len}, longest sample {data.width} tokens), batch size "
        f"{batch} (`train.eval_batch_size`), inference policy `{cfg.dht.inference}`. Times are what the pipeline's "
        f"predict functions measure (`infer_seconds`); median of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up, ratio to {reference} in the same round (min-max in brackets).",
        "",
        "FLOP ratio: recomputed here by `dht.evaluation.evaluate` from this run's predictions (the pipeline's "
        "function, reference = 12-VaBERT's full model at max_length); metrics.json: the value the pipeline wrote "
        "in `results/<dataset>/<model>/metrics.json` (— when absent; it differs only if the data or model "
        "changed since). Goal: DHT modes' wall ratio <= 1.25 x FLOP ratio.",
        "",
        table(["model", "time", "wall ratio", "FLOP ratio", "metrics.json", "wall / FLOPs", "goal met"], rows),
        "",
    ]
    if dht_rows:
        body += [
            "### Where DHT's time goes beyond its FLOPs",
            "",
            "Each column is measured in the same rounds, in units of 12-VaBERT's time so that they compare with "
            "the wall ratio: *decisions* = the bandits inside predict (pooling, normalisation, UCB/TSB "
            "selection; timers around `Policy.choose_arms/choose_heads/layers_of`); *head sets* = wall ratio "
            "minus the same model's with one head set per head count (the TSB still decides; FLOP difference "
            "removed); *groups* = mean depth groups per batch / how much slower 12-VaBERT runs when split into "
            "the same groups after the b shared layers; *unattributed* = wall - FLOPs - the measured causes "
            "(padding = FLOPs at trimmed widths - FLOPs at max_length, and the groups' cost scaled by the FLOP "
            "ratio).",
            "",
            table(["model", "FLOPs", "FLOPs at trimmed widths", "wall", "decisions", "head sets", "groups",
                   "unattributed"], dht_rows),
            "",
        ]
    body += [skipped_list(unusable, dataset, cfg.profile), "", shortfall_text(shortfalls, "inference goal")]
    return Section(title, "\n".join(body), shortfalls)
