"""Benchmarks: are DHT's savings real, not only counted? Wall time next to analytic FLOPs, in one run.

Usage:
  .venv/bin/python benchmarks/run.py [--profile default] [--dataset embedded-news] [--out reports/benchmarks.md]
      [--repeats N] [--threads 1] [--quick] [--skip-pipeline] [--skip-suite] [--pipeline-profile default|tiny]

It writes a generated markdown report (default reports/benchmarks.md; a machine description at the top) and
prints each section's tables as it finishes. Four sections:

1. Inference. Every model the profile trains (12-VaBERT, the DHT modes, FastBERT speeds, DistilBERT students,
   NAS-pruned models) found in models/<dataset>/ runs the pipeline's own evaluation path on the test split
   (data/processed/<dataset>/test.parquet) at the profile's train.eval_batch_size: load_trained + predict for
   12-VaBERT and DHT, predict_student / predict_fastbert / predict_pruned for the baselines. The time is the
   one those functions measure around their inference loop (what results/.../metrics.json calls
   infer_seconds). Each wall-time ratio to 12-VaBERT stands next to the analytic inference FLOP ratio,
   recomputed by dht.evaluation.evaluate from this run's predictions (the function and inputs the pipeline uses;
   metrics.json's value is shown beside it). Goal of the issue: for each DHT mode, wall ratio <= 1.25 x FLOP
   ratio. To name the cause of a miss, three counterfactuals are timed in the same rounds: the DHT model with
   one head set per head count instead of per-sample TSB sets (same FLOPs), 12-VaBERT split into the DHT's
   depth groups (same structure, all layers and heads), and the bandits' decision time inside predict.
2. Training. One short epoch (--train-steps x train.batch_size samples) of each DHT mode and of 12-VaBERT
   through dht.trainer.Trainer.fit, each from the same initial weights (data/features/<dataset>/init_model)
   and arm features; wall-time ratio to 12-VaBERT next to the training FLOP ratio the trainer counts for
   those same steps (the pipeline's train_flop_ratio). P-DHT runs its own phase (after the warm-up, whose
   steps are F-DHT's row). Timers wrapped around the bandit, pooling and queue methods at runtime (dht/ is
   not edited) give their share of the step time; goal < 3%.
3. Pipeline. A cold `snakemake --cores 4 reports/table1.md` in a throw-away copy of the project, then an
   immediate no-op rerun (goal < 10 s); and the test suite's duration (`pytest -q`). Slow: --skip-pipeline,
   --skip-suite, --pipeline-profile.
4. Scaling. Random-init models of the profile's architecture (no trained model needed): inference and one
   training step of a DHT mode (--scaling-mode, arms drawn uniformly at random, since untrained bandits pick
   arbitrarily) against 12-VaBERT as sequence length and batch size grow, each as a ratio with its FLOP ratio.

How it times: all runners of a section run once per round, the order rotated by one each round (A B C, B C A,
...), rounds repeated --repeats times after --warmup discarded rounds; each ratio is taken against the
reference run of the same round and the median over rounds is reported (with min-max), so load drift on a
shared machine hits every model alike. One torch thread by default (--threads 1): with two, OpenMP threads
stall at barriers whenever another job holds a core, which adds noise larger than the effects measured here;
the report records the threads, the device and the load average. Section 1 reuses the pipeline's timers;
sections 2 and 4 time with time.perf_counter (and synchronise a GPU first). It measures and asserts nothing;
--quick (2 rounds, a small grid, no pipeline or suite) lists missing models as skipped instead of stopping.
Timers wrapped around library methods cost under a microsecond per call (0.4 us measured), negligible
against a step's milliseconds; they are removed when a section ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# transformers draws a progress bar for every model load: noise in a benchmark log.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

# This script is the entry point: its arguments and main(). Each section is a module of sections/ (inputs.py holds
# what they read), report.py renders the report, _common.py times and formats. benchmarks/ is not a package:
# its directory goes on the path, also when the script is imported by path (the test).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_description  # noqa: E402
from report import Section, render  # noqa: E402
from sections.inference import inference_section  # noqa: E402
from sections.inputs import BenchmarkError  # noqa: E402
from sections.pipeline_times import pipeline_times_section  # noqa: E402
from sections.scaling import scaling_section  # noqa: E402
from sections.training import training_section  # noqa: E402

from dht.config import ConfigError  # noqa: E402
from dht.config_loading import load_config  # noqa: E402
from dht.tracking import git_commit  # noqa: E402

SECTIONS = ("inference", "training", "scaling", "pipeline")  # in the order they run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None, help="params.yaml profile (default: its `profile:` key)")
    p.add_argument("--dataset", default=None, help="a dataset the profile runs (default: its first)")
    p.add_argument("--out", default="reports/benchmarks.md", help="the report (relative to --root)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before the timed ones")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared machine)")
    p.add_argument("--quick", action="store_true",
                   help="few repeats, small scaling grid, no pipeline or suite; missing models are skipped")
    p.add_argument("--skip-pipeline", action="store_true", help="skip the cold and no-op snakemake runs")
    p.add_argument("--skip-suite", action="store_true", help="skip timing the test suite")
    p.add_argument("--pipeline-profile", choices=["default", "tiny"], default="default",
                   help="profile of the cold pipeline run (default: default, ~12 min on 2 cores)")
    p.add_argument("--root", default=str(REPO), help="project holding models/, data/, results/ (default: this repo)")
    p.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training samples = this x train.batch_size, one epoch (default 24, --quick 3)")
    p.add_argument("--max-test", type=int, default=None, help="use the first N test samples (default: all)")
    p.add_argument("--scaling-mode", default="f-dht", help="the DHT mode of the scaling section")
    p.add_argument("--scaling-seq", type=int, nargs="+", default=None, help="sequence lengths (default 32 64 128)")
    p.add_argument("--scaling-batch", type=int, nargs="+", default=None, help="batch sizes (default 8 32 128)")
    p.add_argument("--keep-pipeline-copy", action="store_true", help="keep the throw-away project of section 3")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="the sections to run (default: all four); the report holds only those")
    args = p.parse_args(argv)
    if args.quick:
        args.skip_pipeline = args.skip_suite = True
    # Defaults that depend on --quick; explicit values win.
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.train_steps is None:
        args.train_steps = 3 if args.quick else 24
    args.scaling_seq = args.scaling_seq or ([16, 32] if args.quick else [32, 64, 128])
    args.scaling_batch = args.scaling_batch or ([4, 8] if args.quick else [8, 32, 128])
    if args.repeats < 1 or args.warmup < 0 or args.train_steps < 1:
        p.error("--repeats and --train-steps must be >= 1, --warmup >= 0")
    if min(args.scaling_seq) < 1 or min(args.scaling_batch) < 1:
        p.error("--scaling-seq and --scaling-batch take positive sizes")
    return args


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    root = Path(args.root).resolve()
    params = Path(args.params) if args.params else root / "params.yaml"
    try:
        # a profile of several training seeds: its first seed's run (the models section 1 reads, section 2's training)
        cfg = load_config(params, profile=args.profile)
        cfg = cfg.for_training_seed(cfg.training_seeds[0])
        if args.dataset is None:
            args.dataset = cfg.run.datasets[0]
        cfg.dataset(args.dataset)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    from dht.runtime import resolve_device

    device = resolve_device(cfg.device)
    machine = machine_description(device, git_commit(REPO))
    out = Path(args.out)
    out = out if out.is_absolute() else root / out
    sections: list[Section] = []
    try:
        makers = {"inference": lambda: inference_section(cfg, args, root, device),
                  "training": lambda: training_section(cfg, args, root, device),
                  "scaling": lambda: scaling_section(cfg, args, device),
                  "pipeline": lambda: pipeline_times_section(args)}
        for name in SECTIONS:
            if name not in args.sections:
                continue
            section = makers[name]()
            sections.append(section)
            print("\n" + section.markdown(), flush=True)
    except BenchmarkError as err:
        raise SystemExit(f"error: {err}") from None
    sections.sort(key=lambda s: s.title)  # numbered titles: the report reads 1, 2, 3, 4
    report = render(args, cfg, device, sections, machine, time.perf_counter() - started, argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
