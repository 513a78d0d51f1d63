"""Checksums of what the pipeline reads back (dht.integrity): a checkpoint's content, a saved model's files,
and the baseline stage refusing a damaged teacher in one line."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from test_guard import baseline_project  # noqa: F401 (a fixture: a project with data and a reference model)

from dht.integrity import (
    CHECKPOINT_HEADER,
    MANIFEST_FILE,
    IntegrityError,
    UnverifiedError,
    read_checkpoint,
    verify_directory,
    write_checkpoint,
    write_manifest,
)


class RunsCode:
    """What an attacker would put in a pickle: unpickling it runs code, here creating ``marker`` (the file the
    tests check is never made)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",)


def assert_runs_code(data: bytes, marker) -> None:
    """The crafted torch.save bytes ``data`` (behind a checkpoint header or not) really run code when unpickled
    the unsafe way; the marker is removed again."""
    if data.startswith(CHECKPOINT_HEADER):
        data = data.split(b"\n", 1)[1]
    torch.load(io.BytesIO(data), weights_only=False)
    assert os.path.exists(marker), "the crafted file would not have run code: the test proves nothing"
    os.remove(marker)


def state() -> dict:
    return {"model": OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.tensor([True, False]),
                                 h=torch.ones(2, dtype=torch.bfloat16), e=torch.zeros(0)),
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
            "progress": {"epoch": 1, "history": [(1, 0, 0.5, 6.0)], "run_id": None, "seconds": 1.25},
            "queue": {"6": [(3, 1, torch.ones(4))]}, "cuda_rng": None}


def test_a_checkpoint_reads_back_and_any_change_is_seen_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(state(), path)
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state()["model"]["w"]) and loaded["progress"] == state()["progress"]
    assert loaded["queue"]["6"][0][:2] == (3, 1)
    data = path.read_bytes()
    assert data.startswith(CHECKPOINT_HEADER)
    weights = state()["model"]["w"].numpy().tobytes()
    at = data.find(weights)
    assert at > 0
    flipped = bytearray(data)
    flipped[at + 5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(flipped))
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(1))  # nothing may be deserialised
    with pytest.raises(IntegrityError, match=r"checkpoint.pt: checksum mismatch \(header [0-9a-f]{12}\.\.\., content "
                                             r"[0-9a-f]{12}\.\.\.\): the file changed after it was written"):
        read_checkpoint(path)
    path.write_bytes(data[len(data.split(b"\n", 1)[0]) + 1 :])  # the torch.save bytes alone, as before checksums
    with pytest.raises(IntegrityError, match="carries no checksum header .* cannot be verified before it is read"):
        read_checkpoint(path)
    assert calls == []


def test_a_model_directory_is_checked_against_its_manifest(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UnverifiedError, match=rf"{tmp_path}: no checksums.sha256, so its files cannot be verified "
                                              "before they are loaded .*; retrain$"):
        verify_directory(tmp_path, "retrain")
    assert verify_directory(tmp_path, "fix", allow_unverified=True) is False  # the user's explicit choice
    write_manifest(tmp_path)
    assert (tmp_path / MANIFEST_FILE).read_text().splitlines()[1].endswith("  tokenizer/vocab.txt")
    assert verify_directory(tmp_path, "fix") is True
    (tmp_path / "bandits.pt").write_bytes(b"added later")
    with pytest.raises(IntegrityError, match=r"bandits.pt: not listed in checksums.sha256, so added after the model "
                                             r"was saved; .*remove it, or retrain$"):
        verify_directory(tmp_path, "retrain")
    (tmp_path / "bandits.pt").unlink()
    (tmp_path / ".snakemake_timestamp").touch()  # what Snakemake adds to a directory output: nothing reads it
    assert verify_directory(tmp_path, "fix") is True
    manifest = (tmp_path / MANIFEST_FILE).read_text()
    (tmp_path / MANIFEST_FILE).write_text(manifest + f"{'0' * 64}  ../outside\n")
    with pytest.raises(IntegrityError, match=r"line 3: ../outside is not a file of the directory; retrain$"):
        verify_directory(tmp_path, "retrain")
    (tmp_path / MANIFEST_FILE).write_text(manifest)
    (tmp_path / "tokenizer" / "vocab.txt").write_text("a\nc\n")
    with pytest.raises(IntegrityError, match=r"vocab.txt: checksum mismatch with checksums.sha256 .*; retrain$"):
        verify_directory(tmp_path, "retrain")
    (tmp_path / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(IntegrityError, match=r"vocab.txt: missing \(listed in checksums.sha256\); retrain$"):
        verify_directory(tmp_path, "retrain")


@pytest.mark.parametrize("manifest", [True, False], ids=["with checksums", "saved before checksums"])
def test_the_baseline_stage_refuses_a_truncated_teacher_in_one_line(baseline_project, tmp_path, manifest):  # noqa: F811
    project = baseline_project
    teacher = shutil.copytree(project / "models/embedded-news/vanilla-12", tmp_path / "teacher")
    if not manifest:
        (teacher / MANIFEST_FILE).unlink()
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "workflow/scripts/baseline.py", "--profile", "tiny", "--dataset", "embedded-news",
         "--model", "distil-3", "--processed", "data/processed/embedded-news", "--teacher", str(teacher),
         "--results", "results/embedded-news/distil-3", "--out-model", "models/embedded-news/distil-3"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith(f"error: --teacher {teacher}: {weights if manifest else teacher}: ") and "\n" not in line
    # without checksums the teacher is refused before it is read: nothing could tell a damaged file from a good one
    assert ("checksum mismatch" if manifest else "no checksums.sha256, so its files cannot be verified") in line
    assert line.endswith("retrain it: snakemake --cores 4 --force results/embedded-news/vanilla-12/metrics.json")
