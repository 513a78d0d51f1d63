"""Wall time of the DHT encoder's execution plans next to their analytic FLOP ratios.

Usage: .venv/bin/python benchmarks/bench_encoder.py [--hidden 192 --batch 16 --seq-len 64 --threads 2 ...]

For several plans (depth L and heads H kept in the dynamic layers, Meng et al. 2024, Section 6.1 arms) it times
the sliced path (pruned heads not computed, finished samples leave the batch) and the masked path (every head
computed, contexts multiplied by xi, Section 4.1) against the full model, and prints each time ratio next to the
analytic FLOP ratio of dht.flops. It measures; it asserts nothing. Timings are medians over --repeats runs after
--warmup runs; every timed run is paired with a full-model run just before it and the median of the paired
ratios is reported, so that drift in a shared machine's load hits numerator and denominator alike.
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from dht.flops import arm_heads_per_layer, full_model_flops, plan_flops
from dht.model import DHTAttention, DHTConfig, DHTForSequenceClassification, head_mask_from_choices

Plan = tuple[torch.Tensor | None, torch.Tensor | None]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=192, help="hidden size (divisible by --heads)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12, help="12 so that the paper's 8/10/12-head options apply")
    p.add_argument("--intermediate", type=int, default=None, help="FFN size (default 4 x hidden)")
    p.add_argument("--fixed-layers", type=int, default=3, help="the paper's b")
    p.add_argument("--group-size", type=int, default=3, help="the paper's c")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    p.add_argument(
        "--mode",
        choices=["inference", "train"],
        default="inference",
        help="train: S1 pass (no grad) + forward + backward, vs plain forward + backward",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_plans(config: DHTConfig, batch: int, gen: torch.Generator) -> dict[str, Plan]:
    """The plans to time: paper arms with one head set per batch, and per-sample head sets (TSB-like)."""
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    groups = config.dynamic_layer_groups()

    def random_heads(k: int) -> list[int]:
        return torch.randperm(n_heads, generator=gen)[:k].tolist()

    def plan(arms: list[tuple[int, int]], shared: bool) -> Plan:
        """arms[i] = (L, H) of sample i; heads drawn per dynamic group, once (shared) or per sample."""
        shared_choice = [random_heads(h) for h in [arms[0][1]] * len(groups)]
        choices = []
        for layers, h in arms:
            group_heads = shared_choice if shared else [random_heads(h) for _ in groups]
            row: list[list[int] | None] = [None] * n_layers
            for group, kept in zip(groups, group_heads, strict=True):
                for layer in group:
                    if layer < layers:
                        row[layer] = kept
            choices.append(row)
        depth = torch.tensor([layers for layers, _ in arms])
        return depth, head_mask_from_choices(choices, n_layers, n_heads)

    plans: dict[str, Plan] = {"full model (no plan)": (None, None)}
    for layers, h in [(12, 12), (12, 10), (12, 8), (9, 12), (9, 8), (6, 12), (6, 8), (3, 12)]:
        if layers <= n_layers and h <= n_heads:
            plans[f"{layers}L{h}H, one head set"] = plan([(layers, h)] * batch, shared=True)
    if n_layers >= 12 and n_heads >= 12:
        plans["12L8H, heads per sample"] = plan([(12, 8)] * batch, shared=False)
        f_dht = [(3, 12), (6, 8), (6, 10), (6, 12), (9, 8), (9, 10), (9, 12), (12, 8), (12, 10), (12, 12)]
        mix = [f_dht[int(i)] for i in torch.randint(len(f_dht), (batch,), generator=gen)]
        plans["F-DHT arm mix, heads per sample"] = plan(mix, shared=False)
    return plans


def make_runner(
    model: DHTForSequenceClassification,
    batch: dict[str, torch.Tensor],
    plan: Plan,
    path: str,
    mode: str,
    with_s1: bool,
) -> Callable[[], None]:
    depth, heads = plan
    kwargs = {"depth": depth, "heads": heads, "attention_path": path}
    if mode == "inference":

        def run() -> None:
            with torch.inference_mode():
                model(batch["input_ids"], batch["attention_mask"], **kwargs)

        return run

    def run_train() -> None:
        if with_s1:  # the bandits' state S1: first b layers, previous weights, no gradient (Section 4.2.1)
            with torch.no_grad():
                model.encode_prefix(batch["input_ids"], batch["attention_mask"])
        model.zero_grad(set_to_none=True)
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], **kwargs).loss.backward()

    return run_train


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_group_per_set(fn: Callable[[], None]) -> Callable[[], None]:
    """The sliced path with DHTAttention.gather_per_sample off: one sliced F.linear group per distinct head set."""

    def run() -> None:
        DHTAttention.gather_per_sample = False
        try:
            fn()
        finally:
            DHTAttention.gather_per_sample = True

    return run


def has_equal_size_sets(heads: torch.Tensor | None) -> bool:
    """True when some layer has different head sets of the same size (where gather_per_sample matters)."""
    if heads is None:
        return False
    for layer in range(heads.shape[1]):
        rows = torch.unique(heads[:, layer], dim=0)
        if rows.shape[0] > len(set(rows.sum(-1).tolist())):
            return True
    return False


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = DHTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate or 4 * args.hidden,
        max_position_embeddings=max(512, args.seq_len),
        fixed_layers=args.fixed_layers,
        group_size=args.group_size,
        attn_implementation=args.attn,
        num_labels=4,
    )
    model = DHTForSequenceClassification(config)
    model.train(args.mode == "train")  # dropout on in train mode, as in a real step
    input_ids = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=gen)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.randint(0, 4, (args.batch,), generator=gen),
    }
    plans = build_plans(config, args.batch, gen)

    print(
        f"DHT encoder benchmark: torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}, "
        f"mode={args.mode}, attn={args.attn}"
    )
    print(
        f"model: hidden={config.hidden_size} layers={config.num_hidden_layers} heads={config.num_attention_heads} "
        f"ffn={config.intermediate_size} b={config.fixed_layers} c={config.group_size}; batch={args.batch} "
        f"seq_len={args.seq_len}; median of {args.repeats} after {args.warmup} warmup"
    )
    # The reference is the full model without a plan: in train mode a plain step, no S1 pass (12-VaBERT).
    full_flops = args.batch * full_model_flops(args.seq_len, config, "full", args.mode)
    full_linear = args.batch * full_model_flops(args.seq_len, config, "linear", args.mode)
    reference = make_runner(model, batch, (None, None), "sliced", args.mode, with_s1=False)

    header = (
        f"{'plan':34} {'FLOPs full':>10} {'FLOPs lin':>10} {'sliced':>8} {'per-set':>8} {'masked':>8} "
        f"{'full ms':>8} {'sliced ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, plan in plans.items():
        depth, heads = plan
        with_s1 = depth is not None or heads is not None  # a DHT step pays for S1, the full model does not
        common = dict(mode=args.mode, batch_size=args.batch, include_s1=with_s1)
        flops = plan_flops(depth, heads, config, args.seq_len, "full", **common)
        linear = plan_flops(depth, heads, config, args.seq_len, "linear", **common)
        sliced = make_runner(model, batch, plan, "sliced", args.mode, with_s1)
        masked = make_runner(model, batch, plan, "masked", args.mode, with_s1)
        runners = {"sliced": sliced, "masked": masked}
        if has_equal_size_sets(heads):
            runners["per-set"] = one_group_per_set(sliced)
        # Every candidate run is paired with a full-model run just before it; the reported ratio is the median of
        # the paired ratios, so load bursts on a shared machine hit numerator and denominator alike.
        ratios: dict[str, list[float]] = {key: [] for key in runners}
        ref_times, sliced_times = [], []
        for i in range(args.warmup + args.repeats):
            for key, fn in runners.items():
                ref_time, elapsed = timed(reference), timed(fn)
                if i >= args.warmup:
                    ratios[key].append(elapsed / ref_time)
                    ref_times.append(ref_time)
                    if key == "sliced":
                        sliced_times.append(elapsed)
        ratio = {key: statistics.median(values) for key, values in ratios.items()}
        per_set = f"{ratio['per-set']:>7.2f}x" if "per-set" in ratio else f"{'-':>8}"
        print(
            f"{name:34} {flops.sum().item() / full_flops:>9.2f}x {linear.sum().item() / full_linear:>9.2f}x "
            f"{ratio['sliced']:>7.2f}x {per_set} {ratio['masked']:>7.2f}x "
            f"{statistics.median(ref_times) * 1e3:>8.0f} {statistics.median(sliced_times) * 1e3:>9.0f}"
        )
    print(
        "FLOPs full/lin: analytic ratio to the full model (dht.flops, 'full' and FastBERT 'linear' conventions"
        + (", train: 3x forward + S1" if args.mode == "train" else "")
        + "); sliced/masked: measured wall-time ratio to the full model; per-set: sliced with one F.linear"
        + " group per distinct head set (gather_per_sample off), timed where that differs."
    )
    print(f"Arm heads per layer, e.g. 6L8H: {arm_heads_per_layer(6, 8, config)}")


if __name__ == "__main__":
    main()
