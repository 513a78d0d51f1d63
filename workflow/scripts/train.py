"""Stage `train`: one DHT mode (or a fixed one: the reference, the shallow control) on one dataset: train
(Algorithms 2-3), evaluate with the inference policy on the test split and the validation split (val_accuracy),
write results/<dataset>/<model>/ (metrics.json, selections.json, loss.csv, predictions.csv of the test split) and
models/<dataset>/<model>/. Resumes after a kill. A study's run (workflow/rules/studies.smk) is this stage with
``--overlay`` (its setting's overlay, dht.studies), ``--study``, ``--setting`` and ``--split val``: evaluated on the
validation split alone (metrics.json's "split": "val"; the test split is not read), in the MLflow experiment
``<dataset>.study.<study>`` with the overlay among its params. Under torchrun
(train.distributed.nproc_per_node > 1) every rank trains; rank 0 alone logs, evaluates and writes."""

import json
import os
import sys
from pathlib import Path

import _stage

from dht import distributed
from dht.arm_features import load_arm_features
from dht.config import run_param_keys
from dht.curves import choose, recorded, trace
from dht.evaluation import SplitData, accuracy_text
from dht.policy import predict
from dht.results import read_start, run_name, run_subdir, training_metrics, write_results
from dht.tokenization import load_processed
from dht.tracking import log_curves, log_model, log_run_metrics, stage_run, training_curves
from dht.trainer import Trainer, TrainingError, export_trained, fingerprint, initial_model, run_params
from dht_workflow.dvc_params import check_dvc_keys

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--model", required=True, help="a mode of dht.modes (e.g. run.reference, t-dht, s-dht, f-dht, p-dht)")
p.add_argument("--processed", required=True)
p.add_argument("--features", required=True)
p.add_argument("--results", required=True)
p.add_argument("--out-model", required=True)
p.add_argument("--checkpoints", default="checkpoints")
p.add_argument("--split", choices=["test", "val"], default="test",
               help="the split metrics.json and predictions.csv are of: test (the pipeline's tables; val_accuracy "
                    "beside) or val (a study's run, which chooses settings: the test split is not read)")
p.add_argument("--reference-model", default=None,
               help="init: reference: the trained reference's model directory (default or empty: the pipeline's models/<run>)")
p.add_argument("--reference-metrics", default=None, help="and its metrics.json (default: results/<run>/metrics.json)")
_stage.add_overlay(p)
p.add_argument("--study", default=None, help="with --overlay: the study (workflow/studies.yaml) this run is of")
p.add_argument("--setting", default=None, help="with --overlay: the study's setting (the overlay's name)")
_stage.add_threads(p)
_stage.add_seed(p)
args = p.parse_args()
cfg = _stage.config(args)
cfg.dataset(args.dataset)
if args.model not in cfg.dht.modes:
    sys.exit(f"error: --model {args.model!r} is not a mode; allowed: {', '.join(cfg.dht.modes)}")
if problem := check_dvc_keys(_stage.root(), run_param_keys(cfg, args.model), cfg.profile):  # under dvc repro
    sys.exit(f"error: {problem}")

device, threads = _stage.runtime(args, cfg)
try:
    world = distributed.start(cfg, device)
except distributed.DistributedError as err:
    sys.exit(f"error: {err}")
if world.size > 1:
    from dht.runtime import configure_threads

    device = world.device
    configure_threads(max(1, threads // world.size))  # the rule's threads are shared by its ranks
processed, features = Path(args.processed), Path(args.features)
meta = json.loads((processed / "meta.json").read_text())
train = SplitData.from_arrays(load_processed(processed, "train"))
val = SplitData.from_arrays(load_processed(processed, "val"))  # evaluated for metrics.json only, never trained on
if args.split == "val" and not len(val):
    sys.exit(f"error: {processed}/val.parquet is empty (data.val_fraction = 0): a study is scored on the validation "
             "split; set data.val_fraction above 0 and rerun the data stages")
test = SplitData.from_arrays(load_processed(processed, "test")) if args.split == "test" else None
try:  # dht.modes.<mode>.init (docs/training.md T30): the initial model, or the trained reference
    model, reference = initial_model(cfg, args.model, args.dataset, features / "init_model",
                                     Path(args.reference_model) if args.reference_model else None,
                                     Path(args.reference_metrics) if args.reference_metrics else None)
except TrainingError as err:
    sys.exit(f"error: {err}")
if reference is not None and world.is_main:
    print(f"train {args.dataset}/{args.model}: starting from the trained reference in {reference.model_dir}")
arm_features = load_arm_features(features)
run_fp = fingerprint(cfg, args.model, args.dataset,
                     {"data": meta["splits"], "features": json.loads((features / "meta.json").read_text())["sizes"],
                      **({"reference": reference.digest} if reference else {})})
trainer = Trainer(cfg, args.model, model, arm_features, train, device, seq_len=meta["max_length"],
                  checkpoint_dir=Path(args.checkpoints) / run_subdir(cfg, args.dataset, args.model, cfg.training_seed),
                  run_fingerprint=run_fp, world=world)
if os.environ.get(distributed.TRACE_ENV):
    trainer.trace = {}
try:
    resumed = trainer.load_checkpoint()
except TrainingError as err:
    sys.exit(f"error: {err}")
reference_val_accuracy = None  # T31's curve: its price is chosen against the reference's, read before training
if cfg.dht.modes[args.model].prices is not None and args.split == "test" and world.is_main:
    ref_file = (Path(args.reference_metrics) if args.reference_metrics else _stage.root() / "results"
                / run_subdir(cfg, args.dataset, cfg.run.reference, cfg.training_seed) / "metrics.json")
    try:
        reference_val_accuracy = (reference.metrics if reference else read_start(ref_file))["val_accuracy"]
    except (FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f"error: dht.modes.{args.model}.prices: the reference's validation accuracy: {err}")
if resumed and world.is_main:
    pr = trainer.progress
    print(f"train {args.dataset}/{args.model}: resuming at epoch {pr.epoch + 1}, step {pr.step} from {trainer.checkpoint_dir}")

if not world.is_main:  # the other ranks train, then leave the rest to rank 0
    try:
        trainer.fit(progress_bar=False)
    except TrainingError as err:
        sys.exit(f"error: rank {world.rank}: {err}")
    distributed.write_trace(world, trainer.trace, trainer.digests)
    trainer.close_distributed()
    sys.exit(0)

params = {"model_name": args.model, "dataset": args.dataset, **run_params(cfg, args.model), "device": str(device)}
study, setting = args.study, args.setting
if study:  # a study's run: its own experiment, the setting's overlay among the params (flattened: overlay.*)
    params.update({"study": study, "setting": setting, "overlay": json.loads(args.overlay or "{}")})

name = run_name(cfg, args.model, cfg.training_seed)
with stage_run(args.dataset, f"{setting}/{name}" if setting else name, stage="train", profile=cfg.profile,
               params=params, prefix=cfg.tracking.experiment_prefix, run_id=trainer.progress.run_id,
               study=study, tags={"study": study, "setting": setting} if study else None) as run:
    import mlflow

    trainer.progress.run_id = run.info.run_id
    try:
        progress = trainer.fit()
    except TrainingError as err:
        sys.exit(f"error: {err}")
    distributed.write_trace(world, trainer.trace, trainer.digests)
    trainer.close_distributed()
    mode = cfg.dht.modes[args.model]
    curve, chosen = None, None
    if mode.prices is not None:  # T31's dial: the curve over its prices, the one chosen on the validation split
        def predict_at(price, data):
            trainer.policy.stop_price = price
            return predict(trainer.model, trainer.policy, data, device, cfg.train.eval_batch_size,
                           meta["max_length"], greedy=cfg.dht.inference == "greedy")

        curve = trace(predict_at, mode.prices, val, test, trainer.model.config, meta["max_length"])
        if args.split == "test":
            chosen = choose(curve, reference_val_accuracy, mode.chosen_within)
            print(f"train {args.dataset}/{args.model}: price {chosen['dial']:g} chosen on the validation split "
                  f"({chosen['rule']}: val accuracy {chosen['val_accuracy']:.4f} at {chosen['val_infer_flop_ratio']:.2f}x"
                  f"{'' if chosen['met'] else '; no price met it, the most accurate taken'})")
        trainer.policy.stop_price = chosen["dial"] if chosen else trainer.policy.bandit_cfg.depth_price
    scored = test if args.split == "test" else val  # what metrics.json and predictions.csv are of
    pred = predict(trainer.model, trainer.policy, scored, device, cfg.train.eval_batch_size, meta["max_length"],
                   greedy=cfg.dht.inference == "greedy")
    if args.split == "test":
        # the validation split with the same policy, after the test split (whose predictions stay what they were)
        val_pred = predict(trainer.model, trainer.policy, val, device, cfg.train.eval_batch_size,
                           meta["max_length"], greedy=cfg.dht.inference == "greedy") if len(val) else None
        metrics = training_metrics(cfg, pred, test, trainer.model.config, meta, progress,
                                   reference.metrics if reference else None, val=(val_pred, val))
    else:
        metrics = training_metrics(cfg, pred, val, trainer.model.config, meta, progress,
                                   reference.metrics if reference else None)
        metrics["n_val"] = metrics.pop("n_test")  # evaluate() names its split's size n_test
        metrics.update({"split": "val", "study": study, "setting": setting, "overlay": params.get("overlay", {})})
    if curve is not None:
        metrics.update({"stop_price": trainer.policy.stop_price, **recorded(curve, chosen)})
    export_trained(Path(args.out_model), trainer, cfg,
                   {"dataset": args.dataset, "classes": meta["classes"], "max_length": meta["max_length"],
                    "results": args.results}, processed / "tokenizer", features / "arm_features.safetensors")
    # last: metrics.json marks the run as done
    results = write_results(args.results, metrics, pred, scored, progress)

    # the headline first, then the curves, from the history the checkpoints kept (dht.tracking says why)
    log_run_metrics(metrics)
    log_curves(run.info.run_id, training_curves(progress))
    mlflow.log_artifact(str(results / "selections.json"))
    if cfg.train.log_model and not study:  # a study's model stays in models/studies/ (no copy per run in MLflow)
        log_model(args.out_model)
trainer.remove_checkpoint()
print(f"train {args.dataset}/{args.model}{f' ({study}/{setting}, validation split)' if study else ''}: "
      f"accuracy {accuracy_text(metrics)}, macro-F1 {metrics['macro_f1']:.3f}, "
      f"train FLOPs {metrics['train_flop_ratio']:.2f}x, inference FLOPs {metrics['infer_flop_ratio']:.2f}x, "
      f"mean layers {metrics['mean_layers']:.1f} ({progress.seconds:.0f}s)")
