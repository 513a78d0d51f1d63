"""Stage `arm_features`: the initial model and its arm features (Section 4.2) in data/features/<dataset>/.
With dht.features.warmup_steps > 0 the features come from a copy of the initial model after that many plain
training steps; init_model/ is the untouched initial model that every training run starts from."""

import json
import sys
import time
from pathlib import Path

import _stage

from dht.arm_features import (
    arm_separation,
    arm_space,
    compute_arm_features,
    iter_batches,
    save_arm_features,
    warm_up,
)
from dht.config import arm_feature_keys
from dht.model import model_from_params
from dht.tracking import stage_run
from dht_workflow.dvc_params import check_dvc_keys

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--processed", required=True)
p.add_argument("--out", required=True)
_stage.add_threads(p)
args = p.parse_args()
cfg = _stage.config(args)
cfg.dataset(args.dataset)
if problem := check_dvc_keys(_stage.root(), arm_feature_keys(cfg), cfg.profile):  # under dvc repro
    sys.exit(f"error: {problem}")

device, threads = _stage.runtime(args, cfg)
meta = json.loads((Path(args.processed) / "meta.json").read_text())
model = model_from_params(cfg, num_labels=meta["num_labels"], vocab_size=meta["vocab_size"]).to(device)
out = Path(args.out)
model.save_pretrained(out / "init_model")

space = arm_space(cfg)
features_cfg = cfg.dht.features
params = {key: cfg.section(key) for key in arm_feature_keys(cfg)}  # what the rule tracks
with stage_run(args.dataset, "arm_features", stage="arm_features", profile=cfg.profile, params=params,
               prefix=cfg.tracking.experiment_prefix) as run:
    import mlflow

    start = time.perf_counter()
    warm = {}
    if features_cfg.warmup_steps:
        import torch

        from dht.tokenization import load_processed

        train = load_processed(args.processed, "train")
        model, warm = warm_up(model, torch.from_numpy(train["input_ids"]), torch.from_numpy(train["attention_mask"]),
                              torch.from_numpy(train["label"].astype("int64")), features_cfg.warmup_steps, cfg.train,
                              seed=cfg.data_seed)
        warm["seconds"] = round(time.perf_counter() - start, 2)
    batches = iter_batches(Path(args.processed) / "train.parquet", features_cfg.batch_size,
                           features_cfg.arm_feature_samples, cfg.data_seed)
    features, counts = compute_arm_features(model, batches, space, features_cfg, seed=cfg.data_seed)
    seconds = time.perf_counter() - start
    separation = arm_separation(features, model.config.fixed_layers, model.config.num_attention_heads)
    info = {"dataset": args.dataset, "profile": cfg.profile, "device": str(device), "threads": threads,
            "seconds": round(seconds, 2), "warmup": {"steps": features_cfg.warmup_steps, **warm},
            "separation": separation,
            "arm_space": {"layers": space.layer_options, "heads": space.head_options, "cp_arms": space.cp_arms,
                          "pool": space.pool}}
    written = save_arm_features(out, features, counts, info)
    mlflow.log_metrics({"seconds": seconds, "samples": counts[f"ucb_l/{model.config.num_hidden_layers}"],
                        "arms": len(features),
                        **{f"separation.{f}": s["min_relative_distance"] for f, s in separation.items()},
                        **{f"warmup.{k}": v for k, v in warm.items()}})
    mlflow.log_dict(written, "arm_features_meta.json")
print(f"arm_features {args.dataset}: {len(features)} arm vectors from "
      f"{counts[f'ucb_l/{model.config.num_hidden_layers}']} samples in {seconds:.1f}s on {device} -> {out}; "
      "closest arms per family (distance / norm): "
      + ", ".join(f"{f} {s['min_relative_distance']:.3g}" for f, s in separation.items()))
