"""Checksums of what the pipeline reads back (dht.integrity): a checkpoint's content, a saved model's files,
and the baseline stage refusing a damaged teacher in one line."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from test_guard import baseline_project  # noqa: F401 (a fixture: a project with data and a reference model)

from dht.integrity import (
    MANIFEST_FILE,
    IntegrityError,
    checkpoint_problem,
    content_checksum,
    seal,
    verify_directory,
    write_manifest,
)


def state() -> dict:
    return {"model": OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.tensor([True, False]),
                                 h=torch.ones(2, dtype=torch.bfloat16), e=torch.zeros(0)),
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
            "progress": {"epoch": 1, "history": [(1, 0, 0.5, 6.0)], "run_id": None, "seconds": 1.25},
            "rng": np.arange(4, dtype=np.uint32), "flag": np.float64(2.5)}


def test_the_checksum_survives_saving_and_sees_any_change():
    sealed = seal(state())
    buffer = io.BytesIO()
    torch.save(sealed, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert checkpoint_problem(loaded) is None
    loaded["model"]["w"][1, 2] += 1e-6  # one weight, the smallest step
    assert "checksum mismatch" in checkpoint_problem(loaded)
    changed = seal(state())
    changed["progress"]["seconds"] = 1.5
    assert "checksum mismatch" in checkpoint_problem(changed)
    assert content_checksum([1, 2]) != content_checksum([[1], 2]) != content_checksum(["1", 2])
    assert content_checksum({"a": 1}) != content_checksum({"a": True})  # types count, not only values


def test_a_model_directory_is_checked_against_its_manifest(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    assert verify_directory(tmp_path, "fix") is False  # no manifest: saved before checksums
    write_manifest(tmp_path)
    assert (tmp_path / MANIFEST_FILE).read_text().splitlines()[1].endswith("  tokenizer/vocab.txt")
    assert verify_directory(tmp_path, "fix") is True
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
    if manifest:
        write_manifest(teacher)
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
    assert line.startswith(f"error: --teacher {teacher}: {weights}: ") and "\n" not in line
    assert ("checksum mismatch" if manifest else "cannot be read (SafetensorError") in line
    assert line.endswith("retrain it: snakemake --cores 4 --force results/embedded-news/vanilla-12/metrics.json")
