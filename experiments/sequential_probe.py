"""Why the sequential mode's curve is where it is (issue 28; docs/real-text.md section 6): its exits or its router?

For a trained sequential mode (q-dht) of a finished run, on one split, this reads every exit of the model with every
head (the exit ladder, dht.study_report.exit_ladder) and prints:

- `exits`: the accuracy of each exit (after 2, 4, 6 layers) and the share of samples each gets right that the one
  below got wrong;
- `router AUC`: how well the boundary bandit's estimate of continuing at the first boundary (its greedy score,
  continue minus stop) ranks the samples whose first exit is wrong and whose next is right (the samples a group
  repairs) above the others, against the same ranking by the first exit's normalised entropy alone (FastBERT's
  signal); ROC AUC, 0.5: no information;
- `curves`: accuracy and inference FLOP ratio of three routers over the same exits: the bandits at each price of
  the mode's grid (the pipeline's own predict, heads included), FastBERT's rule on the model's own exits (stop at
  the first exit whose normalised entropy is below a threshold; every head), and, for the range, the oracle (stop
  at the shallowest exit that is right, the deepest when none is).

It reads the model directory the train stage wrote and the processed split; it trains nothing, and it is for
explaining a measured result, not for choosing a setting (`--split val` for that).

Usage (on a finished run, e.g. of the `sequential` profile):
  .venv/bin/python experiments/sequential_probe.py --root . --profile sequential --dataset sst2 --seed 0 --split test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dht.config_loading import load_config
from dht.evaluation import SplitData, evaluate
from dht.flops import exit_read_flops, forward_flops, full_model_flops
from dht.policy import predict
from dht.results import run_subdir
from dht.study_report import exit_ladder
from dht.tokenization import load_processed
from dht.trainer import load_trained
from dht.walk import start, walk


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of `score` for the `positive` samples (ties count one half); nan when a class is empty."""
    from scipy.stats import rankdata

    pos, neg = positive.sum(), (~positive).sum()
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Normalised entropy of [..., C] probabilities (FastBERT's uncertainty, eq. 7)."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(-1) / np.log(probs.shape[-1])


def routed(ladder: dict[str, np.ndarray], stop_at: np.ndarray, cost: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean FLOP ratio) when sample i reads exit ``stop_at[i]`` (index into the ladder's depths) and
    costs ``cost[stop_at[i]]``."""
    correct = ladder["probs"].argmax(-1) == ladder["label"][:, None]
    rows = np.arange(len(stop_at))
    return float(correct[rows, stop_at].mean()), float(cost[stop_at].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".")
    p.add_argument("--profile", default=None)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", default="q-dht")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["val", "test"], default="val")
    args = p.parse_args()
    root = Path(args.root)
    cfg = load_config(root / "params.yaml", profile=args.profile)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, policy, info = load_trained(root / "models" / run_subdir(cfg, args.dataset, args.model, args.seed), device)
    data = SplitData.from_arrays(load_processed(root / "data/processed" / args.dataset, args.split))
    seq_len, conf = info["max_length"], model.config
    depths = list(policy.layer_options)
    ladder = exit_ladder(model, data, device, 128, depths)
    correct = ladder["probs"].argmax(-1) == ladder["label"][:, None]
    print(f"## {args.dataset} {args.model} seed {args.seed}, {args.split} split ({len(data)} samples)\n")
    gained = ["-"] + [f"{(~correct[:, k - 1] & correct[:, k]).mean():.3f}" for k in range(1, len(depths))]
    print("| exit after | " + " | ".join(map(str, depths)) + " |\n|---|" + "---|" * len(depths))
    print("| accuracy | " + " | ".join(f"{a:.3f}" for a in correct.mean(0)) + " |")
    print("| right where the one below was wrong | " + " | ".join(gained) + " |\n")

    # what the first boundary's bandit sees: its greedy estimate of continuing, against the exit's entropy alone
    repaired = ~correct[:, 0] & correct[:, 1]
    scores = []
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(data), 128):
            index = torch.arange(lo, min(lo + 128, len(data)))
            ids, mask, _ = data.batch(index, device)
            at = walk(start(model, ids, mask), [depths[0]])  # the state after the b fixed layers, every head
            x = policy.stop_context(at.state, mask, torch.log(torch.from_numpy(ladder["probs"][index.numpy(), 0])))
            s = policy.ucb_s[0].scores(policy.norm_s[0](x, update=False), greedy=True)
            scores.append((s[:, 1] - s[:, 0]).numpy())
    score = np.concatenate(scores)
    print(f"router AUC for 'the next group repairs the first exit' ({repaired.sum()} of {len(data)} samples): "
          f"bandit's continue estimate {roc_auc(score, repaired):.3f}, first exit's entropy "
          f"{roc_auc(entropy(ladder['probs'][:, 0]), repaired):.3f}; for 'the first exit is wrong': "
          f"{roc_auc(score, ~correct[:, 0]):.3f} and {roc_auc(entropy(ladder['probs'][:, 0]), ~correct[:, 0]):.3f}\n")

    # three routers over the same exits
    full = full_model_flops(seq_len, conf, "full", "inference")
    n_heads = conf.num_attention_heads
    cost = np.array([(forward_flops(seq_len, [n_heads] * d, conf) + exit_read_flops(k, conf)) / full
                     for k, d in enumerate(depths)])
    rows = []
    saved = policy.stop_price
    for price in info["mode"]["prices"] or [saved]:
        policy.stop_price = price
        m = evaluate(predict(model, policy, data, device, 128, seq_len), data, conf, seq_len, None)
        rows.append(("bandits", f"price {price:g}", m["accuracy"], m["infer_flop_ratio"]))
    policy.stop_price = saved
    ent = entropy(ladder["probs"])  # [N, K]
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0):
        below = ent[:, :-1] < threshold
        stop_at = np.where(below.any(1), below.argmax(1), len(depths) - 1)
        acc, flops = routed(ladder, stop_at, cost)
        rows.append(("entropy on its exits", f"speed {threshold:g}", acc, flops))
    right = correct.copy()
    right[:, -1] = True
    acc, flops = routed(ladder, right.argmax(1), cost)
    rows.append(("oracle", "-", acc, flops))
    print("| router | setting | accuracy | FLOPs |\n|---|---|---|---|")
    for router, setting, acc, flops in rows:
        print(f"| {router} | {setting} | {acc:.3f} | {flops:.2f}x |")


if __name__ == "__main__":
    main()
