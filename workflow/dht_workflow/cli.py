"""The `dht` command (the console script): the library's commands (:mod:`dht.cli`: config, predict) and the
workflow's, which keep dvc.yaml and the two runners' records in step with the Snakemake workflow (:data:`USAGE`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from dht import cli as library
from dht_workflow.dvc_params import expand_dvc_stages
from dht_workflow.dvc_sync import NotRecordable, RecordError, SyncError, record_dvc_run, sync_snakemake
from dht_workflow.dvc_yaml import render_dvc_yaml

# The help's list of the workflow's commands, after the library's.
USAGE = """\
    dht dvc-yaml [--check]               regenerate dvc.yaml from the Snakemake jobs (or check it is current)
    dht sync-snakemake [STAGE...]        after `dvc pull` / `dvc checkout`: record the restored outputs as current
                                         in Snakemake (refused unless `dvc status` says they are)
    dht dvc-record [STAGE...]            after a Snakemake run (make reproduce runs it): record its outputs in DVC
                                         (dvc.lock, DVC's cache) without rerunning anything, so that `dvc status` is
                                         clean and `dvc push` sends them (refused unless Snakemake has nothing to do)
"""
DESCRIPTION = ("The `dht` command: inspect the configuration, classify texts with a trained model, and keep dvc.yaml "
               f"in step with the Snakemake workflow.\n\n{library.USAGE}{USAGE}")


def _dvc_yaml(args: argparse.Namespace) -> int:
    text = render_dvc_yaml(".", args.profile)
    path = Path("dvc.yaml")
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print("dvc.yaml is out of date with the Snakemake workflow: run `dht dvc-yaml`", file=sys.stderr)
            return 1
        print("dvc.yaml matches the Snakemake workflow")
        return 0
    path.write_text(text)
    stages = yaml.safe_load(text)["stages"]
    print(f"wrote dvc.yaml ({len(stages)} stages, {len(expand_dvc_stages(stages))} once matrix and foreach stages "
          f"are expanded; profile {args.profile})")
    return 0


def _sync_snakemake(args: argparse.Namespace) -> int:
    try:
        outs = sync_snakemake(".", args.stages)
    except SyncError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Snakemake now takes {len(outs)} outputs restored by DVC as up to date")
    return 0


def _dvc_record(args: argparse.Namespace) -> int:
    try:
        recorded = record_dvc_run(".", args.stages, profile=args.profile)
    except NotRecordable as err:
        if args.optional:  # make reproduce: the run is done; DVC cannot version it as the project stands
            print(f"note: the run is not recorded in DVC: {err}")
            return 0
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"recorded {len(recorded)} DVC stages as this run made them (dvc.lock, outputs in DVC's cache): `dvc status` "
          "is clean. Keep it with `git add dvc.lock && git commit`; `dvc push` sends the outputs to a remote "
          "(`dvc remote add -d NAME URL`)")
    return 0


def add_commands(sub: Any) -> None:
    """The workflow's subcommands, added to `dht`'s parser (`sub`: its subparsers)."""
    dvc = sub.add_parser("dvc-yaml", help="generate dvc.yaml from the Snakemake workflow")
    dvc.add_argument("--profile", default="default", help="profile whose jobs become stages (default: default)")
    dvc.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is not current")
    dvc.set_defaults(func=_dvc_yaml)

    sync = sub.add_parser("sync-snakemake", help="after dvc pull/checkout: no Snakemake rerun of restored outputs")
    sync.add_argument("stages", nargs="*", help="DVC stages to sync, e.g. train@sst2-t-dht or all of train (default: every stage)")
    sync.set_defaults(func=_sync_snakemake)

    rec = sub.add_parser("dvc-record", help="after a Snakemake run: record its outputs in DVC without rerunning them")
    rec.add_argument("stages", nargs="*", help="DVC stages to record (default: every stage)")
    rec.add_argument("--profile", default=None,
                     help="the profile Snakemake ran (default: params.yaml's profile:, the one DVC runs; another is "
                          "refused)")
    rec.add_argument("--optional", action="store_true",
                     help="when DVC cannot version the run as the project stands (--profile is not params.yaml's "
                          "profile: or dvc.yaml's, no git repository), say why and exit 0 (make reproduce)")
    rec.set_defaults(func=_dvc_record)


def build_parser() -> argparse.ArgumentParser:
    return library.build_parser(add_commands, description=DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    return library.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
