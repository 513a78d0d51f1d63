"""experiments/depth_probe.py: the learnability probes docs/embedded-data.md quotes run, learn what is easy to
learn, are deterministic, and refuse impossible settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "32", "--heads", "4", "--ffn", "64", "--dropout", "0", "--lr", "1e-2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("depth_probe", ROOT / "experiments" / "depth_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_classify_learns_the_bag_of_words_level(probe, capsys):
    # Easy samples are solved by the embeddings alone: one small layer gets them in a few hundred steps. If the
    # probe's data, vocabulary, batching or optimiser were broken this would stay at chance (0.25).
    args = ["classify", "--layers", "1", "--mix", "1", "0", "0", "--n-train", "1000", "--n-val", "100",
            "--epochs", "4", *SMALL]
    (result,) = probe.main(args)
    assert result["layers"] == 1 and result["step"] == 4 * (1000 // 16)
    assert result["easy"] >= 0.9 and result["accuracy"] == result["easy"]
    assert "hard" not in result  # no hard samples in this mix, so no made-up hard accuracy
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and lines[-1] == result  # one line per epoch, the last is the result


def test_classify_reports_every_level_and_depth_and_is_deterministic(probe, tmp_path):
    args = ["classify", "--layers", "1", "2", "--n-train", "96", "--n-val", "60", "--epochs", "1", "--hops", "2",
            *SMALL, "--out", str(tmp_path / "probe.json")]
    first = probe.main(args)
    assert [r["layers"] for r in first] == [1, 2]
    for row in first:
        assert {"easy", "medium", "hard"} <= row.keys()
        assert all(0.0 <= row[k] <= 1.0 for k in ("accuracy", "easy", "medium", "hard"))
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written["args"]["hops"] == 2 and _without_time(written["results"]) == _without_time(first)
    assert _without_time(probe.main(args)) == _without_time(first)


def test_stage_batches_train_the_stages_in_order_each_row_once(probe):
    import torch

    batches = probe.stage_batches([40, 25, 33], 8, torch.Generator().manual_seed(0))
    stage_of = [0 if int(r) < 40 else 1 if int(r) < 65 else 2 for rows in batches for r in rows]
    assert stage_of == sorted(stage_of)  # every batch of stage 1 before any of stage 2, never mixed
    assert [sum(s == k for s in stage_of) for k in range(3)] == [40, 24, 32]  # partial batches dropped per stage
    assert all(len(rows) == 8 for rows in batches)
    rows = torch.cat(batches)
    assert len(set(rows.tolist())) == len(rows)  # shuffled within a stage, no row twice
    assert rows[:40].tolist() != list(range(40))


def test_curriculum_trains_every_stage_and_scores_the_final_hops(probe, tmp_path, monkeypatch):
    drawn = []
    generate = probe.generate_split

    def recording(n, num_classes, seed, mix, hops):
        drawn.append((n, hops))
        return generate(n, num_classes, seed, mix, hops=hops)

    monkeypatch.setattr(probe, "generate_split", recording)
    args = ["classify", "--layers", "1", "--mix", "0", "0", "1", "--curriculum", "1", "3", "--hops", "3",
            "--n-train", "96", "--n-val", "40", "--epochs", "1", *SMALL, "--out", str(tmp_path / "c.json")]
    (result,) = probe.main(args)
    assert drawn == [(48, 1), (48, 3), (40, 3)]  # half of --n-train per stage; the validation split at --hops
    assert result["step"] == 2 * (48 // 16)  # both stages' batches were trained
    assert result["accuracy"] == result["hard"]
    assert json.loads((tmp_path / "c.json").read_text())["args"]["curriculum"] == [1, 3]
    assert _without_time(probe.main(args)) == _without_time([result])


def test_recall_learns_a_single_definition(probe):
    # One definition per text: recalling it needs no binding, so accuracy must leave the ~0 of an untrained head.
    (result,) = probe.main(["recall", "--layers", "1", "--ndef", "1", "--nq", "1", "--steps", "200", *SMALL])
    assert result["chance_among_defined"] == 1.0 and result["accuracy"] >= 0.9


def test_recall_texts_ask_back_what_they_define(probe):
    import numpy as np

    args = probe.parse_args(["recall", "--ndef", "3", "--nq", "2", "--hops", "2", "--batch-size", "4"])
    words = probe.SPECIALS + probe.vocabulary(4)
    index = {w: i for i, w in enumerate(words)}
    keywords = [w for kws in probe.class_vocabulary(4).values() for w in kws]
    ids, labels = probe.recall_batch(np.random.default_rng(0), args, index, keywords)
    assert ids.shape == labels.shape and ids.shape[0] == 4
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        toks = [words[i] for i in row]
        means = {toks[i - 1]: toks[i + 1] for i, t in enumerate(toks) if t == "means"}
        asked = [(toks[i - 1], words[lab[i]]) for i, t in enumerate(toks) if t == "[MASK]"]
        assert len(means) == 3 * 2 and len(asked) == 2
        for alias, answer in asked:
            hop = means[alias]  # two hops: the alias names another alias, which names the keyword
            assert hop in means and means[hop] == answer and answer in keywords


@pytest.mark.parametrize("argv,message", [
    (["recall", "--ndef", "2", "--nq", "3"], "--nq 3"),
    (["recall", "--ndef", "8", "--hops", "3"], "20 aliases"),
    (["classify", "--hidden", "30", "--heads", "4"], "not divisible"),
    (["classify", "--mix", "0.5", "0.5", "0.5"], "sum to 1"),
    (["recall", "--curriculum", "1", "2"], "classify option"),
    (["classify", "--curriculum", "1", "11"], "1 to 10"),
    (["classify", "--curriculum", "1", "2", "3", "--n-train", "90", "--batch-size", "32"], "less than one batch"),
])
def test_impossible_settings_are_refused_by_name(probe, capsys, argv, message):
    with pytest.raises(SystemExit):
        probe.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("num_classes,hops", [(2, 1), (4, 1), (4, 3), (8, 2)])
def test_vocabulary_covers_every_generated_word(probe, num_classes, hops):
    words = probe.vocabulary(num_classes)
    assert len(words) == len(set(words))
    frame = probe.generate_split(300, num_classes, seed=5, hops=hops)
    assert set(" ".join(frame["text"]).split()) <= set(words)
