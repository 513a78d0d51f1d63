"""What a researcher reads in MLflow and in the logs: the models' experiment apart from the stages', the headline
metrics first, one step axis for every training curve, experiment descriptions, each model an MLflow model that
loads, predicts and serves; progress lines, not carriage-return runs, in a log file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import BIN

from dht import tracking
from dht.progress import LogLines

# ---- progress in a log file ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_redrawn_bar_becomes_plain_lines_its_first_state_one_per_interval_and_its_last():
    written: list[str] = []
    clock = Clock()
    log = LogLines(written.append, every=30, clock=clock)
    log.write("starting\n")
    for step in range(1, 101):  # a bar redrawn every second for 100 s, as tqdm draws it
        clock.now = float(step)
        log.write(f"\rtrain: {step}/100 [loss={1 / step:.3f}]")
    log.write("\r" + " " * 30 + "\r")  # tqdm's leave=False clears the line
    log.write("done\n")
    text = "".join(written)
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "starting" and lines[-1] == "done"
    progress = lines[1:-1]
    assert progress[0].startswith("train: 1/100") and progress[-1].startswith("train: 100/100")  # first and last
    assert 3 <= len(progress) <= 6  # and one about every 30 s between, not 100
    steps = [int(line.split()[1].split("/")[0]) for line in progress]
    assert steps == sorted(steps) and all(b - a <= 31 for a, b in zip(steps, steps[1:], strict=False))


def test_lines_pass_whole_and_a_bar_ended_by_a_newline_or_an_exit_keeps_its_last_state():
    written: list[str] = []
    log = LogLines(written.append, every=1e9, clock=Clock())
    log.write("a line in ")
    log.write("two writes\n\n")
    log.write("\rbar 1/2\rbar 2/2\n")  # leave=True: the last state, then a newline
    log.write("\rnext 1/5\rnext 3/5")  # a job that stops mid-bar
    log.close()
    assert "".join(written) == "a line in two writes\n\nbar 1/2\nbar 2/2\nnext 1/5\nnext 3/5\n"


# ---- experiments, runs and metrics ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty MLflow store in a throw-away project root."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield tmp_path
    mlflow.set_tracking_uri(None)


METRICS = {"accuracy": 0.9, "accuracy_ci95": [0.85, 0.95], "macro_f1": 0.88, "infer_flop_ratio": 0.4,
           "infer_flop_ratio_linear": 0.41, "mean_layers": 5.5, "train_flop_ratio": 0.3, "train_flop_ratio_total": 1.3,
           "n_test": 96, "val_accuracy": 0.8}


def test_stage_runs_have_their_own_experiment_and_descriptions_name_the_dataset_and_profiles(store):
    import mlflow

    for stage, name, profile in (("tokenize", "tokenize", "tiny"), ("train", "t-dht", "tiny"),
                                 ("baseline", "distil-3", "tiny"), ("train", "t-dht", "paper")):
        with tracking.stage_run("news", name, stage=stage, profile=profile, root=store):
            pass
    client = mlflow.MlflowClient(tracking.tracking_uri(store))
    models, stages = client.get_experiment_by_name("news"), client.get_experiment_by_name("news.stages")
    names = {e: sorted(r.info.run_name for r in client.search_runs([e.experiment_id])) for e in (models, stages)}
    assert names[models] == ["distil-3", "t-dht", "t-dht"] and names[stages] == ["tokenize"]
    models_note, stages_note = models.tags[tracking.NOTE_TAG], stages.tags[tracking.NOTE_TAG]
    assert "**news**" in models_note and "`paper`, `tiny`" in models_note and "`news.stages`" in models_note
    assert "**news**" in stages_note and "`tiny`" in stages_note and "`paper`" not in stages_note
    assert "experiment `news`" in stages_note


def test_the_headline_comes_first_in_the_runs_table_and_on_the_run_page(store):
    import mlflow
    from mlflow.server import app

    with tracking.stage_run("news", "t-dht", stage="train", profile="tiny", root=store) as run:
        tracking.log_run_metrics(METRICS)
        progress = SimpleNamespace(history=[(1, 0, 1.4, 12.0), (2, 0, 1.2, 9.0), (3, 1, 0.9, 6.0)],
                                   selections={"0": {"layers/6": 1, "layers/12": 3}, "1": {"layers/6": 2, "layers/12": 2}})
        tracking.log_curves(run.info.run_id, tracking.training_curves(progress))
    client = mlflow.MlflowClient(tracking.tracking_uri(store))
    summary = list(tracking.SUMMARY)
    # the run page lists metrics as the server returns them; the UI's runs table sorts the names
    with app.test_client() as http:
        served = http.get(f"/ajax-api/2.0/mlflow/runs/get?run_id={run.info.run_id}").get_json()
    keys = [m["key"] for m in served["run"]["data"]["metrics"]]
    assert keys[: len(summary)] == summary
    assert sorted(keys)[: len(summary)] == summary
    data = client.get_run(run.info.run_id).data
    assert data.metrics["Summary/accuracy_ci95_lower"] == 0.85 and data.metrics["Summary/train_flop_ratio_total"] == 1.3
    assert "accuracy" not in data.metrics and data.metrics["train_flop_ratio"] == 0.3  # own budget: its own name
    assert data.tags[tracking.NOTE_TAG].startswith("accuracy 0.900 (95% interval [0.850, 0.950])")
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in loss] == [(1, 1.4), (2, 1.2), (3, 0.9)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "freq.layers.6")] == [0.25, 0.5]


def test_every_baseline_reports_its_loss_on_the_optimizer_step_axis():
    """distil, FastBERT, NAS pruning, FlexiBERT's retraining: train_loss has one point per optimizer step (as the
    DHT runs have), not one per epoch."""
    import torch

    from dht.baselines import distil, fastbert, loop
    from dht.evaluation import SplitData
    from dht.guard import FiniteGuard
    from dht.model import DHTConfig, DHTForSequenceClassification

    torch.manual_seed(0)
    teacher = DHTForSequenceClassification(DHTConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=16,
                                                     max_position_embeddings=8, num_labels=2, fixed_layers=1)).eval()
    data = SplitData(torch.randint(1, 30, (20, 8)), torch.ones(20, 8, dtype=torch.long), torch.randint(0, 2, (20,)))
    epochs, batch = 3, 8
    steps = epochs * 3  # 20 samples in batches of 8: 3 steps an epoch
    student = distil.student_from_teacher(teacher, 1)
    info = distil.distill(student, teacher, data, epochs=epochs, lr=1e-3, temperature=2.0, alpha_kd=0.5,
                          alpha_ce=0.5, alpha_cos=0.0, batch_size=batch, device=torch.device("cpu"), seed=0, seq_len=8)
    assert [s for s, _ in info["step_losses"]] == list(range(1, steps + 1)) and len(info["loss_per_epoch"]) == epochs
    kl = fastbert.distill(fastbert.FastBERT(teacher, cla_hidden_size=8), data, epochs, 1e-3, batch, "cpu", 0)
    assert [s for s, _ in kl["step_kl"]] == list(range(1, steps + 1))
    history = loop.train(student, torch.optim.SGD(student.parameters(), lr=0.0), lambda i: student(
        input_ids=data.input_ids[i], attention_mask=data.attention_mask[i], labels=data.labels[i]).loss,
        len(data), epochs=2, batch_size=batch, generator=torch.Generator().manual_seed(0), guard=FiniteGuard("t", "x"))
    assert loop.step_losses(history, first_step=11) == list(enumerate([x for e in history for x in e.losses], 11))


# ---- the MLflow model ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A trained DHT model's directory and a FastBERT baseline's on it (as test_predict_cli saves them), each logged
    to an MLflow store as the stages log them: {name: (model directory, model URI)}."""
    import mlflow
    from test_predict_cli import save_baseline, save_model

    root = tmp_path_factory.mktemp("logged")
    # This store, whatever an earlier test left in MLFLOW_TRACKING_URI (mlflow.set_tracking_uri sets it, and under
    # pytest-xdist other modules' tests run between this fixture and the tests that read it): the tests load from
    # the URI recorded here, never from the environment.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    store = tracking.tracking_uri(root)
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    teacher = save_model(root / "models/vanilla-12", "greedy")
    students = save_baseline("fastbert-0.5", teacher, root / "models/fastbert-0.5")
    uris = {}
    for name, directory, teacher_dir in (("vanilla-12", teacher, None), ("fastbert-0.5", students, teacher)):
        with tracking.stage_run("news", name, stage="train", profile="tiny", root=root):
            uris[name] = (directory, tracking.log_model(directory, teacher_dir).model_uri)
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield root, store, uris
    if previous is None:
        os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


@pytest.mark.parametrize("name", ["vanilla-12", "fastbert-0.5"])
def test_a_logged_model_predicts_as_dht_predict_does(logged, name, tmp_path, capsys):
    """Loaded back with mlflow.pyfunc from its copy in the store (not the model directory): labels, probabilities
    and layers, the same as `dht predict` on the directory the stage wrote."""
    import mlflow

    from dht import cli

    root, store, uris = logged
    directory, uri = uris[name]
    mlflow.set_tracking_uri(store)
    try:
        rows = mlflow.pyfunc.load_model(uri).predict(["the striker scored", "shares fell"]).to_dict("records")
    finally:
        mlflow.set_tracking_uri(None)
    texts = tmp_path / "texts.txt"
    texts.write_text("the striker scored\nshares fell\n")
    assert cli.main(["predict", "--model", str(directory), "--input", str(texts), "--format", "jsonl",
                     "--device", "cpu"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["label"], r["layers"], r["heads"]) for r in rows] == [(e["label"], e["layers"], e["heads"])
                                                                    for e in expected]
    for row, want in zip(rows, expected, strict=True):
        assert row["probability"] == pytest.approx(want["probability"], abs=1e-4)
        assert sum(row["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert row["probability"] == max(row["probabilities"])


def test_a_logged_model_holds_no_pickle_and_is_checked_before_it_is_read(logged):
    """A model from code: its MLmodel names a code file, no pickled Python object; a damaged copy of the weights
    is refused by the checksum check when the model loads."""
    import mlflow
    import yaml

    from dht.integrity import IntegrityError

    root, store, uris = logged
    mlflow.set_tracking_uri(store)
    try:
        local = Path(mlflow.artifacts.download_artifacts(uris["vanilla-12"][1], dst_path=str(root / "download")))
        pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        assert pyfunc["model_code_path"].endswith("mlflow_model_code.py") and "python_model" not in pyfunc
        assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
        weights = next(local.rglob("model.safetensors"))
        weights.write_bytes(weights.read_bytes()[:200])
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            mlflow.pyfunc.load_model(str(local))
    finally:
        mlflow.set_tracking_uri(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_texts_on_localhost(logged):
    """`mlflow models serve --env-manager local` on 127.0.0.1: POST texts to /invocations, one prediction a text."""
    root, store, uris = logged
    port = free_port()
    # the venv's bin first: the server starts `uvicorn` by name (make test does not activate the venv)
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uris["fastbert-0.5"][1], "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # a liveness bound, not a timing assertion
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(server.communicate(timeout=10)[0].decode()[-3000:]) from None
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": ["the striker scored", "shares fell"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that failed to start is gone already
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the session it leads
        server.wait(timeout=60)
    assert len(predictions) == 2
    assert all(p["label"] in ("a", "b") and 1 <= p["layers"] <= 12 and len(p["heads"]) == p["layers"]
               and abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)
