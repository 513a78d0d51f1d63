"""Stage `baseline`: one baseline of Table 2 built from the trained reference (run.reference) on one dataset:
distil-<layers> (DistilBERT, BL2), fastbert-<speed> (FastBERT, BL3) or nas-prune-<ratio> (differentiable NAS
pruning) and flexibert-<ratio> (the best FlexiBERT architecture of the dataset's search within that FLOP ratio,
retrained). Writes results/<dataset>/<model>/metrics.json (the DHT runs' schema), predictions.csv and
models/<dataset>/<model>/."""

import json
import shutil
import sys
import time
from pathlib import Path

import _stage

from dht.config import parse_baseline
from dht.evaluation import accuracy_text, write_predictions
from dht.flops import full_model_flops
from dht.integrity import IntegrityError, load_checked_model, retrain_hint, write_manifest
from dht.results import run_name, run_subdir
from dht.tokenization import load_processed
from dht.tracking import stage_run
from dht.trainer import POLICY_FILE, SplitData, evaluate

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
train_arrays, test_arrays = load_processed(processed, "train"), load_processed(processed, "test")
train, test = SplitData.from_arrays(train_arrays), SplitData.from_arrays(test_arrays)
try:  # checked against its checksums.sha256 first (dht.integrity)
    teacher = load_checked_model(teacher_dir, retrain_hint({"results": f"results/{run_subdir(cfg, args.dataset, cfg.run.reference, cfg.seed)}"}))
except IntegrityError as err:
    sys.exit(f"error: --teacher {teacher_dir}: {err}")
teacher = teacher.to(device).eval()
reference_train = full_model_flops(seq_len, teacher.config, "full", "train") * len(train) * cfg.train.epochs
batch, eval_batch = cfg.train.batch_size, cfg.train.eval_batch_size
out_model = Path(args.out_model)
if out_model.exists():
    shutil.rmtree(out_model)
section = {"distil": "distil", "fastbert": "fastbert", "nas-prune": "nas_prune", "flexibert": "flexibert"}[kind]
params = {"model_name": args.model, "dataset": args.dataset, "seed": cfg.seed, "device": str(device),
          "baseline.kind": kind, "baseline.value": value, "baselines": cfg.section(f"baselines.{section}"),
          "model": cfg.section("model"), "train": cfg.section("train")}

with stage_run(args.dataset, run_name(cfg, args.model, cfg.seed), stage="baseline", profile=cfg.profile, params=params,
               prefix=cfg.tracking.experiment_prefix) as run:
    import mlflow

    start = time.perf_counter()
    if kind == "distil":
        from dht.baselines.distil import distill, predict_student, student_from_teacher

        c = cfg.baselines.distil
        model = student_from_teacher(teacher, int(value))
        info = distill(model, teacher, train, epochs=c.epochs, lr=c.learning_rate, temperature=c.temperature,
                      alpha_kd=c.alpha_kd, alpha_ce=c.alpha_ce, alpha_cos=c.alpha_cos, batch_size=batch,
                      device=device, seed=cfg.seed, seq_len=seq_len)
        train_flops, history = info["train_flops"], info["loss_per_epoch"]
        pred = predict_student(model, test, device, eval_batch, seq_len)
        model.save_pretrained(out_model)
    elif kind == "fastbert":
        from dht.baselines.fastbert import FastBERT, distill, predict_fastbert

        c = cfg.baselines.fastbert
        # FastBERT's branch classifier is 128 wide on BERT-base (768): keep that proportion on smaller models,
        # or a 128-wide classifier costs more than the layers it lets a sample skip (docs/baselines-fastbert.md).
        width = c.classifier_size or max(8, round(teacher.config.hidden_size * 128 / 768))
        model = FastBERT(teacher, cla_hidden_size=width)
        info = distill(model, train, c.epochs, c.learning_rate, batch, device, cfg.seed, seq_len=seq_len)
        train_flops = info["train_flops"]
        history = info["epoch_kl"]
        pred = predict_fastbert(model, test, value, device, eval_batch, seq_len)
        model.save(out_model)
    elif kind == "flexibert":
        from dht.flexibert.pipeline import choose, predictions, retrain, search_train_flops

        if not args.search:
            sys.exit("error: flexibert baselines need --search (the flexibert_search stage's output directory)")
        trace = json.loads((Path(args.search) / "trace.json").read_text())["queries"]
        try:
            arch = choose(trace, value)
        except ValueError as err:
            sys.exit(f"error: {err}")
        mlflow.log_param("arch_id", arch.id)
        model, info = retrain(cfg, arch, train_arrays, test_arrays, meta, device)
        # The search's training counts too, as NAS pruning's does: it is what finding the architecture cost.
        train_flops = search_train_flops(trace) + info["train_flops"]
        history = [info["train_loss"]]
        pred = predictions(model, test, eval_batch, seq_len, device)
        model.save_pretrained(out_model)
    else:
        from dht.baselines.nas_prune import extract, finetune, predict_pruned, search

        c = cfg.baselines.nas_prune
        found = search(teacher, train, value, c.lambda_cost, c.tolerance, c.search_epochs, c.lr_weights, c.lr_arch,
                       batch, device, cfg.seed, seq_len)
        model = extract(teacher, found)
        tuned = finetune(model, teacher, train, c.finetune_epochs, c.lr_weights, c.temperature, c.alpha_kd, batch,
                         device, cfg.seed, seq_len=seq_len)
        train_flops = found.train_flops + tuned["train_flops"]
        history = tuned["loss_per_epoch"]
        pred = predict_pruned(model, test, device, eval_batch, seq_len)
        model.save(out_model)
        found.save(out_model / "search")
    seconds = time.perf_counter() - start

    metrics = evaluate(pred, test, teacher.config, seq_len, meta.get("difficulty_names"))
    metrics.update({"train_flop_ratio": train_flops / reference_train, "train_seconds": round(seconds, 3)})
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
