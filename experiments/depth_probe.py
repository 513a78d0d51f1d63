"""Depth probe: can an encoder trained from scratch here learn what the embedded hard samples need, and does
depth help? Outside the pipeline, so that one configuration takes minutes, not a `make reproduce`.

docs/embedded-data.md reports what these probes measured and why; the pipeline's own answer for the configured
data and budget is Table 1's difficulty table (`vanilla-3` beside `vanilla-12`).

Two tasks, each training one DHT encoder (dht.model, pre-LN + SkipInit as the default profile builds it) per
``--layers`` value, one after the other, on one CPU thread, with a word-level vocabulary (no tokenizer to train):

``classify``
    The embedded classification data (dht.embedded.generate_split) with the given classes, difficulty mix and
    alias hops; accuracy on a held-out validation split (``--n-val`` samples of the probe's own seeded stream,
    never the pipeline's test split), overall and per difficulty level. ``--n-train`` samples are seen
    ``--epochs`` times; ``--epochs 1`` with a large ``--n-train`` gives every step fresh samples, which tells
    "not learnable in this many steps" apart from "memorised the training set". ``--curriculum 1 2 3`` trains
    in stages of growing hop counts (equal shares of ``--n-train``, in order) and is still scored on ``--hops``.
``recall``
    Multi-query associative recall as masked-LM, the skill a hard sample needs, with a dense signal: each text
    defines ``--ndef`` aliases (``vega means stadium .``, or chains of ``--hops`` aliases) and asks ``--nq`` of
    them back (``report on vega [MASK]``); accuracy of the masked answers on 8 held-out validation batches (their
    own seeds). Choosing among the defined keywords without binding them scores 1/ndef, the plateau an untrained
    recall circuit sits on.

Both score a held-out validation split of their own: the probe chooses settings (depths, hops, curricula) and
never reads a test split (docs/pipeline.md, "The validation split").

Examples (times on one core of the development machine)::

    python experiments/depth_probe.py classify --layers 3 12 --epochs 3            # the default budget, ~2 min
    python experiments/depth_probe.py classify --layers 3 --mix 0 0 1 --n-train 64000 --epochs 1   # fresh data
    python experiments/depth_probe.py recall --layers 2 --steps 5000 --eval-every 500               # ~5 min

One JSON line per evaluation on stdout; ``--out`` also writes the final results as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

# The generator's own word lists (private: dht/embedded.py is an input of the pipeline's data stage, so the probe
# reads them rather than adding to that module and making every pipeline output out of date).
from dht.embedded import (
    _ALIASES,
    _FILLER,
    _MEANS,
    _NEGATORS,
    _QUERY,
    DIFFICULTY_NAMES,
    class_vocabulary,
    generate_split,
)
from dht.model import DHTConfig, DHTForSequenceClassification

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["classify", "recall"])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 12], help="depths to train, one model each")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=384)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--residual-init-scale", type=float, default=0.0, help="0 = SkipInit (the default profile)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: once per epoch)")
    parser.add_argument("--hops", type=int, default=1, help="alias lookups a hard sample / a recall query takes")
    parser.add_argument("--out", type=Path, help="write the final results here as JSON")
    classify = parser.add_argument_group("classify")
    classify.add_argument("--classes", type=int, default=4)
    classify.add_argument("--n-train", type=int, default=3000)
    classify.add_argument("--n-val", type=int, default=800, help="held-out validation samples, scored at each evaluation")
    classify.add_argument("--epochs", type=int, default=3)
    classify.add_argument("--mix", type=float, nargs=3, default=[0.4, 0.3, 0.3], metavar=("EASY", "MEDIUM", "HARD"))
    classify.add_argument("--curriculum", type=int, nargs="+", metavar="HOPS",
                          help="train in stages of these hop counts, in order, each on an equal share of "
                               "--n-train (e.g. 1 2 3); the validation split keeps --hops")
    recall = parser.add_argument_group("recall")
    recall.add_argument("--steps", type=int, default=1500)
    recall.add_argument("--ndef", type=int, default=4, help="alias chains defined per text")
    recall.add_argument("--nq", type=int, default=4, help="of them asked back (masked) per text")
    recall.add_argument("--filler", type=int, default=4, help="filler words between definitions and queries")
    args = parser.parse_args(argv)
    if args.task == "recall":
        if not 1 <= args.nq <= args.ndef:
            parser.error(f"--nq {args.nq}: must be 1 to --ndef ({args.ndef}), each query asks a different alias")
        if args.ndef * args.hops > 20:
            parser.error(f"--ndef {args.ndef} x --hops {args.hops} needs more than the generator's 20 aliases")
    if args.task == "classify" and (min(args.mix) < 0 or abs(sum(args.mix) - 1.0) > 1e-6):
        shares = " ".join(map(str, args.mix))
        parser.error(f"--mix {shares}: the easy, medium and hard shares must be >= 0 and sum to 1")
    if args.curriculum is not None:
        if args.task != "classify":
            parser.error("--curriculum is a classify option (recall draws fresh texts of --hops every step)")
        if not all(1 <= h <= 10 for h in args.curriculum):
            parser.error(f"--curriculum {' '.join(map(str, args.curriculum))}: hop counts must be 1 to 10")
        if args.n_train // len(args.curriculum) < args.batch_size:
            parser.error(f"--n-train {args.n_train} gives each of the {len(args.curriculum)} curriculum stages "
                         f"less than one batch (--batch-size {args.batch_size})")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


# ---- data ------------------------------------------------------------------------------------------------------


def vocabulary(num_classes: int) -> list[str]:
    """Every word the embedded generator can write for `num_classes` classes, in a fixed order: a word-level
    vocabulary that covers any sample of any seed."""
    words = [w for kws in class_vocabulary(num_classes).values() for w in kws]
    words += [*_FILLER, *_NEGATORS, *_ALIASES, _MEANS, ".", *_QUERY]
    return list(dict.fromkeys(words))


def encode(texts: list[str], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP], padded to the longest: (ids, attention mask)."""
    rows = [[index["[CLS]"], *(index[w] for w in t.split()), index["[SEP]"]] for t in texts]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long()


def recall_batch(rng: np.random.Generator, args: argparse.Namespace, index: dict[str, int],
                 keywords: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts of shuffled definitions (chains of ``hops`` aliases ending in a keyword), a little filler, then
    ``nq`` masked queries; labels are -100 except at the masks."""
    ids, labels = [], []
    for _ in range(args.batch_size):
        names = [_ALIASES[i] for i in rng.choice(len(_ALIASES), size=args.ndef * args.hops, replace=False)]
        answers = [keywords[i] for i in rng.choice(len(keywords), size=args.ndef, replace=False)]
        chains = [names[c * args.hops:(c + 1) * args.hops] for c in range(args.ndef)]
        defs = [[chain[h], "means", chain[h + 1] if h + 1 < args.hops else answer, "."]
                for chain, answer in zip(chains, answers, strict=True) for h in range(args.hops)]
        toks = ["[CLS]"] + [w for i in rng.permutation(len(defs)) for w in defs[i]]
        toks += [_FILLER[i] for i in rng.integers(0, len(_FILLER), args.filler)]
        target = [-100] * len(toks)
        for c in rng.choice(args.ndef, size=args.nq, replace=False):
            toks += ["report", "on", chains[c][0], "[MASK]"]
            target += [-100, -100, -100, index[answers[c]]]
        ids.append([index[t] for t in [*toks, "[SEP]"]])
        labels.append([*target, -100])
    return torch.tensor(ids), torch.tensor(labels)  # one length: every text has the same shape


def stage_batches(sizes: list[int], batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of one epoch's batches over stages of `sizes` rows stored one after the other: the stages in
    order, each shuffled on its own, a stage's last partial batch dropped. One stage is a plain shuffle."""
    batches, start = [], 0
    for size in sizes:
        perm = start + torch.randperm(size, generator=generator)
        batches += [perm[b * batch_size:(b + 1) * batch_size] for b in range(size // batch_size)]
        start += size
    return batches


# ---- model -----------------------------------------------------------------------------------------------------


def build(args: argparse.Namespace, layers: int, vocab_size: int, num_labels: int, max_len: int
          ) -> DHTForSequenceClassification:
    config = DHTConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=layers,
                       num_attention_heads=args.heads, intermediate_size=args.ffn, max_position_embeddings=max_len,
                       num_labels=num_labels, fixed_layers=min(3, layers), hidden_dropout_prob=args.dropout,
                       attention_probs_dropout_prob=args.dropout, layer_norm="pre",
                       residual_init_scale=args.residual_init_scale)
    return DHTForSequenceClassification(config)


def token_states(model: DHTForSequenceClassification, ids: torch.Tensor) -> torch.Tensor:
    """Every token's final state (pre-LN's final LayerNorm applied): what a masked-LM head reads."""
    return model(input_ids=ids).last_hidden_state


def optimiser(params: list[torch.nn.Parameter], args: argparse.Namespace, steps: int):
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return opt, get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)


def step(loss: torch.Tensor, params: list[torch.nn.Parameter], opt, schedule, where: str) -> float:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at {where}: lower --lr")
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    schedule.step()
    return loss.item()


# ---- the two probes --------------------------------------------------------------------------------------------


def run_classify(args: argparse.Namespace, layers: int, emit) -> dict:
    torch.manual_seed(args.seed)
    mix = tuple(args.mix)
    stages = args.curriculum or [args.hops]
    # stage 0 keeps the single-stage seed, so a run without --curriculum draws the data it always drew
    train = [generate_split(args.n_train // len(stages), args.classes, 1 + 10 * args.seed + 100 * s, mix, hops=h)
             for s, h in enumerate(stages)]
    # the validation stream: its own seed (the pipeline's embedded splits come from SeedSequence children)
    val = generate_split(args.n_val, args.classes, 2 + 10 * args.seed, mix, hops=args.hops)
    index = {w: i for i, w in enumerate(SPECIALS + vocabulary(args.classes))}
    x, mask = encode([t for split in train for t in split["text"]], index)
    y = torch.tensor(np.concatenate([split["label"].to_numpy() for split in train]))
    xv, mask_v = encode(list(val["text"]), index)
    yv, level = val["label"].to_numpy(), val["difficulty"].to_numpy()
    model = build(args, layers, len(index), args.classes, max(x.shape[1], xv.shape[1]))
    params = list(model.parameters())
    per_epoch = sum(len(split) // args.batch_size for split in train)
    if per_epoch == 0:
        raise SystemExit(f"--n-train {args.n_train} is smaller than one batch (--batch-size {args.batch_size})")
    total = per_epoch * args.epochs
    opt, schedule = optimiser(params, args, total)
    order = torch.Generator().manual_seed(args.seed)

    def evaluate(done: int, started: float) -> dict:
        model.eval()
        with torch.no_grad():
            pred = model(input_ids=xv, attention_mask=mask_v).logits.argmax(-1).numpy()
        model.train()
        right = pred == yv
        row = {"task": "classify", "layers": layers, "step": done, "accuracy": round(float(right.mean()), 4),
               "seconds": round(time.time() - started, 1)}
        row |= {name: round(float(right[level == d].mean()), 4)
                for d, name in enumerate(DIFFICULTY_NAMES) if (level == d).any()}
        emit(row)
        return row

    started, done = time.time(), 0
    model.train()
    for epoch in range(args.epochs):
        for b, rows in enumerate(stage_batches([len(split) for split in train], args.batch_size, order)):
            width = int(mask[rows].sum(1).max())  # trim padding: it costs without changing anything
            loss = model(input_ids=x[rows, :width], attention_mask=mask[rows, :width], labels=y[rows]).loss
            step(loss, params, opt, schedule, f"epoch {epoch}, batch {b}")
            done += 1
            if args.eval_every and done % args.eval_every == 0 and done < total:
                evaluate(done, started)
        if not args.eval_every and epoch + 1 < args.epochs:
            evaluate(done, started)
    return evaluate(done, started)


def run_recall(args: argparse.Namespace, layers: int, emit) -> dict:
    torch.manual_seed(args.seed)
    keywords = [w for kws in class_vocabulary(4).values() for w in kws]
    index = {w: i for i, w in enumerate(SPECIALS + vocabulary(4))}
    rng = np.random.default_rng(args.seed)
    held_out = [recall_batch(np.random.default_rng(10_000 + i), args, index, keywords) for i in range(8)]
    model = build(args, layers, len(index), 2, held_out[0][0].shape[1])
    head = torch.nn.Linear(args.hidden, len(index))
    params = list(model.parameters()) + list(head.parameters())
    opt, schedule = optimiser(params, args, args.steps)

    def evaluate(done: int, started: float) -> dict:
        model.eval()
        with torch.no_grad():
            hits = [(head(token_states(model, ids)).argmax(-1) == lab)[lab >= 0].float().mean().item()
                    for ids, lab in held_out]
        model.train()
        row = {"task": "recall", "layers": layers, "step": done, "accuracy": round(float(np.mean(hits)), 4),
               "chance_among_defined": round(1 / args.ndef, 4), "seconds": round(time.time() - started, 1)}
        emit(row)
        return row

    started = time.time()
    model.train()
    for done in range(1, args.steps + 1):
        ids, lab = recall_batch(rng, args, index, keywords)
        loss = F.cross_entropy(head(token_states(model, ids)).flatten(0, 1), lab.flatten())
        step(loss, params, opt, schedule, f"step {done}")
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            evaluate(done, started)
    return evaluate(args.steps, started)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one core per probe: run two probes side by side on a 2-core machine

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    run = run_classify if args.task == "classify" else run_recall
    results = [run(args, layers, emit) for layers in args.layers]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()}, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
