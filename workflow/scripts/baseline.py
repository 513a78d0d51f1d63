"""Stage `baseline`: one baseline of Table 2 built from the trained reference (run.reference) on one dataset:
distil-<layers> (DistilBERT, BL2), fastbert-<speed> (FastBERT, BL3), nas-prune-<ratio> (differentiable NAS
pruning) or flexibert-<ratio> (the best FlexiBERT architecture of the dataset's search within that FLOP ratio,
retrained), each built by its module through dht.baselines.run_baseline. Writes results/<dataset>/<model>/
metrics.json (the DHT runs' schema), predictions.csv and models/<dataset>/<model>/."""

import json
import shutil
import sys
import time
from pathlib import Path

import _stage

from dht.baselines import KINDS, BaselineError, BaselineJob, run_baseline
from dht.config import parse_baseline
from dht.evaluation import SplitData, accuracy_text, evaluate, write_predictions
from dht.flops import full_model_flops
from dht.integrity import IntegrityError, load_checked_model, retrain_hint, write_manifest
from dht.results import run_name, run_subdir
from dht.tokenization import load_processed
from dht.tracking import stage_run
from dht.trainer import POLICY_FILE

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True,
               help="distil-<layers>, fastbert-<speed>, nas-prune-<ratio> or flexibert-<ratio>")
p.add_argument("--processed", required=True)
p.add_argument("--teacher", default=None,
               help="the trained reference's model directory (default: models/<dataset>/<run.reference>, with "
                    "the seed's level when run.seeds lists several)")
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

teacher_dir = (Path(args.teacher) if args.teacher
               else _stage.root() / "models" / run_subdir(cfg, args.dataset, cfg.run.reference, cfg.seed))
policy_file = teacher_dir / POLICY_FILE
trained_as = json.loads(policy_file.read_text()).get("mode_name") if policy_file.is_file() else None
if trained_as != cfg.run.reference:
    # The teacher is the reference by definition (its FLOPs are the 1.00x): a directory of another mode, or
    # none, would give baselines measured against the wrong model.
    sys.exit(f"error: --teacher {teacher_dir}: not the trained reference {cfg.run.reference!r} of run.reference "
             f"({policy_file} names {trained_as!r}); train it first (snakemake --cores 4 "
             f"results/{args.dataset}/{cfg.run.reference}/metrics.json)")

device, _ = _stage.runtime(args, cfg)
processed = Path(args.processed)
meta = json.loads((processed / "meta.json").read_text())
seq_len = meta["max_length"]
train = SplitData.from_arrays(load_processed(processed, "train"))
test = SplitData.from_arrays(load_processed(processed, "test"))
try:  # checked against its checksums.sha256 first (dht.integrity)
    teacher = load_checked_model(teacher_dir, retrain_hint({"results": f"results/{run_subdir(cfg, args.dataset, cfg.run.reference, cfg.seed)}"}))
except IntegrityError as err:
    sys.exit(f"error: --teacher {teacher_dir}: {err}")
teacher = teacher.to(device).eval()
reference_train = full_model_flops(seq_len, teacher.config, "full", "train") * len(train) * cfg.train.epochs
out_model = Path(args.out_model)
if out_model.exists():
    shutil.rmtree(out_model)
job = BaselineJob(cfg, teacher, train, test, meta, device, out_model, Path(args.search) if args.search else None)
params = {"model_name": args.model, "dataset": args.dataset, "seed": cfg.seed, "device": str(device),
          "baseline.kind": kind, "baseline.value": value,
          "baselines": cfg.section(f"baselines.{KINDS[kind].section}"),
          "model": cfg.section("model"), "train": cfg.section("train")}

with stage_run(args.dataset, run_name(cfg, args.model, cfg.seed), stage="baseline", profile=cfg.profile, params=params,
               prefix=cfg.tracking.experiment_prefix) as run:
    import mlflow

    start = time.perf_counter()
    try:
        built = run_baseline(kind, value, job)
    except BaselineError as err:
        sys.exit(f"error: {err}")
    seconds = time.perf_counter() - start
    pred, history = built.predictions, built.history
    if built.params:
        mlflow.log_params(built.params)

    metrics = evaluate(pred, test, teacher.config, seq_len, meta.get("difficulty_names"))
    metrics.update({"train_flop_ratio": built.train_flops / reference_train, "train_seconds": round(seconds, 3)})
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(results / "predictions.csv", pred, test)
    shutil.copytree(processed / "tokenizer", out_model / "tokenizer", dirs_exist_ok=True)
    (out_model / "baseline.json").write_text(json.dumps({"model_name": args.model, "kind": kind, "value": value,
                                                          "dataset": args.dataset, "classes": meta["classes"],
                                                          "history": history}, indent=2) + "\n")
    write_manifest(out_model)  # last: checksums of every file (dht.integrity)
    for epoch, loss in enumerate(history or [], start=1):
        mlflow.log_metric("train_loss", float(loss), step=epoch)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
    lo, hi = metrics["accuracy_ci95"]  # MLflow metrics are scalars
    mlflow.log_metrics({"accuracy_ci95_lo": lo, "accuracy_ci95_hi": hi})
    if cfg.train.log_model:
        mlflow.log_artifacts(str(out_model), artifact_path="model")
print(f"baseline {args.dataset}/{args.model}: accuracy {accuracy_text(metrics)}, inference FLOPs "
      f"{metrics['infer_flop_ratio']:.2f}x, mean layers {metrics['mean_layers']:.1f} ({seconds:.0f}s)")
