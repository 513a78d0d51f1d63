"""Stage `study_ladder`: a trained DHT model's exit ladder (dht.study_report.exit_ladder): every sample's class
probabilities read after each depth option, on the validation split (ladder.npz) and on the training split
(ladder-train.npz: what the router's feedback, read on trained samples, could see). Reads the model directory the
train stage wrote; trains nothing."""

import sys
from pathlib import Path

import _stage
import numpy as np

from dht.evaluation import SplitData
from dht.integrity import IntegrityError
from dht.study_report import exit_ladder
from dht.tokenization import load_processed
from dht.trainer import load_trained

p = _stage.parser(__doc__)
p.add_argument("--model-dir", required=True)
p.add_argument("--processed", required=True)
p.add_argument("--out", required=True, help="the validation split's ladder (.npz)")
p.add_argument("--out-train", required=True, help="the training split's ladder (.npz)")
_stage.add_threads(p)
args = p.parse_args()
cfg = _stage.config(args)
device, _ = _stage.runtime(args, cfg)
try:
    model, policy, info = load_trained(args.model_dir, device)
except (FileNotFoundError, IntegrityError) as err:
    sys.exit(f"error: {err}")
depths = sorted(set(policy.layer_options))
processed = Path(args.processed)
batch = info["config"]["train"]["eval_batch_size"]  # the run's own (its setting's), saved with the model
for split, out in (("val", args.out), ("train", args.out_train)):
    data = SplitData.from_arrays(load_processed(processed, split))
    np.savez(out, **exit_ladder(model, data, device, batch, depths))
    print(f"exit ladder of {args.model_dir} on the {split} split ({len(data)} samples, depths {depths}) -> {out}")
