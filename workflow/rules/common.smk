# Shared by every rule file: the validated configuration and small lookups. No rules here.
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from dht.config import ConfigError, arm_feature_keys, parse_baseline, run_param_keys  # noqa: F401 (rule files use it)
from dht.config_loading import load_config
from dht.results import run_pattern, seeded
from dht.tracking import init_store
from dht_workflow.rule_params import check_cli_overrides, tracked_params  # noqa: F401 (rule files use it)
from dht_workflow.stage_code import stage_code

# Stage commands call `python`: make it this interpreter's, so `.venv/bin/snakemake` works unactivated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

PARAMS_FILE = "params.yaml"
try:
    check_cli_overrides(config, PARAMS_FILE)
    CFG = load_config(PARAMS_FILE, profile=config.get("profile"))
except ConfigError as err:
    raise WorkflowError(f"invalid configuration\n{err}") from None

PROFILE = CFG.profile
DATASETS = CFG.run.datasets
# Rules that run a model ask for one GPU when the profile runs on CUDA (the paper profile): the SLURM executor
# turns gpu=1 into a GPU request, and a local run caps its concurrent GPU jobs with --resources gpu=<GPUs>.
# `device: auto` asks for none: where the job lands decides (a login node rarely has a GPU to look at).
GPU = 1 if CFG.device.startswith("cuda") else 0

# Training seeds (run.training_seeds): with several, every trained model has a {seed} level in its paths,
# results/<dataset>/<model>/seed-<s>/ (dht/results.py); with one, the paths have none.
SEEDS = CFG.training_seeds
SEEDED = seeded(CFG)
RUN = run_pattern(CFG)  # "{dataset}/{model}" or "{dataset}/{model}/seed-{seed}"

wildcard_constraints:
    dataset="|".join(re.escape(d) for d in DATASETS),
    seed="|".join(str(s) for s in SEEDS),


def run_paths(pattern, **names):
    """Every seed's copy of a path pattern written with {RUN} (expand() over the other wildcards too)."""
    return expand(pattern, seed=SEEDS, **names) if SEEDED else expand(pattern, **names)


def seed_of(wildcards):
    """The training seed of a job: its {seed} wildcard, or the one seed."""
    return int(wildcards.seed) if SEEDED else SEEDS[0]


def tracked(*keys):
    """The resolved values of params.yaml keys a job reads ({wildcards} filled in): Snakemake reruns the job
    when they change, and `dht dvc-yaml` turns the keys into the DVC stage's `params:`."""
    return lambda wildcards: tracked_params(CFG, [k.format(**wildcards) for k in keys])


def tracked_by(keys_of, *args):
    """`tracked` for a stage whose keys the library lists, `keys_of(CFG, *args)` (one list per stage, which the
    stage's MLflow params use too)."""
    return lambda wildcards: tracked_params(CFG, keys_of(CFG, *args))


def code(script, *modules, files=(), top_level_only=False):
    """A stage's code as inputs, so editing it reruns the stage in Snakemake and DVC alike: the files the script
    really imports, transitively (dht_workflow.stage_code; `modules`: ones a job imports on top of the
    script's module-level imports, which `top_level_only` then limits it to), and data `files` the code reads."""
    return [*stage_code(script, *modules, top_level_only=top_level_only), *files]


def folder(name, of="output"):
    """A rule's params entry: the folder of one of its named outputs (or inputs, `of="input"`), so a command
    names a path the rule already wrote once instead of rebuilding it from the wildcards."""
    return lambda wildcards, input, output: os.path.dirname((output if of == "output" else input)[name])


def init_tracking_store():
    init_store(".")
