# Baselines of Table 2: built from the trained reference (run.reference, 12-VaBERT in the paper) of the same
# dataset (distil, fastbert, nas-prune), or found by a FlexiBERT architecture search per dataset and retrained
# (flexibert).

from dht.baselines import FLEXIBERT_SEARCH_PARAMS, KINDS  # each kind's params.yaml keys and module
from dht.config import baseline_pattern, training_seed_keys  # the names of every kind of KINDS; the seed's keys

BASELINES = CFG.run.baselines
REFERENCE = CFG.run.reference
BASELINE_RUN = run_pattern(CFG, "baseline")


def baseline_code(wildcards):
    """baseline.py and its kind's module (dht.baselines.KINDS), which run_baseline imports inside the job
    by name: the other kinds' modules are not its code."""
    kind, _ = parse_baseline(wildcards.baseline)
    return code("baseline.py", KINDS[kind].module, top_level_only=True)


def baseline_keys(wildcards):
    kind, _ = parse_baseline(wildcards.baseline)
    return tracked_params(CFG, [*KINDS[kind].params, *training_seed_keys(CFG)])  # its training seed, with one


def search_input(wildcards):
    """A flexibert-<ratio> baseline reads its dataset's search; the others read nothing more."""
    if parse_baseline(wildcards.baseline)[0] == "flexibert":
        return {"search": f"results/{wildcards.dataset}/flexibert-search/trace.json"}
    return {}


def search_arg(wildcards, input):
    """--search <the folder of the search's trace> for a flexibert-<ratio> baseline: two arguments, which the
    command quotes one by one ({params.search:q}), or none."""
    return ["--search", os.path.dirname(input.search)] if "search" in input.keys() else []


rule flexibert_search:
    input:
        code=code("flexibert_search.py"),
        train="data/processed/{dataset}/train.parquet",
        val="data/processed/{dataset}/val.parquet",  # scores each query; never trained on
        meta="data/processed/{dataset}/meta.json",
        # The reference's architecture as built (the FLOP ratios' 1.00x), not the `model:` section, which need not
        # describe a checkpoint named by model.init.
        init_model="data/features/{dataset}/init_model",
    output:
        trace="results/{dataset}/flexibert-search/trace.json",
        figure="results/{dataset}/flexibert-search/search.png",
    params:
        tracked=tracked(*FLEXIBERT_SEARCH_PARAMS),
        processed=folder("meta", of="input"),
        out=folder("trace"),
    log:
        "logs/flexibert_search/{dataset}.log",
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/flexibert_search.py --profile {PROFILE:q} --dataset {wildcards.dataset:q}"
        " --processed {params.processed:q} --init-model {input.init_model:q} --out {params.out:q}"
        " --threads {threads:q} --log {log:q}"


rule baseline:
    input:
        unpack(search_input),  # positional, so first
        code=baseline_code,
        train="data/processed/{dataset}/train.parquet",
        val="data/processed/{dataset}/val.parquet",  # val_accuracy in metrics.json; never trained on
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        # the reference trained with the same seed, and its metrics (what training it cost: a baseline built
        # from it is charged that too)
        teacher=f"models/{RUN.replace('{model}', REFERENCE)}",
        teacher_metrics=f"results/{RUN.replace('{model}', REFERENCE)}/metrics.json",
    output:
        metrics=f"results/{BASELINE_RUN}/metrics.json",
        predictions=f"results/{BASELINE_RUN}/predictions.csv",
        model=directory(f"models/{BASELINE_RUN}"),
    wildcard_constraints:
        baseline=baseline_pattern(),
    params:
        tracked=baseline_keys,
        search=search_arg,
        training_seed=seed_of,
        processed=folder("meta", of="input"),
        results=folder("metrics"),
    log:
        "logs/baseline/" + BASELINE_RUN + ".log",
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/baseline.py --profile {PROFILE:q} --dataset {wildcards.dataset:q}"
        " --model {wildcards.baseline:q} --training-seed {params.training_seed:q} --processed {params.processed:q}"
        " --teacher {input.teacher:q} --teacher-metrics {input.teacher_metrics:q} --results {params.results:q}"
        " --out-model {output.model:q} --threads {threads:q} --log {log:q} {params.search:q}"
