"""Stage `tokenize`: tokenizer (trained WordPiece or pretrained; trained on the training split alone) and padded
ids of the train, val and test splits in data/processed/<dataset>/."""

import sys

import _stage

from dht.data import DatasetError, read_raw
from dht.tokenization import prepare
from dht.tracking import stage_run

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--raw", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = _stage.config(args)
spec = cfg.dataset(args.dataset)

try:
    ds = read_raw(args.raw)
except DatasetError as err:
    sys.exit(f"error: {err}")

params = {"dataset": cfg.section(f"datasets.{args.dataset}"), "tokenizer": cfg.section("tokenizer")}
with stage_run(args.dataset, "tokenize", stage="tokenize", profile=cfg.profile, params=params,
               prefix=cfg.tracking.experiment_prefix) as run:
    import mlflow

    meta = prepare(ds, cfg.tokenizer, spec.max_length, args.out, args.dataset)
    for split, stats in meta["splits"].items():  # an empty split (no validation split) has its size alone
        mlflow.log_metrics({f"{split}.{key}": stats[key] for key in ("n", "mean_tokens", "truncated_share")
                            if key in stats})
    mlflow.log_metric("vocab_size", meta["vocab_size"])
    mlflow.log_dict(meta, "meta.json")
print(f"tokenize {args.dataset}: vocab {meta['vocab_size']}, max_length {meta['max_length']}, "
      f"truncated {meta['splits']['train']['truncated_share']:.1%} of train -> {args.out}")
