"""The embedded dataset: a seeded, offline text-classification task whose samples differ in how much
composition they need, so that per-sample depth and heads have something to adapt to.

Every sample is a sequence of filler words with class *keywords* inserted. Three difficulty levels
(docs/embedded-data.md has worked examples):

- **easy (0)**: two or three keywords of the label's class, nothing else. A bag of words (one layer, or the
  embeddings alone) solves it.
- **medium (1)**: one keyword of the label's class and two keywords of *one other* class, each of those
  negated ("not", "never", "hardly" directly before it). Bag-of-words counting picks the wrong class; the model
  must bind each negator to the word after it (local composition, at least two layers: one to mark negated
  keywords, one for [CLS] to read the unmarked one). With two classes there is one negated keyword, so
  counting ties (see "two classes" below).
- **hard (2)**: alias binding across the sequence. The text opens by defining two aliases,
  ``alias1 means <keyword of class A> . alias2 means <keyword of class B> .``, carries a negated distractor of a
  third class in its middle (none with two classes), and ends with ``report on alias2`` (the label is B). Both
  classes' keywords appear un-negated, so counting gives chance; the model must find the queried alias, find
  where that alias was defined far back in the sequence, and read the keyword after ``means`` (an
  induction-style chain of several attention hops). With ``hops`` > 1 each alias is a *chain*:
  ``a1 means a2 . a2 means <keyword> .`` for two hops, the definitions of both chains shuffled together, so the
  answer takes ``hops`` lookups, each depending on the previous one's result (meant to make depth matter more;
  docs/embedded-data.md measures that, taught in stages, 3 layers resolve such chains as well as 12 do; the
  default stays at one hop).

Two classes: every distractor then belongs to the one other class, and with two negated distractors per
medium sample and one per hard sample a class's keywords would occur almost as often in the other class's
texts as in its own (1.2 against 1.6 per text): nothing, shallow or deep, learned from it in a few epochs.
So with two classes medium samples carry one negated distractor and hard samples none (0.6 against 1.6).

Labels are exactly balanced (round robin, then shuffled), and so are difficulty levels within each class.
Train, test and the validation split come from independent streams of the same seed, so the data set is a pure
function of (spec, seed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DIFFICULTY_NAMES = ("easy", "medium", "hard")

# Four topics mirroring AG News (World, Sports, Business, Sci/Tech) and two polarities mirroring Yelp-P.
# Words are real English so that a WordPiece vocabulary keeps them whole and samples stay readable.
_TOPIC_CLASSES = {
    "world": "embassy treaty minister parliament border refugee summit diplomat ceasefire sanctions "
    "election province envoy coalition rebels",
    "sports": "goalkeeper tournament striker playoffs coach stadium league referee champion medal "
    "quarterback innings sprinter marathon wicket",
    "business": "shares earnings merger investors revenue dividend quarterly stocks profits acquisition "
    "retailer inflation bankers lender tariffs",
    "scitech": "software processor telescope genome satellite laboratory algorithm vaccine microchip "
    "astronomers browser quantum robotics database spacecraft",
}
_EXTRA_TOPICS = {
    "health": "clinic nurses diabetes hospital surgeon patients therapy diagnosis pharmacy symptoms "
    "cardiology pediatric dental allergy midwife",
    "culture": "novelist orchestra gallery sculpture poetry theater ballet painter museum symphony "
    "playwright opera choir festival cinema",
    "travel": "airline passport resort cruise luggage hostel itinerary airport tourists ferry "
    "backpackers sightseeing hotel visa excursion",
    "weather": "hurricane rainfall drought thunderstorm forecast blizzard humidity tornado monsoon "
    "heatwave frost drizzle cyclone snowfall gusts",
}
_SENTIMENT_CLASSES = {
    "negative": "awful rude bland terrible stale dirty horrible greasy overpriced disappointing slow "
    "noisy mediocre soggy unfriendly",
    "positive": "delicious friendly superb wonderful fresh spotless excellent tasty generous "
    "delightful prompt cozy fantastic crispy welcoming",
}
_FILLER = ["the", "a", "this", "that", "today", "yesterday", "story", "people", "city", "local", "new", "old", "many", "some", "every", "after", "before", "during", "while", "with", "from", "into", "over", "under", "about", "around", "again", "also", "still", "just", "only", "very", "really", "quite", "week", "month", "year", "morning", "evening", "night", "time", "day", "place", "area", "group", "team", "staff", "owner", "visitors", "customers", "officials", "sources", "residents", "reporters", "said", "says", "told", "asked", "noted", "added", "went", "came", "saw", "made", "took", "gave", "kept", "found", "showed", "seemed", "looked", "felt", "thought", "knew", "left", "and", "or", "so", "then", "there", "here", "where", "when", "what", "which", "who", "whose", "our", "their", "its", "his", "her", "one", "two", "three", "several", "few", "most", "other", "another", "such", "same", "next", "last", "first", "second"]
_NEGATORS = ("not", "never", "hardly")
_ALIASES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta", "orion", "vega", "lyra", "draco", "nova", "atlas", "rigel", "altair", "sirius", "castor"]
_MEANS = "means"
_QUERY = ("report", "on")


def class_vocabulary(num_classes: int) -> dict[str, list[str]]:
    """Class name -> keywords: 2 classes are sentiments (Yelp-P), 3..8 are topics (AG News and more)."""
    if num_classes == 2:
        pools = _SENTIMENT_CLASSES
    elif 3 <= num_classes <= 8:
        pools = dict(list(_TOPIC_CLASSES.items()) + list(_EXTRA_TOPICS.items()))
    else:
        raise ValueError(f"num_classes = {num_classes}: the embedded generator supports 2 to 8 classes")
    return {name: words.split() for name, words in list(pools.items())[:num_classes]}


class _Writer:
    """Builds one sample's words; `rng` decides everything so the output is a function of the seed."""

    def __init__(self, rng: np.random.Generator, keywords: list[list[str]], length: tuple[int, int], hops: int = 1):
        self.rng = rng
        self.keywords = keywords
        self.length = length
        self.hops = hops

    def filler(self, n: int) -> list[str]:
        return [_FILLER[i] for i in self.rng.integers(0, len(_FILLER), size=n)]

    def keyword(self, cls: int) -> str:
        words = self.keywords[cls]
        return words[self.rng.integers(0, len(words))]

    def other_class(self, cls: int) -> int:
        k = len(self.keywords)
        return int((cls + 1 + self.rng.integers(0, k - 1)) % k)

    def scatter(self, pieces: list[list[str]], n_filler: int) -> list[str]:
        """Insert multi-word pieces at random, non-overlapping places of a filler sequence."""
        words = self.filler(n_filler)
        slots = np.sort(self.rng.choice(n_filler + 1, size=len(pieces), replace=True))
        order = self.rng.permutation(len(pieces))
        out: list[str] = []
        prev = 0
        for slot, idx in zip(slots, order, strict=True):
            out += words[prev:slot] + pieces[idx]
            prev = slot
        return out + words[prev:]

    def negated(self, cls: int) -> list[str]:
        return [_NEGATORS[self.rng.integers(0, len(_NEGATORS))], self.keyword(cls)]

    def n_filler(self, used: int) -> int:
        lo, hi = self.length
        return max(int(self.rng.integers(lo, hi + 1)) - used, 2)

    def easy(self, cls: int) -> list[str]:
        pieces = [[self.keyword(cls)] for _ in range(int(self.rng.integers(2, 4)))]
        return self.scatter(pieces, self.n_filler(len(pieces)))

    def medium(self, cls: int) -> list[str]:
        other = self.other_class(cls)
        distractors = 2 if len(self.keywords) > 2 else 1  # see "Two classes" in the module doc
        pieces = [[self.keyword(cls)], *(self.negated(other) for _ in range(distractors))]
        return self.scatter(pieces, self.n_filler(1 + 2 * distractors))

    def hard(self, cls: int) -> list[str]:
        other = self.other_class(cls)
        if self.hops == 1:  # the original recipe, kept draw for draw so that its data do not change
            a1, a2 = self.rng.choice(len(_ALIASES), size=2, replace=False)
            alias_true, alias_false = _ALIASES[a1], _ALIASES[a2]
            defs = [[alias_true, _MEANS, self.keyword(cls), "."], [alias_false, _MEANS, self.keyword(other), "."]]
            if self.rng.random() < 0.5:
                defs.reverse()
        else:
            names = [_ALIASES[i] for i in self.rng.choice(len(_ALIASES), size=2 * self.hops, replace=False)]
            chains = ((names[: self.hops], self.keyword(cls)), (names[self.hops :], self.keyword(other)))
            alias_true = chains[0][0][0]
            defs = [[chain[i], _MEANS, chain[i + 1] if i + 1 < self.hops else word, "."]
                    for chain, word in chains for i in range(self.hops)]
            defs = [defs[i] for i in self.rng.permutation(len(defs))]
        pieces = [self.negated(self.other_class(cls))] if len(self.keywords) > 2 else []
        body = self.scatter(pieces, self.n_filler(14 + 8 * (self.hops - 1)))
        return [w for d in defs for w in d] + body + [*_QUERY, alias_true]


def generate_split(
    n: int,
    num_classes: int,
    seed: int,
    difficulty_mix: tuple[float, float, float] = (0.4, 0.3, 0.3),
    length: tuple[int, int] = (18, 30),
    hops: int = 1,
) -> pd.DataFrame:
    """`n` samples with columns text, label (0-based), difficulty (0 easy, 1 medium, 2 hard); ``hops``: alias
    lookups a hard sample's answer takes (at most 10: two chains of distinct aliases).

    Deterministic in its arguments. Labels are balanced to within one sample; within each class, difficulty
    levels follow `difficulty_mix` (largest-remainder rounding).
    """
    if n < num_classes:
        raise ValueError(f"n = {n}: need at least one sample per class ({num_classes} classes)")
    if not 1 <= hops <= len(_ALIASES) // 2:
        raise ValueError(f"alias_hops = {hops}: must be 1 to {len(_ALIASES) // 2} (two chains of distinct aliases)")
    rng = np.random.default_rng(seed)
    keywords = list(class_vocabulary(num_classes).values())
    writer = _Writer(rng, keywords, length, hops)

    labels = np.arange(n) % num_classes
    difficulty = np.empty(n, dtype=np.int64)
    for cls in range(num_classes):
        idx = np.flatnonzero(labels == cls)
        difficulty[idx] = _apportion(len(idx), difficulty_mix)
    order = rng.permutation(n)
    labels, difficulty = labels[order], difficulty[order]

    makers = (writer.easy, writer.medium, writer.hard)
    texts = [" ".join(makers[d](int(y))) for y, d in zip(labels, difficulty, strict=True)]
    return pd.DataFrame({"text": texts, "label": labels.astype(np.int64), "difficulty": difficulty})


def _apportion(n: int, shares: tuple[float, ...]) -> np.ndarray:
    """`n` level ids in the given shares, rounded by largest remainder so counts sum to n."""
    raw = np.asarray(shares, dtype=float) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[i] += 1
    return np.repeat(np.arange(len(shares)), counts)


def generate(
    num_classes: int,
    n_train: int,
    n_test: int,
    seed: int,
    difficulty_mix: tuple[float, float, float] = (0.4, 0.3, 0.3),
    hops: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Train and test splits (independent seeded streams: the first two children of `seed`'s SeedSequence) and the
    class names."""
    seeds = np.random.SeedSequence(seed).spawn(2)
    train = generate_split(n_train, num_classes, int(seeds[0].generate_state(1)[0]), difficulty_mix, hops=hops)
    test = generate_split(n_test, num_classes, int(seeds[1].generate_state(1)[0]), difficulty_mix, hops=hops)
    return train, test, list(class_vocabulary(num_classes))


def generate_validation(
    num_classes: int,
    n: int,
    seed: int,
    difficulty_mix: tuple[float, float, float] = (0.4, 0.3, 0.3),
    hops: int = 1,
) -> pd.DataFrame:
    """The validation split of :func:`generate` with the same `seed`: a third independent stream (the third child
    of the SeedSequence), drawn like the training split (labels balanced, difficulty shares kept within each class),
    so adding it leaves the training and test splits as they were."""
    stream = np.random.SeedSequence(seed).spawn(3)[2]
    return generate_split(n, num_classes, int(stream.generate_state(1)[0]), difficulty_mix, hops=hops)
