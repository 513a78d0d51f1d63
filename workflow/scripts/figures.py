"""Stage `figures`: reports/figures/*.png, the paper's Figure 2 (layer/head selection over training) and
Figure 3 (loss trends) per dataset, with accuracy against FLOPs (Pareto front), on data with difficulty
levels layers and accuracy per difficulty, and where the DHT modes' depth goes (by length, the shallow
control's correctness and the reference's confidence)."""

import sys

import _stage

from dht.figures import FIGURES_DIR, write_figures
from dht.report import report_param_keys
from dht_workflow.dvc_params import check_dvc_keys

p = _stage.parser(__doc__)
p.add_argument("--out-dir", default=FIGURES_DIR, help=f"where the PNG files go (default: {FIGURES_DIR})")
args = p.parse_args()
cfg = _stage.config(args)
if problem := check_dvc_keys(_stage.root(), report_param_keys(cfg, "figures"), cfg.profile):  # under dvc repro
    sys.exit(f"error: {problem}")
try:
    written = write_figures(cfg, args.out_dir, root=_stage.root())
except FileNotFoundError as err:
    sys.exit(f"error: {err}")
for path in written:
    print(f"figure -> {path}")
