"""The embedded generator: deterministic, balanced, and built so that difficulty means what it says."""

from __future__ import annotations

import numpy as np
import pytest

from dht.embedded import _ALIASES, _NEGATORS, class_vocabulary, generate, generate_split


def test_same_seed_same_data_other_seed_other_data():
    a_train, a_test, classes = generate(4, 400, 100, seed=7)
    b_train, b_test, _ = generate(4, 400, 100, seed=7)
    c_train, _, _ = generate(4, 400, 100, seed=8)
    assert a_train.equals(b_train) and a_test.equals(b_test)
    assert not a_train["text"].equals(c_train["text"])
    assert classes == ["world", "sports", "business", "scitech"]


def test_train_and_test_are_different_streams():
    train, test, _ = generate(4, 300, 300, seed=0)
    assert len(set(train["text"]) & set(test["text"])) < 5


@pytest.mark.parametrize("num_classes,n", [(2, 1001), (4, 4000), (4, 402), (8, 50)])
def test_classes_are_balanced(num_classes, n):
    frame = generate_split(n, num_classes, seed=3)
    counts = np.bincount(frame["label"], minlength=num_classes)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_difficulty_mix_is_followed_within_each_class():
    frame = generate_split(3000, 4, seed=1, difficulty_mix=(0.5, 0.25, 0.25))
    for _cls, group in frame.groupby("label"):
        shares = np.bincount(group["difficulty"], minlength=3) / len(group)
        assert np.allclose(shares, [0.5, 0.25, 0.25], atol=0.01)


def _keyword_classes(text: str, vocab: dict[str, list[str]]) -> list[tuple[int, bool]]:
    """(class, negated) for every keyword in a text."""
    words = text.split()
    index = {w: c for c, ws in enumerate(vocab.values()) for w in ws}
    return [(index[w], i > 0 and words[i - 1] in _NEGATORS) for i, w in enumerate(words) if w in index]


@pytest.mark.parametrize("num_classes", [2, 4])
def test_difficulty_levels_have_their_structure(num_classes):
    vocab = class_vocabulary(num_classes)
    frame = generate_split(600, num_classes, seed=5)
    for text, label, difficulty in frame.itertuples(index=False):
        kws = _keyword_classes(text, vocab)
        if difficulty == 0:  # only the label's keywords, none negated
            assert kws and all(c == label and not neg for c, neg in kws)
        elif difficulty == 1:  # one plain keyword of the label, negated keywords of one other class
            plain = [c for c, neg in kws if not neg]
            negated = [c for c, neg in kws if neg]
            assert plain == [label] and len(set(negated)) == 1 and negated[0] != label
            assert len(negated) == (2 if num_classes > 2 else 1)  # two classes: counting ties instead of misleads
        else:  # two aliases defined, the queried one names the label's keyword
            words = text.split()
            assert words[-3:-1] == ["report", "on"] and words[-1] in _ALIASES
            definition = words.index(words[-1])
            assert words[definition + 1] == "means"
            assert _keyword_classes(words[definition + 2], vocab)[0][0] == label
            plain = {c for c, neg in kws if not neg}
            assert label in plain and len(plain) == 2  # counting keywords cannot decide
            assert sum(neg for _, neg in kws) == (1 if num_classes > 2 else 0)


@pytest.mark.parametrize("hops", [2, 3])
def test_chained_aliases_resolve_to_the_label_in_hops_lookups(hops):
    vocab = class_vocabulary(4)
    frame = generate_split(300, 4, seed=6, hops=hops)
    for text, label, difficulty in frame.itertuples(index=False):
        if difficulty != 2:
            continue
        words = text.split()
        defs = {}
        for i in range(0, 8 * hops, 4):  # the definitions open the text
            alias, means, value, stop = words[i : i + 4]
            assert alias in _ALIASES and means == "means" and stop == "." and alias not in defs
            defs[alias] = value
        lookups, name = 0, words[-1]
        while name in defs:
            name, lookups = defs[name], lookups + 1
        assert lookups == hops and _keyword_classes(name, vocab)[0][0] == label
        plain = {c for c, neg in _keyword_classes(text, vocab) if not neg}
        assert label in plain and len(plain) == 2  # the other chain ends in another class: counting cannot decide
    assert generate_split(300, 4, seed=6)["text"].tolist() != frame["text"].tolist()


def test_bag_of_words_cannot_solve_hard_samples():
    """A linear bag-of-words classifier is near perfect on easy samples and near chance on hard ones: the
    hard samples really need composition (this is what makes depth matter)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test, _ = generate(4, 3000, 1200, seed=0)
    vec = CountVectorizer(token_pattern=r"[^ ]+")
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(train["text"]), train["label"])
    pred = clf.predict(vec.transform(test["text"]))
    acc = {d: float((pred == test["label"])[test["difficulty"] == d].mean()) for d in range(3)}
    assert acc[0] > 0.95
    assert acc[2] < 0.65  # 2 candidate classes out of 4: chance is 0.5 among them


def test_keywords_still_point_to_their_class_with_two_classes():
    """With two classes, a class's keywords must be clearly more frequent in its own texts than in the other
    class's, or no model gets a first foothold (the reason for the two-class rule)."""
    vocab = class_vocabulary(2)
    frame = generate_split(2000, 2, seed=4)
    own, other = [], []
    for text, label, _ in frame.itertuples(index=False):
        kws = _keyword_classes(text, vocab)
        own.append(sum(c == label for c, _ in kws))
        other.append(sum(c != label for c, _ in kws))
    assert np.mean(own) > 2 * np.mean(other)


def test_unsupported_class_count():
    with pytest.raises(ValueError, match="2 to 8 classes"):
        class_vocabulary(9)
