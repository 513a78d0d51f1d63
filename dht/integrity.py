"""Checksums of what the pipeline writes and later reads back (training checkpoints and saved models), checked
before a single byte of them is deserialised, and loading that never runs code.

A file can change after it was written (a disk error, a copy cut short, a bad sync); loading it anyway resumes
or predicts with other weights and says nothing, or fails later for another reason (a "non-finite loss" from
random bytes in a weight). A file can also come from elsewhere: a model directory someone sent, a checkpoint
put in place of one. Python's pickle (what ``torch.load(..., weights_only=False)`` reads) runs whatever code the
file names, so nothing here reads one: weights are safetensors, and the few torch files (a checkpoint,
``bandits.pt``, a NAS-pruned model's state dict) are read with ``torch.load(..., weights_only=True)``, which
builds tensors and plain containers only and refuses any other object (:func:`read_error` says so). The
checksums are not the defence against a crafted file (whoever writes one can write its checksum too); they
make sure that what is read is what the pipeline wrote, before anything reads it.

- a **checkpoint** (:func:`write_checkpoint`, :func:`read_checkpoint`) is one file: a one-line header with the
  SHA-256 of what follows, then the ``torch.save`` bytes of the state. The hash is checked by streaming the
  file before it is deserialised; the trainer refuses a checkpoint that differs, that has no header (written
  by an older version), or that holds more than tensors and plain data, naming it and the command that deletes
  it (it never overwrites or deletes it itself). The header is inside the one file the trainer replaces
  atomically, so a kill can never leave a checkpoint and a checksum that disagree.
- a **saved model directory** (``models/<dataset>/<model>/``) gets ``checksums.sha256``, the SHA-256 of every
  file in it in ``sha256sum`` format (``cd models/x/t-dht && sha256sum -c checksums.sha256`` checks it by hand),
  written last by the train and baseline stages; :func:`verify_directory` checks it before `dht predict`, the
  benchmarks or a baseline stage load anything from the directory: every file must be listed and match. A
  directory without one (saved before checksums existed, or not by this pipeline) is refused
  (:class:`UnverifiedError`) unless the caller allows it explicitly (``dht predict --allow-unverified``); it is
  then still read only as safetensors and weights-only torch files.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dht.pretrained import sha256_file

MANIFEST_FILE = "checksums.sha256"
# A checkpoint's first line: this, the 64 hex digits of the SHA-256 of the rest of the file, "\n".
CHECKPOINT_HEADER = b"dht-checkpoint sha256:"
_HEADER_SIZE = len(CHECKPOINT_HEADER) + 64 + 1
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A saved file is not what was written; the message names it and how to get a good copy back."""


class UnverifiedError(IntegrityError):
    """A model directory has no checksums.sha256, and the caller did not allow loading it unchecked."""


def _refusal(err: Exception) -> str:
    """What a failed ``torch.load`` says, in one line. A weights-only load refuses anything but tensors and plain
    data with an UnpicklingError whose first lines suggest ``weights_only=False``: not advice to pass on."""
    if isinstance(err, pickle.UnpicklingError):
        detail = next((line.strip() for line in str(err).splitlines() if "nsupported" in line), "")
        return ("holds more than tensors and plain data" + (f" ({detail})" if detail else "")
                + ": reading it could run code, so it is refused")
    first = str(err).splitlines()[0] if str(err) else ""
    return f"cannot be read ({type(err).__name__}: {first})"


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: one file, a header with the SHA-256 of the torch.save bytes that follow
# --------------------------------------------------------------------------------------------------------------


class _Hashing(io.RawIOBase):
    """A writable stream that hashes what passes through to ``out`` (torch.save writes sequentially)."""

    def __init__(self, out: BinaryIO):
        self.out, self.digest = out, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.out.write(data)


class _Window(io.RawIOBase):
    """``stream`` from ``base`` on, as a file of its own (torch.load seeks to offsets of the torch.save bytes)."""

    def __init__(self, stream: BinaryIO, base: int):
        self.stream, self.base = stream, base
        stream.seek(base)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.stream.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self.base
        return self.stream.seek(offset, whence) - self.base

    def tell(self) -> int:
        return self.stream.tell() - self.base


def write_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save(state)`` behind the header line that carries its SHA-256 (:data:`CHECKPOINT_HEADER`). The
    state must be tensors and plain data (what :func:`read_checkpoint` reads back); the caller makes the write
    atomic (a temporary file, then ``os.replace``)."""
    with open(path, "wb") as f:
        f.write(b"\0" * _HEADER_SIZE)  # the header's place, filled in once the hash is known
        hashing = _Hashing(f)
        torch.save(state, hashing)
        f.seek(0)
        f.write(CHECKPOINT_HEADER + hashing.digest.hexdigest().encode() + b"\n")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`write_checkpoint`: its SHA-256 checked against the header first, then read
    weights-only. Raises :class:`IntegrityError` saying what is wrong (the caller adds what to delete)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = f.read(_HEADER_SIZE)
        stored = header[len(CHECKPOINT_HEADER) : -1].decode("ascii", "replace")
        if (not header.startswith(CHECKPOINT_HEADER) or not header.endswith(b"\n")
                or len(stored) != 64 or any(c not in "0123456789abcdef" for c in stored)):
            raise IntegrityError(f"{path}: carries no checksum header (written by an older version, or not a "
                                 "checkpoint of this pipeline), so its content cannot be verified before it is read")
        digest = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != stored:
            raise IntegrityError(f"{path}: checksum mismatch (header {stored[:12]}..., content "
                                 f"{digest.hexdigest()[:12]}...): the file changed after it was written (a disk or "
                                 "copy error, or an edit)")
        try:
            state = torch.load(_Window(f, _HEADER_SIZE), map_location="cpu", weights_only=True)
        except Exception as err:  # a refused object (UnpicklingError), or bytes torch cannot parse
            raise IntegrityError(f"{path}: {_refusal(err)}") from err
    if not isinstance(state, dict):
        raise IntegrityError(f"{path}: holds a {type(state).__name__}, not a checkpoint's state")
    return state


def load_tensors(path: str | Path, fix: str) -> Any:
    """A torch file of tensors and plain data (a state dict), read weights-only on the CPU; anything else, or a
    file that cannot be read, is one :class:`IntegrityError` line ending with ``fix``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise read_error(path, err, fix) from err


# --------------------------------------------------------------------------------------------------------------
# Saved model directories: checksums.sha256
# --------------------------------------------------------------------------------------------------------------


def _files(directory: Path) -> Iterable[Path]:
    """The files of a saved model: every file under ``directory`` but the manifest and hidden ones, which nothing
    loads (Snakemake adds ``.snakemake_timestamp`` to a directory output after its job; a desktop, ``.DS_Store``)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def write_manifest(directory: str | Path) -> Path:
    """Write ``checksums.sha256`` (``sha256sum`` format) for every file under ``directory``; call it last."""
    directory = Path(directory)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in _files(directory)]
    out = directory / MANIFEST_FILE
    out.write_text("".join(lines))
    return out


def verify_directory(directory: str | Path, fix: str, allow_unverified: bool = False) -> bool:
    """Check ``directory`` against its ``checksums.sha256`` before anything in it is read: every file it lists
    is there with that SHA-256, and it lists every file but hidden ones (one added later would be read unchecked).
    Raise :class:`IntegrityError` naming the first file that is not and ``fix`` (how to get a good copy). Without a
    manifest: :class:`UnverifiedError`, or False when ``allow_unverified`` (the user's explicit choice). True
    when every file matches."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise IntegrityError(f"{directory}: no such directory; {fix}")
    if not manifest.is_file():
        if allow_unverified:
            return False
        raise UnverifiedError(f"{directory}: no {MANIFEST_FILE}, so its files cannot be verified before they are "
                              "loaded (every model directory the pipeline saves has one; this one was saved before "
                              f"checksums existed, or elsewhere); {fix}")
    listed = set()
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        expected, _, name = line.partition("  ")
        if len(expected) != 64 or not name:
            raise IntegrityError(f"{manifest}, line {number}: not a sha256sum line; {fix}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise IntegrityError(f"{manifest}, line {number}: {name} is not a file of the directory; {fix}")
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {MANIFEST_FILE}); {fix}")
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"{path}: checksum mismatch with {MANIFEST_FILE} ({path.stat().st_size} bytes): the file changed "
                f"after the model was saved (truncated or damaged); {fix}")
        listed.add(path.relative_to(directory).as_posix())
    for path in _files(directory):
        if path.relative_to(directory).as_posix() not in listed:
            raise IntegrityError(f"{path}: not listed in {MANIFEST_FILE}, so added after the model was saved; it is "
                                 f"not read unchecked: remove it, or {fix}")
    return True


def read_error(path: str | Path, err: Exception, fix: str) -> IntegrityError:
    """One line for a model file that fails to load (a truncated safetensors file raises its own error type; a
    torch file with more than tensors and plain data is refused by the weights-only reader)."""
    return IntegrityError(f"{path}: {_refusal(err)}; {fix}")


# --------------------------------------------------------------------------------------------------------------
# Loading a saved DHT model: verified, local, one line when it cannot be
# --------------------------------------------------------------------------------------------------------------


def retrain_hint(info: dict[str, Any]) -> str:
    """How to rebuild a model directory the train or baseline stage wrote (``info``: its dht_policy.json or
    baseline.json)."""
    dataset, model = info.get("dataset"), info.get("mode_name") or info.get("model_name")
    if info.get("results"):  # the run's results directory (with its seed level when run.training_seeds lists several)
        return f"retrain it: snakemake --cores 4 --force {info['results']}/metrics.json"
    if dataset and model:
        return f"retrain it: snakemake --cores 4 --force results/{dataset}/{model}/metrics.json"
    return "retrain it (the train stage writes this directory: results/<dataset>/<model>/metrics.json)"


def description(path: Path) -> dict[str, Any]:
    """A model directory's JSON description (dht_policy.json, baseline.json) when it parses, else {}: read
    before the checksums only to say how to rebuild the directory if they fail."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def read_model(directory: str | Path, fix: str) -> Any:
    """A :class:`dht.model.DHTForSequenceClassification` saved with ``save_pretrained`` in a directory already
    verified (:func:`verify_directory`): its ``config.json`` and ``model.safetensors`` there (without the config,
    transformers would build a BERT-base and report a size mismatch), the safetensors weights only, read from
    the directory alone (never the hub), and any read error turned into one :class:`IntegrityError` line ending
    with ``fix``."""
    from transformers.utils import logging as hf_logging

    from dht.model import DHTForSequenceClassification

    hf_logging.disable_progress_bar()  # a weight-loading bar per load is noise in a CLI and a stage's log
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise IntegrityError(f"{directory / name}: missing; {fix}")
    try:
        return DHTForSequenceClassification.from_pretrained(directory, local_files_only=True, use_safetensors=True)
    except Exception as err:  # safetensors, json and transformers raise their own types for a damaged file
        raise read_error(directory / "model.safetensors", err, fix) from err


def load_checked_model(directory: str | Path, fix: str, allow_unverified: bool = False) -> Any:
    """:func:`read_model` after :func:`verify_directory`: a saved DHT model checked against its
    ``checksums.sha256`` (refused without one unless ``allow_unverified``)."""
    verify_directory(directory, fix, allow_unverified)
    return read_model(directory, fix)
