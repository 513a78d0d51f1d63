"""Why the depth does not follow the sample: can the bandits' context tell which samples need depth?

For a trained DHT mode, every test sample's S1 context (the pooled state after the b fixed layers, normalised as
the policy's UCB_L / UCB_cp sees it) is compared with what a sample-adaptive depth should act on: whether the
shallow control (`run.control`) gets the sample wrong. Three predictors, each scored by ROC AUC over the test
split (0.5: no information):

- `linear context`: a logistic regression on the context (5-fold cross-validated on the test split). LinUCB's
  reward model is linear in the same context, so this bounds what it can learn about the control's errors;
- `exit confidence`: 1 - the top-class probability of the model's own classifier applied to S1 (the shared
  head read after b layers, what FastBERT's early exit uses), no fitting;
- `context + confidence`: the logistic regression with that one number added.

Usage (on a finished run of the default profile, e.g. a copy made by `make reproduce`):
  .venv/bin/python experiments/routing_probe.py --root . --dataset sst2 --model t-dht
It prints one markdown row per (dataset, model).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from dht.config_loading import load_config
from dht.evaluation import SplitData
from dht.policy import exit_uncertainty
from dht.tokenization import load_processed
from dht.trainer import load_trained


def contexts(root: Path, dataset: str, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(S1 contexts as the policy normalises them [N, F], the exit confidence at b layers [N])."""
    model, policy, _ = load_trained(root / "models" / dataset / model_name, torch.device("cpu"))
    data = SplitData.from_arrays(load_processed(root / "data" / "processed" / dataset, "test"))
    b = model.config.fixed_layers
    xs, conf = [], []
    with torch.no_grad():
        for lo in range(0, len(data), 64):
            index = torch.arange(lo, min(lo + 64, len(data)))
            ids, mask, _ = data.batch(index, torch.device("cpu"))
            hidden, keep = model.embed(ids, mask)
            s1 = model.run_layers(hidden, keep, 0, b)
            u = exit_uncertainty(model, s1, mask)
            # the context exactly as the policy builds it (with the uncertainty when the model was trained on it)
            x = policy.norm_l(policy.arm_context(s1, mask, u if policy.exit_confidence else None), update=False)
            xs.append(x.numpy())
            conf.append((1 - u).numpy())
    return np.concatenate(xs), np.concatenate(conf)


def control_wrong(root: Path, dataset: str, control: str) -> np.ndarray:
    with (root / "results" / dataset / control / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return np.array([r["label"] != r["pred"] for r in rows])


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="a project with data/processed, models/ and results/ of a run")
    p.add_argument("--profile", default=None)
    p.add_argument("--dataset", nargs="+", default=None)
    p.add_argument("--model", nargs="+", default=["t-dht", "f-dht"])
    args = p.parse_args()

    def cv_auc(features: np.ndarray, y: np.ndarray) -> float:
        """ROC AUC of a logistic regression's out-of-fold probabilities (5 folds, fixed split)."""
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        clf = LogisticRegression(max_iter=2000, C=1.0)
        return roc_auc_score(y, cross_val_predict(clf, features, y, cv=folds, method="predict_proba")[:, 1])

    root = Path(args.root)
    cfg = load_config(root / "params.yaml", profile=args.profile)
    torch.set_num_threads(1)
    print("| dataset | model | control wrong | linear context AUC | exit confidence AUC | context + confidence AUC |")
    print("|---|---|---|---|---|---|")
    for dataset in args.dataset or cfg.run.datasets:
        y = control_wrong(root, dataset, cfg.run.control)
        for name in args.model:
            x, conf = contexts(root, dataset, name)
            both = np.column_stack([x, conf])
            print(f"| {dataset} | {name} | {y.mean():.3f} ({y.sum()}) | {cv_auc(x, y):.3f} | "
                  f"{roc_auc_score(y, 1 - conf):.3f} | {cv_auc(both, y):.3f} |", flush=True)


if __name__ == "__main__":
    main()
