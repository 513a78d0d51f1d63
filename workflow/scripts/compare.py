"""Stage `compare` (evaluation): results/<dataset>/paired.json (paired-seeds.json with several seeds): every model
of run.models and run.baselines against the reference and against the best baseline at no more inference FLOPs,
on the same test samples: the accuracy difference, its paired bootstrap 95% interval and McNemar's exact p-value
(dht.comparison, dht.statistics), per training seed."""

import sys

import _stage

from dht.comparison import compare_dataset
from dht.config import ConfigError
from dht.results import write_paired

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = _stage.config(args)
try:
    cfg.dataset(args.dataset)
    paired = compare_dataset(cfg, _stage.root(), args.dataset)
except (ConfigError, FileNotFoundError, ValueError) as err:
    sys.exit(f"error: {err}")
write_paired(args.out, paired)
for model, row in paired["models"].items():
    parts = []
    for key in ("vs_reference", "vs_best_baseline"):
        cmp = row.get(key)
        if cmp and cmp["against"]:
            parts.append(f"{cmp['difference']:+.3f} vs {cmp['against']}")
    print(f"compare {args.dataset}/{model}: {', '.join(parts) or 'nothing to compare with'}")
print(f"compare -> {args.out}")
