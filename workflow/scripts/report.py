"""Stage `table1`: reports/table1.md (for now the data summary of every dataset the profile runs)."""

import _stage

from dht.report import write_table1

p = _stage.parser(__doc__)
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = _stage.config(args)
write_table1(cfg, args.out, root=_stage.root())
print(f"report -> {args.out}")
