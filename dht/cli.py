"""The library's commands of `dht` (:data:`USAGE`): inspect the configuration, classify texts with a model.

The `dht` console script is these and the workflow's commands (``dvc-yaml``, ``sync-snakemake``, ``dvc-record``),
which dht_workflow.cli adds through :func:`build_parser` and :func:`main`: the library never imports the workflow's
tooling. ``python -m dht.cli`` runs the library's alone, as DVC's resolve_params stage does (``config show --out``).
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dht.config import ConfigError
from dht.config_loading import OVERLAYS_KEY, load_config, read_params

# The help's list of the library's commands (the workflow's CLI lists its own after it).
USAGE = """\
    dht config show [--profile tiny]     the resolved, validated configuration of a profile (YAML; --out FILE)
    dht config validate                  check every profile of params.yaml; exit 1 with the problems
    dht predict --model DIR [--input F]  classify texts (one a line; stdin without --input) with a trained model:
                                         label, probability, and the layers and heads chosen for each text; the
                                         bandits act as the model's dht.inference says (--inference overrides).
                                         A baseline's directory predicts too (it says which baseline it is).
                                         DIR is checked against its checksums.sha256 first; one without it is
                                         refused unless --allow-unverified
"""
DESCRIPTION = f"The `dht` command's library part: the configuration and trained models.\n\n{USAGE}"
# A function that adds subcommands to `dht`'s parser (given its subparsers), as the workflow's CLI does.
AddCommands = Callable[[Any], None]


def _config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.params, profile=args.profile)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if args.out:  # DVC's resolve_params stage: the file its other stages read their params from
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    raw = read_params(args.params)
    names = ["default", *[n for n in raw.get(OVERLAYS_KEY) or {} if n != "default"]]
    failed = 0
    for name in names:
        try:
            load_config(args.params, profile=name, raw=raw)
            print(f"profile {name}: ok")
        except ConfigError as err:
            failed += 1
            print(err, file=sys.stderr)
    return 1 if failed else 0


class _InputError(ValueError):
    pass


def _read_texts(source: str | None) -> tuple[list[str], list[int]]:
    """The texts to classify (one a non-blank line, UTF-8 with or without a byte-order mark) and their line
    numbers; :class:`_InputError` names the file and the line of bytes that are not UTF-8."""
    if source is None:
        name, data = "standard input", sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise _InputError(f"--input {source}: no such file (one text a line; leave --input out to read standard "
                              "input)")
        name, data = source, path.read_bytes()
    data = data.removeprefix(codecs.BOM_UTF8)
    texts, lines = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise _InputError(f"{name}, line {number}: bytes {raw[err.start : err.end]!r} are not UTF-8 ({err.reason}); "
                              "save the texts as UTF-8 (e.g. `iconv -f latin1 -t utf-8`, with their real encoding)"
                              ) from None
        if line.strip():
            texts.append(line)
            lines.append(number)
    return texts, lines


def _load_for_predict(model_dir: Path, device: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(the predict function ``(data, batch_size, max_length) -> Predictions``, the directory's description) of a
    trained DHT model or a baseline, checked against its checksums first; a baseline is said so on standard
    error."""
    from dht.baselines import BASELINE_FILE
    from dht.baselines.saved import load_baseline
    from dht.results import POLICY_FILE
    from dht.trainer import load_trained

    if (model_dir / POLICY_FILE).is_file():
        from dht.config import Config
        from dht.policy import predict

        model, policy, info = load_trained(model_dir, device, args.allow_unverified)  # checksums first
        # The bandits act at test time as the model was evaluated (its saved dht.inference), unless overridden.
        greedy = (args.inference or Config.model_validate(info["config"]).dht.inference) == "greedy"
        if args.price is not None:  # the sequential mode's dial (docs/training.md T31)
            if policy.search != "sequential" or policy.mode.continue_reward != "next":
                raise _InputError(f"--price: {model_dir} is a {policy.search} mode's model; a price per layer moves "
                                  "the stops of a search: sequential mode with continue_reward: next (leave --price out)")
            if args.price < 0:
                raise _InputError(f"--price {args.price}: a price per layer is >= 0")
            policy.stop_price = args.price

        def run(data: Any, batch_size: int, max_length: int) -> Any:
            return predict(model, policy, data, device, batch_size, max_length, greedy=greedy)

        return run, info
    if (model_dir / BASELINE_FILE).is_file():
        saved = load_baseline(model_dir, device, allow_unverified=args.allow_unverified)  # checksums first
        if args.inference:
            raise _InputError(f"--inference: {model_dir} is {saved.summary()}; it has no bandits to choose layers "
                              "and heads (leave --inference out)")
        if args.price is not None:
            raise _InputError(f"--price: {model_dir} is {saved.summary()}; a price per layer moves a sequential DHT "
                              "mode's stops (leave --price out)")
        print(f"note: {model_dir} is {saved.summary()}", file=sys.stderr)
        return saved.predict, saved.info
    raise FileNotFoundError(f"{model_dir}: not a model directory of the pipeline (no {POLICY_FILE} of a trained DHT "
                            f"model, no {BASELINE_FILE} of a baseline); train it first (snakemake --cores 4 "
                            "results/<dataset>/<model>/metrics.json)")


TSV_COLUMNS = ("label", "probability", "layers", "heads_per_layer", "text")


def tsv_line(fields: Sequence[object]) -> str:
    """One row of ``dht predict``'s TSV in the csv module's TSV dialect (``excel-tab``), without its line end: a
    field holding a tab, a double quote or a line break is quoted, its quotes doubled, so every row keeps its five
    columns (``csv.reader(f, dialect="excel-tab")`` and pandas' ``read_csv(sep="\\t")`` read the text back)."""
    buffer = io.StringIO()
    csv.writer(buffer, dialect="excel-tab").writerow(fields)  # ends in \r\n: a field with either is quoted
    return buffer.getvalue().removesuffix("\r\n")


def _predict(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from dht.evaluation import SplitData
    from dht.integrity import UnverifiedError, read_error, retrain_hint
    from dht.runtime import resolve_device

    def fail(message: object) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

    model_dir = Path(args.model)
    try:
        texts, lines = _read_texts(args.input)
    except _InputError as err:
        return fail(err)
    if not texts:
        return fail("no text to classify (one text a line)")
    try:
        device = resolve_device(args.device)
        run, info = _load_for_predict(model_dir, device, args)
    except UnverifiedError as err:
        return fail(f"{err}; or, if you trust where it came from, load it unchecked with --allow-unverified (its "
                    "weights are still read as tensors only)")
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # _InputError and IntegrityError are ValueErrors
        return fail(err)
    tokenizer_dir = model_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        return fail(f"{tokenizer_dir}: missing; {retrain_hint(info)}")
    try:  # local_files_only: a local model directory must never send transformers to the hub
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as err:  # transformers raises many types for a broken tokenizer directory
        return fail(read_error(tokenizer_dir, err, retrain_hint(info)))
    max_length = int(info.get("max_length", tokenizer.model_max_length))
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    cut = [line for line, n in zip(lines, lengths, strict=True) if n > max_length]
    if cut:
        shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(f"note: {len(cut)} text(s) longer than the model's {max_length} tokens were truncated to their first "
              f"{max_length} (line {shown})", file=sys.stderr)
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    data = SplitData(enc["input_ids"], enc["attention_mask"], torch.zeros(len(texts), dtype=torch.long))
    pred = run(data, args.batch_size, max_length)
    classes = info.get("classes") or [str(i) for i in range(pred.probs.shape[1])]
    rows = []
    for i, text in enumerate(texts):
        layers = int(pred.layers[i])
        heads = pred.heads[i, :layers].tolist()  # the layers the text ran (a pruned layer can keep no head)
        rows.append({"label": classes[int(pred.labels[i])], "probability": round(float(pred.probs[i].max()), 4),
                     "layers": layers, "heads": heads, "text": text})
    if args.format == "jsonl":
        for row in rows:
            print(json.dumps(row))
    else:
        print(tsv_line(TSV_COLUMNS))
        for row in rows:
            print(tsv_line([row["label"], f"{row['probability']:.4f}", row["layers"], ",".join(map(str, row["heads"])),
                            row["text"]]))
    return 0


def build_parser(*more: AddCommands, description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """`dht`'s argument parser: the library's commands, then those each of `more` adds (the workflow's:
    dht_workflow.cli), with `description` at the top of the help."""
    p = argparse.ArgumentParser(prog="dht", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show or validate the configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved configuration of a profile")
    show.add_argument("--profile", default=None)
    show.add_argument("--out", default=None, help="write it to this file instead (dvc.yaml's resolve_params stage)")
    show.set_defaults(func=_config_show)
    val = cfg_sub.add_parser("validate", help="validate every profile")
    val.set_defaults(func=_config_validate)
    for action in (show, val):
        action.add_argument("--params", default="params.yaml")

    pred = sub.add_parser("predict", help="classify texts with a trained model (models/<dataset>/<model>)")
    pred.add_argument("--model", required=True, help="a trained model directory, e.g. models/sst2/t-dht (a "
                                                     "DHT mode's or a baseline's)")
    pred.add_argument("--input", default=None, help="a text file, one text a line (default: standard input)")
    pred.add_argument("--format", choices=["tsv", "jsonl"], default="tsv")
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--device", default="auto")
    pred.add_argument("--inference", choices=["greedy", "sample"], default=None,
                      help="how the bandits choose layers and heads: greedy (no exploration) or sample "
                           "(default: the model's saved dht.inference, as its test metrics were computed)")
    pred.add_argument("--price", type=float, default=None,
                      help="a sequential mode's price per layer to stop at (docs/training.md T31; default: the one "
                           "chosen on the validation split, saved with the model): higher stops earlier")
    pred.add_argument("--allow-unverified", action="store_true",
                      help="load a model directory that has no checksums.sha256 (saved before checksums existed, or "
                           "not by this pipeline); its weights are still read as tensors only, never as code")
    pred.set_defaults(func=_predict)

    for add in more:
        add(sub)
    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run `dht` with `argv` (default: the command line), parsed by `parser` (default: the library's commands)."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
