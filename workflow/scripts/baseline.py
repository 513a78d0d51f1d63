"""Stage `baseline`: one baseline of Table 2 built from the trained reference (run.reference) on one dataset:
distil-<layers> (DistilBERT, BL2), fastbert-<speed> (FastBERT, BL3), nas-prune-<ratio> (differentiable NAS
pruning) or flexibert-<ratio> (the best FlexiBERT architecture of the dataset's search within that FLOP ratio,
retrained), each built by its module through dht.baselines.run_baseline and run on the test and the validation
split. Writes results/<dataset>/<model>/ metrics.json (the DHT runs' schema, val_accuracy included; a baseline
built from the reference is charged the reference's training too, read from its metrics.json), predictions.csv
(test split) and models/<dataset>/<model>/."""

import json
import shutil
import sys
import time
from pathlib import Path

import _stage

from dht.baselines import (
    KINDS,
    BaselineError,
    BaselineJob,
    finish_model_dir,
    load_reference,
    run_baseline,
    run_params,
)
from dht.config import parse_baseline
from dht.curves import choose, recorded, trace
from dht.evaluation import SplitData, accuracy_text
from dht.results import baseline_metrics, read_start, run_name, run_subdir, write_results
from dht.tokenization import load_processed
from dht.tracking import log_curves, log_model, log_run_metrics, stage_run

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True,
               help=", ".join(f"{b.kind}-<{b.value.placeholder}>" for b in KINDS.values()))
p.add_argument("--processed", required=True)
p.add_argument("--teacher", default=None,
               help="the trained reference's model directory (default: models/<dataset>/<run.reference>, with "
                    "the seed's level when run.training_seeds lists several)")
p.add_argument("--teacher-metrics", default=None,
               help="the trained reference's metrics.json, whose training a baseline built from it is charged "
                    "(default: results/<dataset>/<run.reference>/metrics.json, with the seed's level when "
                    "run.training_seeds lists several)")
p.add_argument("--results", required=True)
p.add_argument("--out-model", required=True)
p.add_argument("--search", default=None, help="flexibert-<ratio>: the dataset's flexibert_search output directory")
_stage.add_threads(p)
_stage.add_seed(p)
args = p.parse_args()
cfg = _stage.config(args)
cfg.dataset(args.dataset)
_stage.stop_cleanly(f"baseline {args.dataset}/{args.model}")
try:
    kind, value = parse_baseline(args.model)
except ValueError as err:
    sys.exit(f"error: {err}")

device, _ = _stage.runtime(args, cfg)
teacher_dir = (Path(args.teacher) if args.teacher
               else _stage.root() / "models" / run_subdir(cfg, args.dataset, cfg.run.reference, cfg.training_seed))
try:
    teacher = load_reference(cfg, args.dataset, teacher_dir, device)
except BaselineError as err:
    sys.exit(f"error: --teacher {err}")
reference_metrics = None  # what the baseline starts from: the reference, for most kinds
if KINDS[kind].starts_from_reference:  # read before training: a file without the budget stops the job now
    teacher_metrics = (Path(args.teacher_metrics) if args.teacher_metrics else _stage.root() / "results"
                       / run_subdir(cfg, args.dataset, cfg.run.reference, cfg.training_seed) / "metrics.json")
    try:
        reference_metrics = read_start(teacher_metrics)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: --teacher-metrics {err}")
processed = Path(args.processed)
meta = json.loads((processed / "meta.json").read_text())
train = SplitData.from_arrays(load_processed(processed, "train"))
val = SplitData.from_arrays(load_processed(processed, "val"))  # evaluated for metrics.json only, never trained on
test = SplitData.from_arrays(load_processed(processed, "test"))
out_model = Path(args.out_model)
if out_model.exists():
    shutil.rmtree(out_model)
job = BaselineJob(cfg, teacher, train, val, meta, device, out_model, Path(args.search) if args.search else None)

with stage_run(args.dataset, run_name(cfg, args.model, cfg.training_seed), stage="baseline", profile=cfg.profile,
               params=run_params(cfg, args.dataset, args.model, device), prefix=cfg.tracking.experiment_prefix) as run:
    import mlflow

    start = time.perf_counter()
    try:
        built = run_baseline(kind, value, job)
    except BaselineError as err:
        sys.exit(f"error: {err}")
    predictions = built.predict(test)
    seconds = time.perf_counter() - start
    val_predictions = built.predict(val) if len(val) else None  # the same inference, outside the timed build
    if built.params:
        mlflow.log_params(built.params)
    metrics = baseline_metrics(predictions, test, teacher.config, meta, built.train_flops,
                               job.reference_train_flops, seconds, built.epochs, reference_metrics,
                               val=(val_predictions, val))
    if built.dial is not None and len(val) and reference_metrics is not None:  # FastBERT's speed (dht.curves)
        dial = built.dial
        curve = trace(dial.predict_at, dial.values, val, test, teacher.config, meta["max_length"])
        chosen = choose(curve, reference_metrics["val_accuracy"], dial.within)
        metrics.update(recorded(curve, chosen))
        print(f"baseline {args.dataset}/{args.model}: {dial.name} {chosen['dial']:g} chosen on the validation split "
              f"({chosen['rule']}): test accuracy {chosen['accuracy']:.4f} at {chosen['infer_flop_ratio']:.2f}x")
    write_results(args.results, metrics, predictions, test)
    # the tokenizer, baseline.json (where the teacher is, for FastBERT's students) and last the checksums
    finish_model_dir(out_model, processed / "tokenizer", {
        "model_name": args.model, "dataset": args.dataset, "classes": meta["classes"],
        "max_length": meta["max_length"], "results": args.results, "history": built.history}, teacher_dir)
    log_run_metrics(metrics)  # the headline first, then the curves per optimizer step (dht.tracking says why)
    log_curves(run.info.run_id, built.curves)
    if cfg.train.log_model:  # with the teacher, for a kind whose model runs on it
        log_model(out_model, teacher_dir if KINDS[kind].runs_on_teacher else None)
print(f"baseline {args.dataset}/{args.model}: accuracy {accuracy_text(metrics)}, train FLOPs "
      f"{metrics['train_flop_ratio_total']:.2f}x in total ({metrics['train_flop_ratio']:.2f}x its own), inference FLOPs "
      f"{metrics['infer_flop_ratio']:.2f}x, mean layers {metrics['mean_layers']:.1f} ({seconds:.0f}s)")
