# DHT training per mode and dataset (Algorithms 2-3), evaluated with the inference policy. The fixed modes (the
# reference, the shallow control) are the same trainer with one arm.

from dht.results import run_subdir

MODELS = CFG.run.models
# train.distributed.nproc_per_node > 1: one model trained by N processes under torchrun (DDP, docs/distributed.md),
# one GPU each on a CUDA profile; `--standalone` rendezvouses on a free local port, so jobs on one node do not clash.
# dht.launch is torchrun with a `--` before the script (else torchrun reads the script's `--log` as its own option)
# and a failed rank named in the job's log.
NPROC = CFG.train.distributed.nproc_per_node
TRAIN_LAUNCH = "python" if NPROC == 1 else f"python -m dht.launch --standalone --nproc-per-node {NPROC} --"


wildcard_constraints:
    model="|".join(re.escape(m) for m in CFG.dht.modes),


def mode_keys(wildcards):
    """params.yaml keys a mode's run reads (dht.config.run_param_keys: the same list MLflow and the checkpoint
    fingerprint use)."""
    return tracked_params(CFG, run_param_keys(CFG, wildcards.model))


def reference_input(wildcards):
    """A mode with init: reference (docs/training.md T30) starts from the trained reference of its dataset and seed
    (dht.trainer.initial_model reads both): Snakemake trains the reference first, and reruns the mode when it does.
    A mode with `prices` (T31's curve) reads the reference's validation accuracy, so its metrics.json at least."""
    mode = CFG.dht.modes[wildcards.model]
    if mode.init != "reference" and mode.prices is None:
        return {}
    run = run_subdir(CFG, wildcards.dataset, CFG.run.reference, seed_of(wildcards))
    metrics = {"reference_metrics": f"results/{run}/metrics.json"}
    return {"reference": f"models/{run}", **metrics} if mode.init == "reference" else metrics


rule train:
    input:
        unpack(reference_input),  # positional, so first
        code=code("train.py"),
        train="data/processed/{dataset}/train.parquet",
        val="data/processed/{dataset}/val.parquet",  # val_accuracy in metrics.json; never trained on
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        features="data/features/{dataset}/arm_features.safetensors",
        features_meta="data/features/{dataset}/meta.json",
        init_model="data/features/{dataset}/init_model",
    output:
        metrics=f"results/{RUN}/metrics.json",
        selections=f"results/{RUN}/selections.json",
        loss=f"results/{RUN}/loss.csv",
        predictions=f"results/{RUN}/predictions.csv",
        model=directory(f"models/{RUN}"),
    params:
        tracked=mode_keys,
        training_seed=seed_of,
        processed=folder("meta", of="input"),
        features=folder("features_meta", of="input"),
        results=folder("metrics"),
    log:
        "logs/train/" + RUN + ".log",
    threads: NPROC  # the ranks share them (one torch thread each unless a profile grants more)
    resources:
        gpu=GPU * NPROC,
    shell:
        TRAIN_LAUNCH + " workflow/scripts/train.py --profile {PROFILE:q} --dataset {wildcards.dataset:q}"
        " --model {wildcards.model:q} --training-seed {params.training_seed:q} --processed {params.processed:q}"
        " --features {params.features:q} --results {params.results:q} --out-model {output.model:q}"
        " --threads {threads:q} --log {log:q}"
