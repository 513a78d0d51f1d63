"""The bandits' share of a DHT training step, measured side by side in one run.

Usage: .venv/bin/python benchmarks/bench_bandits.py [--hidden 96 --seq-len 48 --batch 32 --threads 1 ...]

For one batch it times (a) one training step of the encoder: the no-grad S1 pass of the first b layers, then
forward and backward with a per-sample plan and an optimizer step, and (b) everything the bandits add around
it (Sections 4.2-4.3, 7.1-7.2): pooling the contexts, running normalisation, UCB_L or UCB_cp selection, per
dynamic group UCB_H and TSB selection, the rewards and every bandit update. It prints (b) as a share of (a),
for tree search (T-DHT) and integrated search (F-DHT). Medians over --repeats runs after --warmup runs; it
measures and asserts nothing. The default sizes are the default profile's (params.yaml).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from dht.arms import parse_arm
from dht.bandits import LinUCB, LogisticThompsonHeads
from dht.config_loading import load_config
from dht.contexts import RunningNormalizer, multi_granularity_pool
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.rewards import RewardBaseline, reward_delta, ts_reward

TREE_LAYERS = [3, 6, 9, 12]
TREE_HEADS = [8, 10, 12]
F_DHT = ["3L12H", "6L8H", "6L10H", "6L12H", "9L8H", "9L10H", "9L12H", "12L8H", "12L10H", "12L12H"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--intermediate", type=int, default=None, help="FFN size (default 4 x hidden)")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 gives steady numbers on a shared machine)")
    return p.parse_args()


class Bandits:
    """The bandit side of one batch, as the trainer will run it (one mode)."""

    def __init__(self, mode: str, config: DHTConfig, gen: torch.Generator):
        self.mode = mode
        self.config = config
        n_groups = len(config.dynamic_layer_groups())
        features = load_config(Path(__file__).resolve().parents[1] / "params.yaml").dht.features  # the paper's poolings (params.yaml's)
        f_l, f_h, f_t = features.ucb_l, features.ucb_h, features.tsb
        self.f_l, self.f_h, self.f_t = f_l, f_h, f_t
        self.norm_l, self.norm_h, self.norm_t = RunningNormalizer(f_l.size), RunningNormalizer(f_h.size), RunningNormalizer(f_t.size)
        if mode == "tree":
            self.arms = TREE_LAYERS
            self.ucb = LinUCB(torch.randn(len(TREE_LAYERS), f_l.size, generator=gen), f_l.size, seed=0)
            self.ucb_h = LinUCB(torch.randn(len(TREE_HEADS), f_h.size, generator=gen), f_h.size, extra_dim=n_groups, seed=1)
        else:
            self.arms = [parse_arm(a) for a in F_DHT]
            self.ucb = LinUCB(torch.randn(len(F_DHT), f_l.size, generator=gen), f_l.size, seed=0)
        self.tsb = LogisticThompsonHeads(config.num_attention_heads, f_t.size, seed=2)
        self.baseline = RewardBaseline()
        self.n_groups = n_groups

    def decide(self, s1: torch.Tensor, mask: torch.Tensor) -> dict:
        x = self.norm_l(multi_granularity_pool(s1, mask, self.f_l))
        arm = self.ucb.select(x)
        # UCB_H and TSB read the state at each group's start; S1 stands in for it (same cost).
        xh = self.norm_h(multi_granularity_pool(s1, mask, self.f_h))
        xt = self.norm_t(multi_granularity_pool(s1, mask, self.f_t))
        group_choices = []
        for g in range(self.n_groups):
            if self.mode == "tree":
                e = torch.zeros(len(arm), self.n_groups)
                e[:, g] = 1
                h_idx = self.ucb_h.select(xh, extra=e)
                k = torch.tensor(TREE_HEADS)[h_idx]
            else:
                e, h_idx = None, None
                k = torch.tensor([self.arms[a].segments[-1][1] for a in arm.tolist()])
            heads = self.tsb.select(xt, k)
            group_choices.append((e, h_idx, heads))
        return {"x": x, "xh": xh, "xt": xt, "arm": arm, "groups": group_choices}

    def learn(self, d: dict, loss: torch.Tensor) -> None:
        layers = torch.full_like(loss, 12.0)
        delta = reward_delta(loss, layers)
        r = self.baseline.reward("ucb", delta, 1.0)
        self.ucb.update(d["x"], d["arm"], r)
        for e, h_idx, heads in d["groups"]:
            if h_idx is not None:
                self.ucb_h.update(d["xh"], h_idx, r, extra=e)
            self.tsb.update(d["xt"], heads, ts_reward(r))


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    config = DHTConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=args.intermediate or 4 * args.hidden, max_position_embeddings=max(64, args.seq_len),
                       num_labels=4)
    model = DHTForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, 1000, (args.batch, args.seq_len), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (args.batch,), generator=gen)
    depth = torch.tensor([TREE_LAYERS[i % 4] for i in range(args.batch)])
    heads = torch.ones(args.batch, 12, 12, dtype=torch.bool)
    heads[:, 3:, 8:] = False  # 8 of 12 heads in the dynamic layers, one head set (the cheap case)

    def step() -> None:
        with torch.no_grad():
            model.encode_prefix(ids, mask)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, depth=depth, heads=heads)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    with torch.no_grad():
        s1 = model.encode_prefix(ids, mask)
    loss = torch.rand(args.batch) + 0.1
    step_ms = median_ms(step, args.repeats, args.warmup)
    print(f"# bandits' share of a training step ({platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s))")
    print(f"# encoder: hidden {args.hidden}, 12 layers, 12 heads, seq {args.seq_len}, batch {args.batch}")
    print(f"{'search':<12} {'step ms':>9} {'bandits ms':>11} {'share':>7}")
    for mode in ("tree", "integrated"):
        bandits = Bandits(mode, config, gen)

        def work(b: Bandits = bandits) -> None:
            b.learn(b.decide(s1, mask), loss)

        bandit_ms = median_ms(work, args.repeats, args.warmup)
        print(f"{mode:<12} {step_ms:>9.1f} {bandit_ms:>11.2f} {bandit_ms / step_ms:>6.1%}")


if __name__ == "__main__":
    main()
