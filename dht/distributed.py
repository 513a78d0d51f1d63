"""The processes one model trains on (docs/distributed.md): the :class:`World` the training loop runs in.

:class:`dht.trainer.Trainer` runs one loop, Algorithms 2-3 in lockstep over a world of N processes (ranks): each
rank queues its share of every epoch's permutation (:func:`shard`), the bandits decide jointly on every rank's
contexts (gathered, one bandit identical on every rank), the gradient pass runs under DDP (:meth:`World.parallel`)
and every rank replays every rank's bandit updates. With one process the world is trivial (a gather returns
``[x]``, a broadcast ``x``, the gradient pass runs as it is), so the one loop is the one-process trainer; under
``torchrun`` (``train.distributed.nproc_per_node: N``, started by :mod:`dht.launch`) :func:`start` joins the
process group and returns a :class:`ProcessGroup`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dht.config import Config

#: Debugging aid (and the tests): with this set to a directory, each rank of a distributed train stage writes
#: rank<r>.json there: the samples it trained per epoch and the digests of its weights and bandits.
TRACE_ENV = "DHT_DISTRIBUTED_TRACE"


class DistributedError(RuntimeError):
    """The processes cannot be set up as the configuration asks (the message says why and what to change)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run, and the collectives the trainer uses; this class
    itself is the world of one process, where every collective is the identity."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoints, the MLflow run and the results."""
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable: CPU tensors, numbers, lists, dicts), in rank order, on every rank."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass anything, e.g. None)."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def parallel(self, model: torch.nn.Module) -> Callable[[Callable[[], Tensor]], Tensor]:
        """What runs the gradient pass of a step: called with a function that runs the pass and returns the tensor
        the loss's backward starts from. One process: the function itself."""
        return _call

    def close(self) -> None:
        """Leave the process group (drop what :meth:`parallel` returned first: Trainer.close_distributed)."""


def _call(run: Callable[[], Tensor]) -> Tensor:
    return run()


@dataclass(frozen=True)
class ProcessGroup(World):
    """The world of a torchrun launch: the collectives of torch.distributed's process group."""

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def parallel(self, model: torch.nn.Module) -> Callable[[Callable[[], Tensor]], Tensor]:
        """DDP over `model` (:func:`wrap`), whose all-reduce averages the ranks' gradients."""
        return wrap(model, self)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def launched_size() -> int:
    """How many processes torchrun started (WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(cfg: Config, device: torch.device) -> World:
    """Join the process group torchrun set up (a :class:`ProcessGroup`), or the one-process :class:`World`.

    Each rank takes the GPU of its local rank (``device`` cuda) or the CPU, and reseeds torch's global generator
    with ``seed + rank``: dropout then draws differently on each rank, and rank 0 draws as a one-process run.
    Refuses a launch whose process count is not ``train.distributed.nproc_per_node`` (the checkpoint, the
    fingerprint and the results are those of that count)."""
    want = cfg.train.distributed.nproc_per_node
    size = launched_size()
    if size != want:
        how = (f"python -m dht.launch --standalone --nproc-per-node {want} -- workflow/scripts/train.py ... "
               "(the Snakemake rule does)"
               if want > 1 else "python workflow/scripts/train.py ... without torchrun")
        raise DistributedError(
            f"{size} process(es) started, but train.distributed.nproc_per_node = {want}: run {how}, or change "
            "the setting"
        )
    if size == 1:
        return World(device=device)
    backend = cfg.train.distributed.backend
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                f"train.distributed.nproc_per_node = {want}"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "nccl":
        raise DistributedError(
            f"train.distributed.backend = nccl needs CUDA GPUs, and this run's device is {device}; "
            "use backend: gloo to train on CPUs"
        )
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    torch.manual_seed(cfg.training_seed + rank)
    return ProcessGroup(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=device)


def shard(order: Tensor, rank: int, size: int) -> Tensor:
    """Rank `rank`'s share of an epoch's order: every size-th sample from its rank on (DistributedSampler's split,
    without its padding: the shares differ by at most one sample and together hold each sample exactly once)."""
    return order[rank::size]


def share_length(n: int, size: int) -> int:
    """Samples a rank queues per epoch of `n`: the longest :func:`shard` (all `n` with one process)."""
    return math.ceil(n / size)


class _Pass(torch.nn.Module):
    """The gradient pass of one training step as one module call. DistributedDataParallel prepares its gradient
    all-reduce in its module's forward (and, with find_unused_parameters, finds there the parameters this rank's
    pass did not reach); the trainer's pass is a walk (dht.walk) with the bandits' head decisions at its stopping
    points, so it is handed over as a function."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, run: Callable[[], Tensor]) -> Tensor:
        return run()


def wrap(model: torch.nn.Module, world: World) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over `model` (call it with a function that runs the pass and returns the output).

    ``find_unused_parameters=True``: a rank's batch runs only its depth's layers and heads, and ranks run different
    depths in the same step; DDP then all-reduces zeros for the parameters a rank did not reach, so every rank
    gets the same averaged gradient (a parameter no rank reached keeps no gradient, as in one process).
    ``static_graph`` would be wrong: the graph changes from step to step."""
    ids = [world.device.index] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(_Pass(model), device_ids=ids, find_unused_parameters=True)


def digest(obj: Any) -> str:
    """sha256 of nested dicts / lists / tensors / numbers (tensor bytes, dtype and shape; dict keys sorted): equal
    on two ranks exactly when their states are bit-identical."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, Mapping):
            h.update(b"{")
            for key in sorted(x, key=str):
                h.update(repr(key).encode())
                feed(x[key])
            h.update(b"}")
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for item in x:
                feed(item)
            h.update(b"]")
        elif isinstance(x, Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


def write_trace(world: World, samples: dict[str, list[int]] | None, digests: tuple[str, str] | None) -> None:
    """Write this rank's trace when :data:`TRACE_ENV` names a directory (nothing otherwise, or with one process)."""
    directory = os.environ.get(TRACE_ENV)
    if world.size == 1 or not directory:
        return
    os.makedirs(directory, exist_ok=True)
    weights, bandits = digests or (None, None)
    info = {"rank": world.rank, "size": world.size, "samples": samples, "weights": weights, "bandits": bandits}
    with open(os.path.join(directory, f"rank{world.rank}.json"), "w") as fh:
        json.dump(info, fh)
