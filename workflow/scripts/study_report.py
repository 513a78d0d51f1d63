"""Stage `study_report`: one table of a study (dht.study_report: summary, selection, ladder, readings) from its
runs in results/studies/<study>/, all of the validation split, written to reports/studies/<study>/<table>.md."""

import sys
from pathlib import Path

import _stage

from dht.config import ConfigError
from dht.studies import STUDIES_FILE, load_studies, resolve_study
from dht.study_report import TABLES, table

p = _stage.parser(__doc__)
p.add_argument("--study", required=True)
p.add_argument("--table", choices=TABLES, required=True)
p.add_argument("--results", required=True, help="the study's results folder (results/studies/<study>)")
p.add_argument("--out", required=True)
p.add_argument("--studies", default=STUDIES_FILE, help="the studies file (default: workflow/studies.yaml)")
args = p.parse_args()
cfg = _stage.config(args)
try:
    resolved = resolve_study(load_studies(args.studies), args.study, args.params, profile=cfg)
    text = table(resolved, args.results, args.table)
except (ConfigError, ValueError, FileNotFoundError) as err:
    sys.exit(f"error: {err}")
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(text + "\n")
print(text)
print(f"study {args.study}: {args.table} -> {out}")
