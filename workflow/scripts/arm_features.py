"""Stage `arm_features`: the initial model and its arm features (Section 4.2) in data/features/<dataset>/."""

import json
import time
from pathlib import Path

import _stage

from dht.arm_features import arm_space, compute_arm_features, iter_batches, save_arm_features
from dht.model import model_from_params
from dht.tracking import stage_run

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--processed", required=True)
p.add_argument("--out", required=True)
_stage.add_threads(p)
args = p.parse_args()
cfg = _stage.config(args)
cfg.dataset(args.dataset)

device, threads = _stage.runtime(args, cfg)
meta = json.loads((Path(args.processed) / "meta.json").read_text())
model = model_from_params(cfg, num_labels=meta["num_labels"], vocab_size=meta["vocab_size"]).to(device)
out = Path(args.out)
model.save_pretrained(out / "init_model")

space = arm_space(cfg)
features_cfg = cfg.dht.features
params = {"model": cfg.section("model"), "dht.features": cfg.section("dht.features"), "seed": cfg.seed}
with stage_run(args.dataset, "arm_features", stage="arm_features", profile=cfg.profile, params=params,
               prefix=cfg.tracking.experiment_prefix) as run:
    import mlflow

    start = time.perf_counter()
    batches = iter_batches(Path(args.processed) / "train.parquet", features_cfg.batch_size,
                           features_cfg.arm_feature_samples, cfg.seed)
    features, counts = compute_arm_features(model, batches, space, features_cfg, seed=cfg.seed)
    seconds = time.perf_counter() - start
    info = {"dataset": args.dataset, "profile": cfg.profile, "device": str(device), "threads": threads,
            "seconds": round(seconds, 2), "arm_space": {"layers": space.layer_options, "heads": space.head_options,
                                                        "cp_arms": space.cp_arms, "pool": space.pool}}
    written = save_arm_features(out, features, counts, info)
    mlflow.log_metrics({"seconds": seconds, "samples": counts[f"ucb_l/{model.config.num_hidden_layers}"],
                        "arms": len(features)})
    mlflow.log_dict(written, "arm_features_meta.json")
print(f"arm_features {args.dataset}: {len(features)} arm vectors from "
      f"{counts[f'ucb_l/{model.config.num_hidden_layers}']} samples in {seconds:.1f}s on {device} -> {out}")
