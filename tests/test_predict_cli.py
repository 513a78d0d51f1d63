"""`dht predict`: a trained model directory in, one row per text out, the bandits acting as the model's saved
`dht.inference` says unless `--inference` overrides it."""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file, save_file
from test_integrity import RunsCode, assert_runs_code

from dht import cli, policy
from dht.arm_features import arm_space, compute_arm_features
from dht.config_loading import load_config, read_params
from dht.integrity import MANIFEST_FILE, write_manifest
from dht.model import DHTConfig, DHTForSequenceClassification
from dht.policy import Policy
from dht.tokenization import train_wordpiece
from dht.trainer import save_trained

SEQ = 16
TEXTS = ["the match ended in a draw", "shares fell sharply today", "a new chip for phones",
         "rain is expected in the north", "the striker scored twice", "the bank raised its rates"] * 4


def save_model(directory, inference: str):
    raw = copy.deepcopy(read_params(ROOT / "params.yaml"))
    raw["profiles"]["tiny"]["dht"]["inference"] = inference
    cfg = load_config(ROOT / "params.yaml", profile="tiny", raw=raw)
    tokenizer = train_wordpiece(TEXTS, vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    model = DHTForSequenceClassification(DHTConfig(
        vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=64, max_position_embeddings=SEQ, num_labels=2))
    enc = tokenizer(TEXTS, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    batches = [(enc["input_ids"][i : i + 8], enc["attention_mask"][i : i + 8]) for i in range(0, len(TEXTS), 8)]
    feats, _ = compute_arm_features(model, batches, arm_space(cfg), cfg.dht.features, seed=0)
    policy = Policy(cfg, cfg.dht.modes["t-dht"], feats, model.config)
    save_trained(directory, model, policy, "t-dht", cfg, {"dataset": "embedded-news", "classes": ["a", "b"],
                                                          "max_length": SEQ})
    save_file(feats, str(directory / "arm_features.safetensors"))
    tokenizer.save_pretrained(directory / "tokenizer")
    write_manifest(directory)  # as the train stage does, last
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {mode: save_model(root / mode, mode) for mode in ("greedy", "sample")}


def run_predict(monkeypatch, tmp_path, capsys, model_dir, *flags: str) -> tuple[list[bool], list[dict]]:
    """Run `dht predict` on a few texts; (the greedy argument of each policy.predict call, the rows)."""
    calls: list[bool] = []
    original = policy.predict

    def spy(*args, **kwargs):
        calls.append(kwargs["greedy"])
        return original(*args, **kwargs)

    monkeypatch.setattr(policy, "predict", spy)
    texts = tmp_path / "texts.txt"
    texts.write_text("the striker scored\nshares fell\n")
    code = cli.main(["predict", "--model", str(model_dir), "--input", str(texts), "--format", "jsonl",
                     "--device", "cpu", *flags])
    assert code == 0
    return calls, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize(("saved", "flags", "greedy"), [
    ("greedy", [], True), ("sample", [], False),  # the model's own setting
    ("sample", ["--inference", "greedy"], True), ("greedy", ["--inference", "sample"], False),  # overridden
])
def test_predict_follows_the_saved_inference_setting_unless_told(models, monkeypatch, tmp_path, capsys, saved, flags,
                                                                  greedy):
    calls, rows = run_predict(monkeypatch, tmp_path, capsys, models[saved], *flags)
    assert calls == [greedy]
    assert [r["text"] for r in rows] == ["the striker scored", "shares fell"]
    assert all(r["label"] in ("a", "b") and r["layers"] in (3, 6, 9, 12) for r in rows)


def test_an_unknown_inference_setting_is_refused(models, capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--model", str(models["greedy"]), "--inference", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err


# ---- what goes wrong: one line naming the problem and the fix, exit status 1 -------------------------------------

RETRAIN = "retrain it: snakemake --cores 4 --force results/embedded-news/t-dht/metrics.json"  # the train rule's output


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused: a local model directory must never reach for the hub
    (a missing tokenizer/ took ~45 s of retries, then said "check your internet connection")."""
    import socket

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return attempts


def predict_fails(capsys, model_dir, texts_file, *flags: str) -> str:
    code = cli.main(["predict", "--model", str(model_dir), "--input", str(texts_file), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("the striker scored\nshares fell\n")
    return path


@pytest.fixture
def damaged(models, tmp_path):
    """A copy of a saved model directory, to damage."""
    import shutil

    return shutil.copytree(models["greedy"], tmp_path / "model")


def test_input_that_is_not_utf8_or_not_there(models, capsys, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the striker scored\nun caf\xe9 cr\xe8me\n".encode("latin-1"))
    line = predict_fails(capsys, models["greedy"], latin)
    assert line == (f"error: {latin}, line 2: bytes b'\\xe9' are not UTF-8 (invalid continuation byte); save the "
                    "texts as UTF-8 (e.g. `iconv -f latin1 -t utf-8`, with their real encoding)")
    line = predict_fails(capsys, models["greedy"], tmp_path / "nope.txt")
    assert line.startswith(f"error: --input {tmp_path / 'nope.txt'}: no such file")


@pytest.mark.parametrize("manifest", [True, False], ids=["with checksums", "saved before checksums"])
def test_missing_or_truncated_weights(damaged, capsys, texts, manifest):
    if not manifest:
        (damaged / MANIFEST_FILE).unlink()
    weights = damaged / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    flags = [] if manifest else ["--allow-unverified"]  # without checksums: only when the user says so
    line = predict_fails(capsys, damaged, texts, *flags)
    if manifest:
        assert f"{weights}: checksum mismatch with {MANIFEST_FILE}" in line
    else:  # no checksums to compare: the read error itself, in one line
        assert f"{weights}: cannot be read (SafetensorError" in line
    assert line.endswith(RETRAIN)
    weights.unlink()
    line = predict_fails(capsys, damaged, texts, *flags)
    assert f"{weights}: missing" in line and line.endswith(RETRAIN)


@pytest.mark.parametrize("name", ["config.json", "arm_features.safetensors", "bandits.pt"])
def test_a_missing_file_names_it_and_a_target_that_exists(damaged, capsys, texts, name):
    """A missing config.json was a size-mismatch report against BERT-base's 768; a missing arm_features file
    suggested `snakemake ... models/<dataset>/<model>/arm_features.safetensors`, which no rule makes."""
    for manifest in (True, False):
        (damaged / name).unlink(missing_ok=True)
        if not manifest:
            (damaged / MANIFEST_FILE).unlink()
        line = predict_fails(capsys, damaged, texts, *([] if manifest else ["--allow-unverified"]))
        assert f"{damaged / name}: missing" in line and line.endswith(RETRAIN), line


def test_a_missing_or_broken_tokenizer_never_reaches_the_network(damaged, capsys, texts, no_network, monkeypatch):
    import shutil
    import time

    monkeypatch.chdir(damaged.parent)  # a relative "model/tokenizer" also reads as a hub id "namespace/name"
    start = time.perf_counter()
    shutil.rmtree("model/tokenizer")
    Path("model", MANIFEST_FILE).unlink()  # saved before checksums: nothing tells the tokenizer is gone but itself
    line = predict_fails(capsys, "model", texts, "--allow-unverified")
    assert line == f"error: model/tokenizer: missing; {RETRAIN}"
    Path("model/tokenizer").mkdir()  # there, but empty
    line = predict_fails(capsys, "model", texts, "--allow-unverified")
    assert line.startswith("error: model/tokenizer: cannot be read (") and line.endswith(RETRAIN)
    assert no_network == [] and time.perf_counter() - start < 30


def test_a_text_longer_than_the_model_is_truncated_with_a_note(models, capsys, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("shares fell\n" + " ".join(["the striker scored twice"] * 10) + "\n\nrain today\n")
    code = cli.main(["predict", "--model", str(models["greedy"]), "--input", str(path), "--device", "cpu",
                     "--format", "jsonl"])
    out = capsys.readouterr()
    assert code == 0 and len(out.out.splitlines()) == 3
    assert out.err.strip() == (f"note: 1 text(s) longer than the model's {SEQ} tokens were truncated to their first "
                               f"{SEQ} (line 2)")


# ---- nothing a model directory holds may run code; none is read unchecked unless the user says so ------------------


def test_a_directory_without_checksums_is_refused_unless_the_user_allows_it(damaged, capsys, texts):
    (damaged / MANIFEST_FILE).unlink()
    line = predict_fails(capsys, damaged, texts)
    assert line.startswith(f"error: {damaged}: no {MANIFEST_FILE}, so its files cannot be verified before they are "
                           "loaded")
    assert RETRAIN in line and line.endswith("load it unchecked with --allow-unverified (its weights are still read "
                                             "as tensors only)")
    code = cli.main(["predict", "--model", str(damaged), "--input", str(texts), "--device", "cpu",
                     "--allow-unverified"])
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == 3  # the header and two texts


@pytest.mark.parametrize("checksums", ["written by the attacker", "none, and --allow-unverified"])
def test_bandits_that_would_run_code_are_refused_and_nothing_runs(damaged, texts, tmp_path, checksums):
    """`dht predict`, as a user runs it, on a model directory whose bandits.pt is a pickle that runs code: it
    ran (torch.load with weights_only=False). A matching checksum cannot vouch for it (whoever wrote the file wrote
    the checksum), and --allow-unverified does not lift the weights-only read."""
    marker = tmp_path / "code-ran"
    bandits = damaged / "bandits.pt"
    state = torch.load(bandits, weights_only=True)
    state["norm_l"]["count"] = RunsCode(marker)
    torch.save(state, bandits)
    assert_runs_code(bandits.read_bytes(), marker)
    flags = []
    if checksums == "written by the attacker":
        write_manifest(damaged)
    else:
        (damaged / MANIFEST_FILE).unlink()
        flags = ["--allow-unverified"]
    proc = run_cli(["dht", "predict", "--model", str(damaged), "--input", str(texts), "--device", "cpu", *flags],
                   cwd=tmp_path, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and proc.stdout == "", proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {bandits}: holds more than tensors and plain data (")
    assert lines[0].endswith(f"reading it could run code, so it is refused; {RETRAIN}")
    assert not marker.exists()


# ---- TSV -------------------------------------------------------------------------------------------------------------


def test_tsv_quotes_a_text_with_a_tab_or_a_quote_so_every_row_keeps_its_columns(models, capsys, tmp_path):
    path = tmp_path / "texts.txt"
    texts = ['the striker\tscored "twice"', "shares fell", "rain\rtoday"]  # a tab, quotes, a carriage return
    path.write_bytes(("\n".join(texts) + "\n").encode())
    code = cli.main(["predict", "--model", str(models["greedy"]), "--input", str(path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") == 1 + len(texts)  # one line a row for line tools (wc -l, cut, grep)
    rows = list(csv.reader(io.StringIO(out, newline=""), dialect="excel-tab"))
    assert rows[0] == ["label", "probability", "layers", "heads_per_layer", "text"]
    assert all(len(row) == 5 for row in rows) and [row[4] for row in rows[1:]] == texts
    assert all(row[0] in ("a", "b") and int(row[2]) == len(row[3].split(",")) for row in rows[1:])


# ---- a baseline's model directory ----------------------------------------------------------------------------------


def tiny_arch(teacher):
    """A pruned architecture of the teacher: every layer keeps half its heads (the first layer none: a layer can lose
    all of them), every dimension."""
    from dht.baselines import nas_prune as nas

    c = teacher.config
    dh = c.hidden_size // c.num_attention_heads
    layers = []
    for i in range(c.num_hidden_layers):
        heads = [] if i == 0 else list(range(0, c.num_attention_heads, 2))
        layers.append(nas.LayerArch(heads, [list(range(dh))] * len(heads), [list(range(dh))] * len(heads),
                                    list(range(c.intermediate_size))))
    return nas.PrunedArch(list(range(c.hidden_size)), layers, **nas.teacher_fields(teacher))


def save_baseline(name: str, teacher_dir: Path, out: Path) -> Path:
    """A baseline's model directory as the baseline stage leaves it: the kind's own save (what its `run` calls on
    job.out_model), then finish_model_dir (tokenizer, baseline.json, checksums). Random-init weights."""
    from dht.baselines import finish_model_dir
    from dht.baselines.distil import student_from_teacher
    from dht.baselines.fastbert import FastBERT
    from dht.baselines.flexibert import Architecture, FlexiBertForSequenceClassification
    from dht.baselines.nas_prune import extract
    from dht.integrity import load_checked_model

    teacher = load_checked_model(teacher_dir, "retrain")
    torch.manual_seed(0)
    if name.startswith("distil-"):
        student_from_teacher(teacher, int(name.removeprefix("distil-"))).save_pretrained(out)
    elif name.startswith("fastbert-"):
        FastBERT(teacher, cla_hidden_size=8).save(out)
    elif name.startswith("nas-prune-"):
        extract(teacher, tiny_arch(teacher)).save(out)
    else:
        arch = Architecture.homogeneous(2, "sdp", 2, 24, (48,))
        FlexiBertForSequenceClassification.build(arch, vocab_size=teacher.config.vocab_size, num_labels=2,
                                                 max_len=SEQ).save_pretrained(out)
    finish_model_dir(out, teacher_dir / "tokenizer", {
        "model_name": name, "dataset": "embedded-news", "classes": ["a", "b"], "max_length": SEQ,
        "results": f"results/embedded-news/{name}", "history": [0.5]}, teacher_dir)
    return out


@pytest.mark.parametrize(("name", "title", "layers"), [
    ("distil-3", "a DistilBERT student of the reference", [[12] * 3]),
    ("fastbert-0.5", "FastBERT: the reference with early-exit students", [[12] * k for k in range(1, 13)]),
    ("nas-prune-0.5", "the reference pruned by differentiable NAS", [[0] + [6] * 11]),
    ("flexibert-0.5", "the best FlexiBERT architecture within a FLOP budget", [[2, 2]]),
])
def test_a_baselines_directory_says_which_baseline_and_predicts(models, capsys, tmp_path, texts, name, title, layers):
    """It said "not a trained DHT model directory ... train it first". Each kind is read as its own code reads
    it, after the checksums (FastBERT's students on the teacher its baseline.json names)."""
    directory = save_baseline(name, models["greedy"], tmp_path / name)
    code = cli.main(["predict", "--model", str(directory), "--input", str(texts), "--device", "cpu", "--format",
                     "jsonl"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.err.startswith(f"note: {directory} is the baseline {name} ({title}), not a DHT model: ")
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["text"] for r in rows] == ["the striker scored", "shares fell"]
    assert all(r["label"] in ("a", "b") and r["heads"] in layers and r["layers"] == len(r["heads"]) for r in rows)
    # the bandits' setting means nothing to a baseline: said, not ignored
    line = predict_fails(capsys, directory, texts, "--inference", "greedy")
    assert line.startswith(f"error: --inference: {directory} is the baseline {name} (")
    assert line.endswith("it has no bandits to choose layers and heads (leave --inference out)")


def test_a_baseline_is_checked_like_a_dht_model(models, capsys, tmp_path, texts):
    """Its checksums first; FastBERT's students are never run on another teacher than they were distilled on."""
    teacher = shutil.copytree(models["greedy"], tmp_path / "vanilla-12")
    fastbert = save_baseline("fastbert-0.5", teacher, tmp_path / "fastbert-0.5")
    hint = "retrain it: snakemake --cores 4 --force results/embedded-news/fastbert-0.5/metrics.json"
    students = fastbert / "fastbert_students.safetensors"
    data = students.read_bytes()
    students.write_bytes(data[:100])
    assert predict_fails(capsys, fastbert, texts) == (
        f"error: {students}: checksum mismatch with {MANIFEST_FILE} (100 bytes): the file changed after the model "
        f"was saved (truncated or damaged); {hint}")
    students.write_bytes(data)
    weights = load_file(str(teacher / "model.safetensors"))
    weights["classifier.bias"] += 1
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(teacher)  # a retrained teacher, checksums and all
    assert predict_fails(capsys, fastbert, texts) == (
        f"error: {teacher}: not the teacher the students of {fastbert} were distilled on (its weights changed since: "
        f"retrained?); {hint}")
    shutil.rmtree(teacher)
    line = predict_fails(capsys, fastbert, texts)  # a model directory copied without its teacher
    assert line.startswith(f"error: {teacher}: no such directory; retrain it")


@pytest.mark.slow
def test_a_user_story_crafted_checkpoint_then_baselines_through_snakemake(tiny_project, tmp_path):
    """Through Snakemake and the `dht` command, as a user: a pickle that runs code put in place of the reference's
    checkpoint (its checksum header written by the attacker) stops the train stage before anything is unpickled
    the unsafe way, and the message's `rm -r` lets the run start over; then `dht predict` on the two baselines
    the pipeline built from that reference says which baseline each is and predicts with it."""
    from dht.integrity import write_checkpoint

    project = tiny_project
    marker = tmp_path / "code-ran"
    checkpoint_dir = project / "checkpoints/embedded-news/vanilla-12"
    checkpoint_dir.mkdir(parents=True)
    write_checkpoint({"fingerprint": "x", "progress": {"run_id": RunsCode(marker)}}, checkpoint_dir / "checkpoint.pt")
    assert_runs_code((checkpoint_dir / "checkpoint.pt").read_bytes(), marker)
    targets = ["results/embedded-news/distil-3/metrics.json", "results/embedded-news/fastbert-0.5/metrics.json"]
    command = ["snakemake", "--cores", "2", *targets, "--config", "profile=tiny"]
    failed = run_cli(command, cwd=project, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and not marker.exists()
    refusal = next(line for line in output.splitlines() if line.startswith("error: "))
    assert refusal.startswith("error: checkpoints/embedded-news/vanilla-12/checkpoint.pt: holds more than tensors "
                              "and plain data (")
    assert refusal.endswith("delete it to start this run over: rm -r checkpoints/embedded-news/vanilla-12")
    subprocess.run(refusal.split(": ")[-1].split(), cwd=project, check=True)  # the rm -r the message gives
    run_cli(command, cwd=project)
    for name in ("distil-3", "fastbert-0.5"):  # the baselines' logs show their training's progress, line by line
        log = (project / f"logs/baseline/embedded-news/{name}.log").read_text()
        progress = [line for line in log.splitlines() if "loss=" in line]
        assert "\r" not in log and progress and "100%|" in progress[-1] and "epoch=" in progress[-1], log[-2000:]

    texts = tmp_path / "texts.txt"
    texts.write_text("the striker scored twice\nshares fell sharply\n")
    for name, layers in (("distil-3", {3}), ("fastbert-0.5", set(range(1, 13)))):
        directory = f"models/embedded-news/{name}"
        assert json.loads((project / directory / "baseline.json").read_text())["teacher"]["path"] == "../vanilla-12"
        out = run_cli(["dht", "predict", "--model", directory, "--input", str(texts), "--format", "jsonl"], cwd=project)
        assert out.stderr.startswith(f"note: {directory} is the baseline {name} (")
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(rows) == 2 and all(r["layers"] in layers and len(r["heads"]) == r["layers"] for r in rows)
    assert not marker.exists()


def test_a_price_is_refused_for_a_model_without_a_sequential_mode(models, capsys, texts):
    """--price moves a sequential mode's stops (docs/training.md T31); on a tree mode's model it names the problem
    (tests/test_sequential.py runs it on a sequential one)."""
    line = predict_fails(capsys, models["greedy"], texts, "--price", "0.1")
    assert line.startswith("error: --price: ") and "is a tree mode's model" in line, line
