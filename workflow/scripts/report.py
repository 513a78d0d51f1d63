"""Stages `table1` / `table2`: reports/table1.md (training comparison) and reports/table2.md (inference
comparison), the measured values beside the paper's."""

import sys

import _stage

from dht.report import write_table1, write_table2

p = _stage.parser(__doc__)
p.add_argument("--table", choices=["1", "2"], required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = _stage.config(args)
try:
    (write_table1 if args.table == "1" else write_table2)(cfg, args.out, root=_stage.root())
except FileNotFoundError as err:
    sys.exit(f"error: {err}")
print(f"report -> {args.out}")
