"""One rank of tests/test_distributed.py's in-library runs (started by torchrun, not collected by pytest).

Usage: torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_DIR CASE_JSON...

Each CASE_JSON is {"name": ..., "mode": ..., "params": {...}}: the tiny profile trained 2 epochs with
`params` merged into its overlay (dotted keys), on a small random split; the trainer runs with dht.distributed's
World, and each rank writes OUT_DIR/<name>.rank<r>.json with the samples it trained per epoch, the digests of its
weights and bandits, and the accounting.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dht import distributed  # noqa: E402
from dht.arm_features import arm_space, compute_arm_features  # noqa: E402
from dht.config_loading import load_config, read_params  # noqa: E402
from dht.evaluation import SplitData  # noqa: E402
from dht.model import DHTConfig, DHTForSequenceClassification  # noqa: E402
from dht.trainer import Trainer  # noqa: E402

N_TRAIN, SEQ = 45, 12


def split(n: int, seed: int) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return SplitData(ids * mask, mask, (ids[:, 1] % 3).long())


def config(case: dict):
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    tiny = raw["profiles"]["tiny"]
    tiny["device"] = "cpu"
    tiny["train"] = {**tiny["train"], "epochs": 2, "batch_size": 8,
                     "distributed": {"nproc_per_node": distributed.launched_size(), "backend": "gloo"}}
    tiny.setdefault("dht", {}).setdefault("modes", {}).setdefault("p-dht", {})["warmup_epochs"] = 1
    for dotted, value in case.get("params", {}).items():
        node = tiny
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return load_config(ROOT / "params.yaml", profile="tiny", raw=raw)


def train_once(case: dict, world: distributed.World | None) -> Trainer:
    """The case trained by this process (world None: alone), every rank from the same initial weights."""
    cfg = config(case)
    torch.manual_seed(0)
    dropout = case.get("dropout", 0.1)
    conf = DHTConfig(vocab_size=60, hidden_size=48, num_hidden_layers=12, num_attention_heads=12, intermediate_size=64,
                     max_position_embeddings=SEQ, num_labels=3, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    model = DHTForSequenceClassification(conf)
    train = split(N_TRAIN, 1)
    batches = [(train.input_ids[i : i + 32], train.attention_mask[i : i + 32]) for i in range(0, N_TRAIN, 32)]
    feats, _ = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    torch.manual_seed(1 + (world.rank if world is not None else 0))  # dropout: each rank its own draws
    trainer = Trainer(cfg, case["mode"], model, feats, train, torch.device("cpu"), SEQ, world=world)
    trainer.trace = {}
    trainer.fit(progress_bar=False)
    return trainer


def run(case: dict, world: distributed.World, out: Path) -> None:
    trainer = train_once(case, world)
    progress = trainer.progress
    weights, bandits = trainer.digests
    trainer.parallel = None  # freed while the process group lives (Trainer.close_distributed says why)
    (out / f"{case['name']}.rank{world.rank}.json").write_text(json.dumps({
        "samples": trainer.trace, "weights": weights, "bandits": bandits, "samples_seen": progress.samples_seen,
        "steps": progress.step, "train_flops": progress.train_flops, "selections": progress.selections,
        "history": progress.history,
        "ucb_counts": None if trainer.policy.ucb is None else trainer.policy.ucb.counts.tolist()}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    cases = [json.loads(text) for text in sys.argv[2:]]
    world = distributed.start(config(cases[0]), torch.device("cpu"))
    for case in cases:
        run(case, world, out_dir)
    gc.collect()
    world.close()
