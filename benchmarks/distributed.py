"""One model trained by two processes (torchrun + DDP, gloo) against one process, on the same work.

Usage:
  .venv/bin/python benchmarks/distributed.py [--profile embedded] [--mode t-dht] [--n-train 512] [--seq-len 48]
      [--batch-size 32] [--epochs 1] [--repeats 3] [--warmup 1] [--threads 1]
  .venv/bin/python benchmarks/distributed.py --paper-step [--paper-batch 8] [--paper-seq 300] [--paper-steps 2]

The work: `--epochs` epochs of `--mode` (dht.trainer.Trainer.fit) over a random split of `--n-train` samples with
the profile's model (random init, the profile's DHT structure). Three runners, each a fresh process started the
way the train stage starts (python, or torchrun --standalone --nproc-per-node 2 with the gloo backend):

  1 process x T threads     the reference (T = --threads)
  1 process x 2T threads    the same cores as the next one, used by threads instead of processes
  2 processes x T threads   the distributed run: each rank trains its share, the bandits decide jointly; with
                            train.distributed.queues rank (each rank's own queues) and global (shared queues)

Each process times its own fit (model set-up and imports left out), the slowest rank counts; runners are
interleaved in rounds (benchmarks/_common.interleaved) and the median ratio to the reference is printed, with the
distributed run's time in its collectives (the joint decisions, the gathered rewards, the step pairing; DDP's
gradient all-reduce runs inside backward and is not in it) and its depth imbalance (ranks train different depths
in a step, which lasts as long as the deepest rank's batch).

--paper-step times training steps of the paper profile's architecture (BERT-base size, random init, post-LN) at the
paper's longest length on this machine's device: the samples/s per device that docs/distributed.md's estimate of
hours per model starts from. On a GPU node it gives the number for that GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
from _common import REPO, fmt_ratio, interleaved, table  # noqa: E402

sys.path.insert(0, str(REPO))
from dht import distributed  # noqa: E402
from dht.arm_features import arm_space, compute_arm_features  # noqa: E402
from dht.config_loading import load_config, read_params, resolve_params  # noqa: E402
from dht.evaluation import SplitData  # noqa: E402
from dht.model import model_from_params  # noqa: E402
from dht.trainer import Trainer  # noqa: E402


def config(args: argparse.Namespace, nproc: int, paper: bool = False):
    raw = copy.deepcopy(read_params(REPO / "params.yaml"))
    overlay = raw["profiles"].setdefault(args.profile, {})
    overlay["device"] = "cpu" if nproc > 1 or not paper else "auto"
    if paper:  # the paper's architecture without its download: random init, post-LN as BERT
        overlay["model"] = {**overlay.get("model", {}), "init": "scratch", "max_position_embeddings": 512}
    reference = resolve_params(raw, args.profile)["run"]["reference"]
    mode = "vanilla-12" if paper else args.mode  # only these run: P-DHT's warm-up may outlast --epochs otherwise
    overlay["run"] = {**overlay.get("run", {}), "models": list(dict.fromkeys([reference, mode]))}
    overlay["train"] = {**overlay.get("train", {}), "epochs": args.epochs,
                        "batch_size": args.paper_batch if paper else args.batch_size,
                        "distributed": {"nproc_per_node": nproc, "backend": "gloo", "queues": args.queues}}
    return load_config(REPO / "params.yaml", profile=args.profile, raw=raw)


def random_split(n: int, seq_len: int, vocab: int, labels: int) -> SplitData:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (n, seq_len), generator=gen) * mask
    return SplitData(ids, mask, ids[:, 1] % labels)


def worker(args: argparse.Namespace) -> None:
    """One process of a runner: train, print {"seconds", "collective_seconds", "samples", "steps"} (rank 0)."""
    torch.set_num_threads(args.threads)
    paper = args.paper_step
    cfg = config(args, distributed.launched_size(), paper)
    seq_len = args.paper_seq if paper else args.seq_len
    device = torch.device("cuda" if paper and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = model_from_params(cfg, num_labels=2, vocab_size=1000)
    n = args.paper_steps * args.paper_batch if paper else args.n_train
    data = random_split(n, seq_len, 1000, 2)
    feats = {}  # vanilla-12, one fixed arm, reads none
    if not paper:
        batches = [(data.input_ids[i : i + 32], data.attention_mask[i : i + 32]) for i in range(0, min(n, 64), 32)]
        feats, _ = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    world = distributed.start(cfg, device)
    spent = [0.0]
    work = [0.0, 0.0]  # per step: the deepest rank's layer-samples, and the mean over ranks
    batch_work: list[float] = []  # layer-samples of every non-empty part
    if world.size > 1:  # time the collectives the trainer calls
        gather = world.all_gather

        def timed(obj):
            start = time.perf_counter()
            out = gather(obj)
            spent[0] += time.perf_counter() - start
            if any(isinstance(o, dict) and "heads_rows" in o for o in out):  # a step's records: its ranks' work
                per_rank = [0.0 if o is None else float((o["heads_rows"] > 0).sum()) for o in out]
                work[0] += max(per_rank)
                work[1] += sum(per_rank) / len(per_rank)
                batch_work.extend(w for w in per_rank if w)
            return out

        object.__setattr__(world, "all_gather", timed)
    mode = "vanilla-12" if paper else args.mode
    trainer = Trainer(cfg, mode, model, feats, data, device, seq_len, world=world)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    progress = trainer.fit(progress_bar=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    every = world.all_gather((seconds, spent[0]))
    if world.is_main:
        slowest = max(every)
        layers = {int(k.split("/")[1]): v for e in progress.selections.values() for k, v in e.items()
                  if k.startswith("layers/")}
        mean_layers = sum(L * c for L, c in layers.items()) / max(sum(layers.values()), 1)
        print(json.dumps({"seconds": slowest[0], "collective_seconds": slowest[1], "samples": progress.samples_seen,
                          "mean_layers": mean_layers,
                          "steps": progress.step, "device": str(device),
                          "imbalance": work[0] / work[1] if work[1] else None,
                          "projected": projected_imbalance(batch_work)}), flush=True)
    trainer.close_distributed()


def projected_imbalance(batch_work: list[float], ranks: tuple[int, ...] = (2, 4, 8), draws: int = 4000) -> dict:
    """E[deepest of N parts] / E[part] with N parts drawn from the measured ones (independent draws): what the
    lockstep costs with N ranks if their depths mix as in this run."""
    if not batch_work:
        return {}
    work = torch.tensor(batch_work, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    return {str(n): float(work[torch.randint(len(work), (draws, n), generator=gen)].max(dim=1).values.mean() / work.mean())
            for n in ranks}


def launch(args: argparse.Namespace, nproc: int, threads: int, extra: list[str] | None = None,
           queues: str = "rank") -> dict:
    """Start a runner the way the train stage starts (python, or torchrun --standalone) and read its result."""
    own = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--profile", args.profile,
           "--mode", args.mode, "--n-train", str(args.n_train), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--queues", queues, *(extra or [])]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DHT_NO_PROGRESS="1")
    proc = subprocess.run([*launcher, *own], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"runner failed ({nproc} process(es)):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def compare(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {}
    t = args.threads
    specs = {f"1 process x {t} thread(s)": (1, t, "rank"), f"1 process x {2 * t} threads": (1, 2 * t, "rank"),
             f"2 processes x {t} thread(s), queues: rank": (2, t, "rank"),
             f"2 processes x {t} thread(s), queues: global": (2, t, "global")}
    if args.skip_threads:
        del specs[f"1 process x {2 * t} threads"]

    def runner(name: str, nproc: int, threads: int, queues: str):
        def run() -> float:
            out = launch(args, nproc, threads, queues=queues)
            results.setdefault(name, []).append(out)
            return out["seconds"]
        return run

    names = list(specs)
    timing = interleaved({name: runner(name, *spec) for name, spec in specs.items()}, names[0], args.repeats,
                         args.warmup)
    rows = []
    for name in names:
        last = results[name][-1]
        seconds = timing.median(name)
        collective = sorted(r["collective_seconds"] / r["seconds"] for r in results[name][args.warmup:])
        layers = statistics.median(r["mean_layers"] for r in results[name][args.warmup:])
        rows.append([name, f"{seconds:.2f}", f"{last['samples'] / seconds:.1f}", last["steps"], f"{layers:.2f}",
                     fmt_ratio(timing.ratio(name)), fmt_ratio(1 / timing.ratio(name)),
                     f"{100 * collective[len(collective) // 2]:.1f}%" if specs[name][0] > 1 else "-",
                     fmt_ratio(last["imbalance"]) if last["imbalance"] else "-"])
    print(f"# {args.mode}, profile {args.profile}: {args.epochs} epoch(s) of {args.n_train} samples, length "
          f"{args.seq_len}, batch {args.batch_size} per rank; median of {args.repeats} interleaved rounds")
    print(table(["runner", "fit s", "samples/s", "steps", "mean L", "time ratio", "speed-up", "in collectives", "depth imbalance"],
                rows))
    projected = results[names[-2]][-1].get("projected")
    if projected:
        print("queues: rank, projected depth imbalance with N ranks (parts drawn from this run's): "
              + ", ".join(f"N = {n}: {fmt_ratio(v)}" for n, v in projected.items()))
    print("mean L: layers per trained sample (the bandits' choices differ between runners, and so does the work); "
          "in collectives: the slowest rank's share of its fit time spent in the trainer's gathers (waiting for the "
          "other rank included); depth imbalance: sum over steps of the deepest rank's layers x samples over the "
          "mean rank's (a step lasts as long as its deepest batch: 1.00x is no waiting)")


def paper_step(args: argparse.Namespace) -> None:
    out = launch(args, 1, args.threads, ["--paper-step", "--paper-batch", str(args.paper_batch), "--paper-seq",
                                         str(args.paper_seq), "--paper-steps", str(args.paper_steps)])
    print(f"# paper architecture (hidden 768, 12 layers, 12 heads), vanilla-12 training steps, batch "
          f"{args.paper_batch}, length {args.paper_seq}, on {out['device']} x {args.threads} thread(s)")
    print(f"{out['steps']} steps, {out['samples']} samples in {out['seconds']:.1f} s: "
          f"{out['samples'] / out['seconds']:.3f} samples/s per device")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="embedded", help="model and DHT structure (default: embedded)")
    p.add_argument("--mode", default="t-dht")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32, help="per rank (train.batch_size)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--queues", choices=["rank", "global"], default="rank", help=argparse.SUPPRESS)
    p.add_argument("--skip-threads", action="store_true", help="leave out the 1 process x 2T threads runner")
    p.add_argument("--paper-step", action="store_true", help="time the paper architecture's training steps instead")
    p.add_argument("--paper-batch", type=int, default=8)
    p.add_argument("--paper-seq", type=int, default=300)
    p.add_argument("--paper-steps", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
    elif args.paper_step:
        args.profile = "paper"
        paper_step(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
