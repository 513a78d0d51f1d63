"""What the sections read: processed splits checked against a model's shape, synthetic splits, config copies
with keys replaced, and the error raised when something needed is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dht.config import Config
from dht.evaluation import SplitData
from dht.tokenization import load_processed


class BenchmarkError(RuntimeError):
    """The benchmark cannot run as asked (missing or mismatched models or data); the message says what to do."""


@dataclass
class DataInfo:
    """A processed split and what a model must support to read it."""

    split: SplitData
    meta: dict[str, Any]
    max_id: int
    width: int  # longest sample (batches are trimmed to it)

    @classmethod
    def load(cls, processed: Path, split: str, limit: int | None = None) -> DataInfo:
        data = SplitData.from_arrays(load_processed(processed, split))
        if limit is not None:
            data = subset(data, torch.arange(min(limit, len(data))))
        meta = json.loads((processed / "meta.json").read_text())
        return cls(data, meta, int(data.input_ids.max()), int(data.attention_mask.sum(1).max()))

    def problem(self, where: str, vocab: int, positions: int, labels: int) -> str | None:
        """Why a model of this shape cannot read the data (None: it can)."""
        if self.max_id >= vocab:
            return (f"{where} has a vocabulary of {vocab} tokens but the data's ids reach {self.max_id} "
                    f"(its tokenizer has {self.meta.get('vocab_size')})")
        if self.width > positions:
            return f"{where} has {positions} positions but the data's samples reach {self.width} tokens"
        if labels != self.meta["num_labels"]:
            return f"{where} has {labels} labels, the data {self.meta['num_labels']}"
        return None


def subset(data: SplitData, index: torch.Tensor) -> SplitData:
    return SplitData(data.input_ids[index], data.attention_mask[index], data.labels[index],
                     None if data.difficulty is None else data.difficulty[index])


def synthetic_split(n: int, seq_len: int, vocab: int, labels: int, gen: torch.Generator) -> SplitData:
    """Random token ids, no padding: every sample is `seq_len` long, so the scaling grid means what it says."""
    ids = torch.randint(5, vocab, (n, seq_len), generator=gen)
    return SplitData(ids, torch.ones_like(ids), torch.randint(0, labels, (n,), generator=gen))


def patched(cfg: Config, **changes: Any) -> Config:
    """A copy of the (frozen) config with dotted keys replaced, e.g. patched(cfg, **{"train.epochs": 1})."""
    data = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return Config.model_validate(data)
