"""Where and how a stage computes: the device, the number of threads, the seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when there is one, else CPU; asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device = {name!r} but no CUDA device is available here; set `device: auto` (or cpu) in params.yaml"
        )
    return device


def configure_threads(threads: int | None = None) -> int:
    """Give torch the threads the scheduler granted (Snakemake `threads:`), so parallel jobs do not
    oversubscribe the cores."""
    if threads is None:
        threads = int(os.environ.get("DHT_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator of the same seed for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
