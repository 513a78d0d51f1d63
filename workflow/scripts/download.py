"""Stage `download`: fetch, generate or read one dataset into data/raw/<dataset>/ (text, label, difficulty): the
training split, the validation split held out of it (data.val_fraction), and the test split."""

import sys

import _stage

from dht.data import DatasetError, load_text_dataset, write_raw

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = _stage.config(args)

try:
    ds = load_text_dataset(cfg.dataset(args.dataset), seed=cfg.data_seed, val_fraction=cfg.data.val_fraction,
                           params_dir=_stage.params_dir(args))
except (DatasetError, ValueError) as err:
    sys.exit(f"error: dataset '{args.dataset}': {err}")
meta = write_raw(ds, args.out, args.dataset)
print(f"download {args.dataset}: {meta['n_train']} train / {meta['n_val']} val / {meta['n_test']} test, "
      f"{meta['num_labels']} classes ({meta['source']}) -> {args.out}")
