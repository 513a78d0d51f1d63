"""Stages `table1` / `table2` / `index`: reports/table1.md (training comparison, and where the DHT modes' depth
goes) and reports/table2.md (inference comparison), the measured values with their 95% intervals beside the
paper's, and reports/index.md (what produced them, links to the tables, the figures and each model's MLflow
run)."""

import sys

import _stage

from dht.figures import figure_paths
from dht.report import report_param_keys, write_index, write_table1, write_table2
from dht_workflow.dvc_params import check_dvc_keys

p = _stage.parser(__doc__)
p.add_argument("--report", choices=["table1", "table2", "index"], required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = _stage.config(args)
root = _stage.root()
if problem := check_dvc_keys(root, report_param_keys(cfg, args.report), cfg.profile):  # under dvc repro
    sys.exit(f"error: {problem}")
try:
    if args.report == "index":
        write_index(cfg, args.out, figure_paths(cfg), root=root)
    else:
        (write_table1 if args.report == "table1" else write_table2)(cfg, args.out, root=root)
except FileNotFoundError as err:
    sys.exit(f"error: {err}")
print(f"report -> {args.out}")
