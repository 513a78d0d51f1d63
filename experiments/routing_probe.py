"""Why the depth does not follow the sample: can the bandits' context tell which samples need depth?

For a trained DHT mode, every validation sample's S1 context (the pooled state after the b fixed layers, normalised
as the policy's UCB_L / UCB_cp sees it) is compared with what a sample-adaptive depth should act on: whether the
shallow control (`run.control`) gets the sample wrong. Three predictors, each scored by ROC AUC over the
validation split (0.5: no information):

- `linear context`: a logistic regression on the context (5-fold cross-validated on the validation split).
  LinUCB's reward model is linear in the same context, so this bounds what it can learn about the control's errors;
- `exit confidence`: 1 - the top-class probability of the model's own classifier applied to S1 (the shared
  head read after b layers, what FastBERT's early exit uses), no fitting;
- `context + confidence`: the logistic regression with that one number added.

The probe reads the validation split (data/processed/<dataset>/val.parquet, `data.val_fraction`), never the test
split: its numbers choose what to try next (docs/pipeline.md, "The validation split"). The control's mistakes are
its predictions of that split, made here with its inference policy.

Usage (on a finished run of the default profile, e.g. a copy made by `make reproduce`):
  .venv/bin/python experiments/routing_probe.py --root . --dataset sst2 --model t-dht
and on a run with several training seeds (`--config profile=seeds`), one seed's models:
  .venv/bin/python experiments/routing_probe.py --root . --profile seeds --seed 0
It prints one markdown row per (dataset, model).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dht.config_loading import load_config
from dht.evaluation import SplitData
from dht.policy import exit_uncertainty, predict
from dht.results import SEED_DIR
from dht.tokenization import load_processed
from dht.trainer import load_trained

SPLIT = "val"  # what the probe measures on; the test split is for the tables alone
FOLDS = 5


def probe_split(root: Path, dataset: str) -> SplitData:
    """The dataset's validation split; a clear error when the profile holds none out."""
    data = SplitData.from_arrays(load_processed(root / "data" / "processed" / dataset, SPLIT))
    if not len(data):
        raise ValueError(f"{root}/data/processed/{dataset}/{SPLIT}.parquet is empty (data.val_fraction = 0): the "
                         "probe reads the validation split; set data.val_fraction above 0 and rerun the data stages")
    return data


def model_dir(root: Path, dataset: str, model_name: str, seed: int | None = None) -> Path:
    """Where the train stage saved a model: models/<dataset>/<model>[/seed-<s>] (a profile with several run.training_seeds)."""
    out = root / "models" / dataset / model_name
    return out / SEED_DIR.format(seed=seed) if seed is not None else out


def contexts(root: Path, dataset: str, model_name: str, data: SplitData,
             seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(S1 contexts of `data` as the policy normalises them [N, F], the exit confidence at b layers [N])."""
    model, policy, _ = load_trained(model_dir(root, dataset, model_name, seed), torch.device("cpu"))
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


def control_wrong(root: Path, dataset: str, control: str, data: SplitData, seed: int | None = None) -> np.ndarray:
    """Whether the trained control gets each sample of `data` wrong (its inference policy, greedy)."""
    model, policy, _ = load_trained(model_dir(root, dataset, control, seed), torch.device("cpu"))
    pred = predict(model, policy, data, torch.device("cpu"), 128, data.input_ids.shape[1])
    return (pred.labels != data.labels).numpy()


def probe(root: Path, dataset: str, model_name: str, control: str, seed: int | None = None) -> dict[str, Any]:
    """The three AUCs of the module docstring for one trained mode, on the validation split: ``n`` samples,
    ``wrong`` (the control's mistakes among them), and ``linear_context``, ``exit_confidence``, ``both`` (NaN when
    the control's mistakes or successes are too few to score: fewer than FOLDS of either)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    data = probe_split(root, dataset)
    y = control_wrong(root, dataset, control, data, seed)
    x, conf = contexts(root, dataset, model_name, data, seed)
    out: dict[str, Any] = {"n": len(y), "wrong": y, "linear_context": float("nan"), "exit_confidence": float("nan"),
                           "both": float("nan")}
    if min(y.sum(), (~y).sum()) < FOLDS:
        return out

    def cv_auc(features: np.ndarray) -> float:
        """ROC AUC of a logistic regression's out-of-fold probabilities (FOLDS folds, fixed split)."""
        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0)
        clf = LogisticRegression(max_iter=2000, C=1.0)
        return float(roc_auc_score(y, cross_val_predict(clf, features, y, cv=folds, method="predict_proba")[:, 1]))

    out.update(linear_context=cv_auc(x), exit_confidence=float(roc_auc_score(y, 1 - conf)),
               both=cv_auc(np.column_stack([x, conf])))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="a project with data/processed, models/ and results/ of a run")
    p.add_argument("--profile", default=None)
    p.add_argument("--dataset", nargs="+", default=None)
    p.add_argument("--model", nargs="+", default=["t-dht", "f-dht"])
    p.add_argument("--seed", type=int, default=None, help="the training seed's models (a profile with several run.training_seeds)")
    args = p.parse_args(argv)

    root = Path(args.root)
    cfg = load_config(root / "params.yaml", profile=args.profile)
    torch.set_num_threads(1)
    print(f"Validation split ({SPLIT}.parquet); control {cfg.run.control}.")
    print("| dataset | model | control wrong | linear context AUC | exit confidence AUC | context + confidence AUC |")
    print("|---|---|---|---|---|---|")
    for dataset in args.dataset or cfg.run.datasets:
        for name in args.model:
            r = probe(root, dataset, name, cfg.run.control, args.seed)
            y = r["wrong"]
            print(f"| {dataset} | {name} | {y.mean():.3f} ({y.sum()} of {r['n']}) | {r['linear_context']:.3f} | "
                  f"{r['exit_confidence']:.3f} | {r['both']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
