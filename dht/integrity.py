"""Checksums of what the pipeline writes and later reads back: training checkpoints and saved models.

A file can change after it was written (a disk error, a copy cut short, a bad sync); loading it anyway resumes
or predicts with other weights and says nothing, or fails later for another reason (a "non-finite loss" from
random bytes in a weight). So:

- a **checkpoint** carries the SHA-256 of its content (every tensor's bytes, dtype and shape, and every other
  value, walked in order) under ``checksum``; :func:`checkpoint_problem` recomputes it before a resume, and the
  trainer refuses a checkpoint that differs, or that has none, naming it and the command that deletes it (it
  never overwrites or deletes it itself). The checksum is inside the one file the trainer replaces atomically,
  so a kill can never leave a checkpoint and a checksum that disagree.
- a **saved model directory** (``models/<dataset>/<model>/``) gets ``checksums.sha256``, the SHA-256 of every
  file in it in ``sha256sum`` format (``cd models/x/t-dht && sha256sum -c checksums.sha256`` checks it by hand),
  written last by the train and baseline stages; :func:`verify_directory` checks it before `dht predict` or a
  baseline stage loads the model. A directory saved before checksums existed has no such file: it is loaded
  without the check, and a file that cannot be read is still reported in one line (:func:`read_error`).
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dht.pretrained import sha256_file

CHECKSUM_KEY = "checksum"
MANIFEST_FILE = "checksums.sha256"


class IntegrityError(ValueError):
    """A saved file is not what was written; the message names it and how to get a good copy back."""


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: a checksum of the content, stored inside it
# --------------------------------------------------------------------------------------------------------------


def content_checksum(value: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors and arrays by dtype, shape and bytes, the rest by type and
    value, containers in order. Equal for a state and the same state saved and loaded back."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    def tag(name: str, payload: bytes = b"") -> None:
        digest.update(f"{name}:{len(payload)}:".encode())
        digest.update(payload)

    if value is None or isinstance(value, bool):
        tag(repr(value))
    elif isinstance(value, int):
        tag("int", str(value).encode())
    elif isinstance(value, float):
        tag("float", (repr(value) if math.isfinite(value) else str(value)).encode())
    elif isinstance(value, str):
        tag("str", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bytes | bytearray):
        tag("bytes", bytes(value))
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        tag("tensor", f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        tag("ndarray", f"{a.dtype.str}{a.shape}".encode())
        if a.dtype.hasobject:
            _feed(digest, a.tolist())
        else:
            digest.update(a.view(np.uint8).reshape(-1))
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    elif isinstance(value, dict):
        tag("dict", str(len(value)).encode())
        for key, item in value.items():  # insertion order: pickling keeps it
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        tag("seq", str(len(value)).encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, set | frozenset):
        _feed(digest, sorted(value, key=repr))  # iteration order of a set changes between processes
    else:  # plain data is expected; anything else by its pickle (stable for dataclass-like objects)
        tag(f"{type(value).__module__}.{type(value).__qualname__}", pickle.dumps(value, protocol=4))


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its content checksum under ``checksum`` (in place; returned for convenience)."""
    state.pop(CHECKSUM_KEY, None)
    state[CHECKSUM_KEY] = content_checksum(state)
    return state


def checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a loaded checkpoint's checksum, or None when its content is what was written."""
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        return "carries no checksum (written before checkpoints had one), so its content cannot be verified"
    content = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    actual = content_checksum(content)
    if actual != stored:
        return (f"checksum mismatch (stored {str(stored)[:12]}..., content {actual[:12]}...): the file changed after "
                "it was written (a disk or copy error)")
    return None


# --------------------------------------------------------------------------------------------------------------
# Saved model directories: checksums.sha256
# --------------------------------------------------------------------------------------------------------------



def _files(directory: Path) -> Iterable[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: str | Path) -> Path:
    """Write ``checksums.sha256`` (``sha256sum`` format) for every file under ``directory``; call it last."""
    directory = Path(directory)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in _files(directory)]
    out = directory / MANIFEST_FILE
    out.write_text("".join(lines))
    return out


def verify_directory(directory: str | Path, fix: str) -> bool:
    """Check every file ``checksums.sha256`` lists; raise :class:`IntegrityError` naming the first missing or
    changed one and ``fix`` (how to get a good copy). False when there is no manifest (saved before checksums:
    nothing to check), True when every file matches."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        return False
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        expected, _, name = line.partition("  ")
        if len(expected) != 64 or not name:
            raise IntegrityError(f"{manifest}, line {number}: not a sha256sum line; {fix}")
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {MANIFEST_FILE}); {fix}")
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"{path}: checksum mismatch with {MANIFEST_FILE} ({path.stat().st_size} bytes): the file changed "
                f"after the model was saved (truncated or damaged); {fix}")
    return True


def read_error(path: str | Path, err: Exception, fix: str) -> IntegrityError:
    """One line for a model file that fails to load (a truncated safetensors file raises its own error type)."""
    return IntegrityError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          f"{fix}")


# --------------------------------------------------------------------------------------------------------------
# Loading a saved DHT model: verified, local, one line when it cannot be
# --------------------------------------------------------------------------------------------------------------


def retrain_hint(info: dict[str, Any]) -> str:
    """How to rebuild a model directory the train stage wrote (``info``: its dht_policy.json)."""
    dataset, model = info.get("dataset"), info.get("mode_name")
    if info.get("results"):  # the run's results directory (with its seed level when run.seeds lists several)
        return f"retrain it: snakemake --cores 4 --force {info['results']}/metrics.json"
    if dataset and model:
        return f"retrain it: snakemake --cores 4 --force results/{dataset}/{model}/metrics.json"
    return "retrain it (the train stage writes this directory: results/<dataset>/<model>/metrics.json)"


def load_checked_model(directory: str | Path, fix: str) -> Any:
    """A :class:`dht.model.DHTForSequenceClassification` saved with ``save_pretrained``: checked against its
    ``checksums.sha256`` when it has one, its ``config.json`` and ``model.safetensors`` there (without the
    config, transformers would build a BERT-base and report a size mismatch), read from the directory alone
    (never the hub), and any read error turned into one :class:`IntegrityError` line ending with ``fix``."""
    from dht.model import DHTForSequenceClassification

    directory = Path(directory)
    verify_directory(directory, fix)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise IntegrityError(f"{directory / name}: missing; {fix}")
    try:
        return DHTForSequenceClassification.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # safetensors, json and transformers raise their own types for a damaged file
        raise read_error(directory / "model.safetensors", err, fix) from err
