"""Dataset sources: Zhang et al. (2015) CSV, Hugging Face (a locally saved dataset), the embedded generator."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import dataset_spec

from dht.data import (
    DatasetError,
    load_text_dataset,
    load_zhang_dir,
    read_raw,
    read_zhang_csv,
    split_validation,
    subsample,
    write_raw,
)

# Rows as they stand in the original files: every field quoted, "" for a quote, literal backslashes in AG News.
AG_TRAIN = (
    '"3","Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, Wall Street\'s dwindling\\band of ultra-cynics, are seeing green again."\n'
    '"4","Oracle says ""no"" to PeopleSoft","SAN FRANCISCO - The bid, at #36;21 a share, was rejected."\n'
    '"1","Talks, resume","Diplomats met, again\\; talks go on."\n'
    '"2","Cup final","A late goal."\n'
)
AG_TEST = '"2","Final, replay","Extra time."\n"1","Summit","Leaders meet."\n'
YELP = '"1","Terrible.\\nCold food, ""fresh"" it was not."\n"2","Great!\\n\\nWill return."\n'


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_zhang_quotes_escapes_backslashes_and_one_based_labels(tmp_path):
    frame = read_zhang_csv(write(tmp_path / "train.csv", AG_TRAIN), ["title", "description"])
    assert frame["label"].tolist() == [3, 4, 1, 2]  # as in the file; load_zhang_dir makes them 0-based
    assert frame["text"][0] == (
        "Wall St. Bears Claw Back Into the Black (Reuters)\n"
        "Reuters - Short-sellers, Wall Street's dwindling\\band of ultra-cynics, are seeing green again."
    )
    assert 'Oracle says "no" to PeopleSoft' in frame["text"][1]  # "" is an escaped quote
    assert "Talks, resume" in frame["text"][2]  # a comma inside quotes is not a separator
    assert "again\\;" in frame["text"][2]  # backslashes are kept as they are in AG News


def test_zhang_yelp_literal_newlines(tmp_path):
    frame = read_zhang_csv(write(tmp_path / "train.csv", YELP), ["text"])
    assert frame["text"][0] == 'Terrible.\nCold food, "fresh" it was not.'
    assert frame["text"][1] == "Great!\n\nWill return."
    kept = read_zhang_csv(tmp_path / "train.csv", ["text"], unescape_newlines=False)
    assert kept["text"][1] == "Great!\\n\\nWill return."


def test_zhang_dir_with_classes_gives_zero_based_labels(tmp_path):
    write(tmp_path / "ag" / "train.csv", AG_TRAIN)
    write(tmp_path / "ag" / "test.csv", AG_TEST)
    write(tmp_path / "ag" / "classes.txt", "World\nSports\nBusiness\nSci/Tech\n")
    ds = load_zhang_dir(tmp_path / "ag", ["title", "description"])
    assert ds.classes == ["World", "Sports", "Business", "Sci/Tech"]
    assert ds.train["label"].tolist() == [2, 3, 0, 1] and ds.test["label"].tolist() == [1, 0]


def test_zhang_wrong_column_count(tmp_path):
    path = write(tmp_path / "train.csv", '"1","a","b"\n"2","only one"\n')
    with pytest.raises(DatasetError, match=r"train.csv, line 2: 2 columns, expected 3 \(class, title, description\)"):
        read_zhang_csv(path, ["title", "description"])


def test_zhang_label_not_an_index(tmp_path):
    for bad in ('"0","x","y"\n', '"World","x","y"\n', '"-1","x","y"\n'):
        path = write(tmp_path / "train.csv", bad)
        with pytest.raises(DatasetError, match="is not a 1-based class index"):
            read_zhang_csv(path, ["title", "description"])


def test_zhang_label_out_of_range_of_classes(tmp_path):
    write(tmp_path / "d" / "train.csv", '"1","a"\n"2","b"\n')
    write(tmp_path / "d" / "test.csv", '"3","c"\n')
    with pytest.raises(DatasetError, match=r"test.csv, line 1: class 3 is out of range: the training split has 2 classes"):
        load_zhang_dir(tmp_path / "d", ["text"])
    write(tmp_path / "d" / "classes.txt", "neg\n")
    with pytest.raises(DatasetError, match=r"train.csv, line 2: class 2 is out of range: classes.txt lists 1 classes"):
        load_zhang_dir(tmp_path / "d", ["text"])


def test_zhang_empty_split_and_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="the split is empty"):
        read_zhang_csv(write(tmp_path / "train.csv", ""), ["text"])
    with pytest.raises(DatasetError, match="file not found"):
        read_zhang_csv(tmp_path / "nope.csv", ["text"])
    with pytest.raises(DatasetError, match="no such directory"):
        load_zhang_dir(tmp_path / "missing", ["text"])


def test_zhang_broken_quoting(tmp_path):
    path = write(tmp_path / "train.csv", '"1","an "unescaped" quote"\n')
    with pytest.raises(DatasetError, match="malformed CSV"):
        read_zhang_csv(path, ["text"])


def test_csv_source_through_the_common_interface(tmp_path):
    write(tmp_path / "ag" / "train.csv", AG_TRAIN)
    write(tmp_path / "ag" / "test.csv", AG_TEST)
    spec = dataset_spec(source="csv", path="ag", fields=["title", "description"], max_train_samples=2, max_length=128)
    ds = load_text_dataset(spec, seed=0, val_fraction=0, params_dir=tmp_path)
    assert len(ds.train) == 2 and len(ds.test) == 2 and ds.source.startswith("csv:")


def _hub_like_datasetdict():
    import datasets

    features = datasets.Features({
        "title": datasets.Value("string"),
        "content": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["Company", "Artist", "Athlete"]),
    })
    rows = {"title": ["Acme", "Ann", "Bo", "Zed"], "content": ["makes things", "paints", "runs", "sells"],
            "label": [0, 1, 2, 0]}
    split = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict({"train": split, "test": split.select([1, 2])})


def test_hub_source_from_a_saved_dataset(tmp_path):
    _hub_like_datasetdict().save_to_disk(str(tmp_path / "dbpedia"))
    spec = dataset_spec(source="hub", path=str(tmp_path / "dbpedia"), text_fields=["title", "content"], max_length=128)
    ds = load_text_dataset(spec, seed=0, val_fraction=0)
    assert ds.classes == ["Company", "Artist", "Athlete"]
    assert ds.train["text"].tolist()[0] == "Acme\nmakes things"
    assert ds.train["label"].tolist() == [0, 1, 2, 0] and len(ds.test) == 2


def test_hub_source_from_a_directory_in_hub_layout(tmp_path):
    """The same `datasets.load_dataset(path)` call that reads `fancyzhx/dbpedia_14` from the hub, on a local
    directory laid out like the hub repository (data/<split>-*.parquet)."""
    dd = _hub_like_datasetdict()
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split in dd:
        dd[split].to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    spec = dataset_spec(source="hub", path=str(tmp_path / "repo"), text_fields=["title", "content"], max_length=128)
    ds = load_text_dataset(spec, seed=0, val_fraction=0)
    assert ds.classes == ["Company", "Artist", "Athlete"]  # ClassLabel survives in the parquet metadata
    assert len(ds.train) == 4 and ds.test["text"].tolist() == ["Ann\npaints", "Bo\nruns"]


def test_hub_source_errors_are_clear(tmp_path):
    _hub_like_datasetdict().save_to_disk(str(tmp_path / "d"))
    bad_field = dataset_spec(source="hub", path=str(tmp_path / "d"), text_fields=["text"], max_length=128)
    with pytest.raises(DatasetError, match=r"no column\(s\) text; it has title, content, label"):
        load_text_dataset(bad_field, seed=0, val_fraction=0)
    bad_split = dataset_spec(source="hub", path=str(tmp_path / "d"), text_fields=["title"], test_split="validation", max_length=128)
    with pytest.raises(DatasetError, match="no split 'validation'; it has train, test"):
        load_text_dataset(bad_split, seed=0, val_fraction=0)
    missing = dataset_spec(source="hub", path=str(tmp_path / "nowhere" / "x"), text_fields=["title"], max_length=128)
    with pytest.raises(DatasetError, match="save_to_disk"):
        load_text_dataset(missing, seed=0, val_fraction=0)


def test_embedded_source_and_raw_round_trip(tmp_path):
    spec = dataset_spec(source="embedded", num_classes=2, n_train=40, n_test=10, difficulty_mix=(0.4, 0.3, 0.3), max_length=48)
    ds = load_text_dataset(spec, seed=1, val_fraction=0.25)
    meta = write_raw(ds, tmp_path / "raw", "emb")
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (40, 10, 10)
    assert meta["classes"] == ["negative", "positive"] and meta["has_difficulty"]
    back = read_raw(tmp_path / "raw")
    pd.testing.assert_frame_equal(back.train, ds.train)
    pd.testing.assert_frame_equal(back.val, ds.val)
    assert back.classes == ds.classes and json.loads((tmp_path / "raw" / "meta.json").read_text())["num_labels"] == 2


def test_read_raw_missing_says_which_stage(tmp_path):
    with pytest.raises(DatasetError, match="run the download stage first"):
        read_raw(tmp_path)


def test_subsample_is_stratified_and_seeded():
    frame = pd.DataFrame({"text": [str(i) for i in range(1000)], "label": [i % 4 for i in range(1000)]})
    a, b = subsample(frame, 100, seed=3), subsample(frame, 100, seed=3)
    assert a.equals(b) and len(a) == 100
    assert a["label"].value_counts().tolist() == [25, 25, 25, 25]
    assert subsample(frame, None, 0).equals(frame)


def test_without_classes_txt_a_stray_label_is_refused_naming_its_rows(tmp_path):
    """AG News with one "9" among 1-4 was taken as 9 classes, 5 of them empty."""
    write(tmp_path / "ag" / "train.csv", AG_TRAIN + '"9","Stray","A mistyped label."\n' + AG_TRAIN)
    write(tmp_path / "ag" / "test.csv", AG_TEST)
    with pytest.raises(DatasetError, match=r"train.csv: without classes.txt the classes are 1..9 \(the largest label\), "
                                           r"but class 5, 6, 7, 8 have no training row: the labels above 4 are at "
                                           r"line 5 \(class 9\)\. Correct them, or add classes.txt"):
        load_zhang_dir(tmp_path / "ag", ["title", "description"])
    write(tmp_path / "ag" / "classes.txt", "\n".join(f"c{i}" for i in range(1, 10)) + "\n")  # declared: accepted
    assert len(load_zhang_dir(tmp_path / "ag", ["title", "description"]).classes) == 9


def test_rows_with_empty_text_are_refused_with_their_lines(tmp_path):
    path = write(tmp_path / "train.csv", AG_TRAIN + '"1","",""\n"2","x","y"\n"3"," ",""\n')
    with pytest.raises(DatasetError, match=r"train.csv, line 5 and 1 more \(lines 7\): empty text"):
        read_zhang_csv(path, ["title", "description"])
    title_only = read_zhang_csv(write(tmp_path / "t.csv", '"1","","a text"\n'), ["title", "description"])
    assert title_only["text"].tolist() == ["a text"]  # one empty field of two is fine (the DBpedia subset)


def test_a_single_class_is_refused_with_the_counts(tmp_path):
    write(tmp_path / "one" / "train.csv", '"1","a"\n"1","b"\n"1","c"\n')
    write(tmp_path / "one" / "test.csv", '"1","d"\n')
    with pytest.raises(DatasetError, match=r"train.csv: a single class in the training split \(1: 3 rows, of 1 class"):
        load_zhang_dir(tmp_path / "one", ["text"])
    write(tmp_path / "one" / "classes.txt", "neg\npos\n")
    with pytest.raises(DatasetError, match=r"a single class in the training split \(neg: 3 rows, of 2 class"):
        load_zhang_dir(tmp_path / "one", ["text"])


def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(AG_TRAIN.encode() * 300 + '"1","Caf\xe9","cr\xe8me"\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"train.csv, line 1201: bytes b'\\xe9' are not UTF-8"):
        read_zhang_csv(path, ["title", "description"])


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_class(tmp_path):
    write(tmp_path / "ag" / "train.csv", "\ufeff" + AG_TRAIN)
    write(tmp_path / "ag" / "test.csv", "\ufeff" + AG_TEST)
    write(tmp_path / "ag" / "classes.txt", "\ufeffWorld\nSports\nBusiness\nSci/Tech\n")
    ds = load_zhang_dir(tmp_path / "ag", ["title", "description"])
    assert ds.classes[0] == "World" and ds.train["label"].tolist() == [2, 3, 0, 1]


def test_a_hub_dataset_with_empty_texts_or_a_single_class_is_refused(tmp_path):
    import datasets

    def save(name, texts, labels):
        split = datasets.Dataset.from_dict({"text": texts, "label": labels})
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / name))
        return dataset_spec(source="hub", path=str(tmp_path / name), text_fields=["text"], max_length=128)

    with pytest.raises(DatasetError, match=r"\[train\]: a single class in the training split \(0: 3 rows, of 1 class"):
        load_text_dataset(save("one", ["a", "b", "c"], [0, 0, 0]), seed=0, val_fraction=0)
    with pytest.raises(DatasetError, match=r"\[train\]: empty text in row\(s\) 1, 2 \(0-based\)"):
        load_text_dataset(save("empty", ["a", "", " ", "d"], [0, 1, 0, 1]), seed=0, val_fraction=0)


# --- the validation split (data.val_fraction) -----------------------------------------------------------------


def _csv_dataset(root: Path, n_train: int = 200, n_test: int = 30) -> None:
    """A csv dataset of unique texts, classes 1..3 in shares 50% / 30% / 20%."""
    def rows(n: int, prefix: str) -> str:
        return "".join(f'"{1 + (i % 10 >= 5) + (i % 10 >= 8)}","{prefix} text {i}"\n' for i in range(n))
    write(root / "d" / "train.csv", rows(n_train, "train"))
    write(root / "d" / "test.csv", rows(n_test, "test"))


def test_the_validation_split_is_stratified_disjoint_and_drawn_before_the_training_subset(tmp_path):
    _csv_dataset(tmp_path)
    spec = dataset_spec(source="csv", path="d", fields=["text"], max_train_samples=150, max_length=128)
    ds = load_text_dataset(spec, seed=0, val_fraction=0.1, params_dir=tmp_path)
    # 10% of the 200 rows as shipped (not of the 150 drawn for training), which stay 150: the draw is from the rest
    assert (len(ds.train), len(ds.val), len(ds.test)) == (150, 20, 30)
    assert ds.val["label"].value_counts().sort_index().tolist() == [10, 6, 4]  # the split's 50/30/20 shares
    train, val, test = (set(f["text"]) for f in (ds.train, ds.val, ds.test))
    assert not train & val and not val & test and not train & test
    assert all(t.startswith("train text ") for t in train | val)  # both parts of the shipped training split
    assert ds.val.index.tolist() == list(range(20))  # index reset, rows in file order
    assert ds.val["text"].tolist() == sorted(ds.val["text"], key=lambda t: int(t.split()[-1]))


def test_the_validation_split_is_seeded():
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(300)], "label": [i % 3 for i in range(300)]})
    a_rest, a = split_validation(frame, 0.1, seed=4)
    b_rest, b = split_validation(frame, 0.1, seed=4)
    _, c = split_validation(frame, 0.1, seed=5)
    assert a.equals(b) and a_rest.equals(b_rest)  # same seed, same rows
    assert set(a["text"]) != set(c["text"])  # another seed, other rows
    assert sorted(a_rest["text"].tolist() + a["text"].tolist()) == sorted(frame["text"])  # a partition


def test_a_zero_fraction_holds_nothing_out_and_leaves_the_training_draw_as_it_was(tmp_path):
    _csv_dataset(tmp_path)
    spec = dataset_spec(source="csv", path="d", fields=["text"], max_train_samples=150, max_length=128)
    ds = load_text_dataset(spec, seed=0, val_fraction=0, params_dir=tmp_path)
    assert len(ds.val) == 0 and list(ds.val.columns) == list(ds.train.columns)
    assert ds.train.equals(subsample(load_zhang_dir(tmp_path / "d", ["text"]).train, 150, 0))
    meta = write_raw(ds, tmp_path / "raw", "d")
    assert meta["n_val"] == 0 and len(read_raw(tmp_path / "raw").val) == 0


def test_the_embedded_validation_split_is_a_third_stream_that_leaves_train_and_test_as_they_were():
    spec = dataset_spec(source="embedded", num_classes=4, n_train=400, n_test=40, difficulty_mix=(0.4, 0.3, 0.3), max_length=48)
    ds = load_text_dataset(spec, seed=0, val_fraction=0.1)
    without = load_text_dataset(spec, seed=0, val_fraction=0)
    assert ds.train.equals(without.train) and ds.test.equals(without.test) and len(without.val) == 0
    assert (len(ds.train), len(ds.val)) == (400, 40)
    counts = ds.val.groupby(["label", "difficulty"]).size()  # each class, and each level within it, in its share
    assert counts.to_dict() == {(label, level): n for label in range(4) for level, n in enumerate((4, 3, 3))}
    assert not set(ds.train["text"]) & set(ds.val["text"]) and not set(ds.test["text"]) & set(ds.val["text"])
    again = load_text_dataset(spec, seed=0, val_fraction=0.1)
    other = load_text_dataset(spec, seed=1, val_fraction=0.1)
    assert again.val.equals(ds.val) and not set(other.val["text"]) & set(ds.val["text"])  # seeded


def test_a_validation_split_that_would_miss_a_class_is_refused_with_the_fix():
    frame = pd.DataFrame({"text": list("abcdefgh"), "label": [0, 0, 0, 0, 1, 1, 1, 2]})
    with pytest.raises(DatasetError, match=r"class 2 has a single row.*set data.val_fraction: 0"):
        split_validation(frame, 0.25, 0, "x [train]")
    frame["label"] = [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(DatasetError, match=r"holds out 1 and leaves 7 to train, but each needs a row of every one of "
                                           r"the 3 classes"):
        split_validation(frame, 0.1, 0)
