# Baselines of Table 2: built from the trained reference (run.reference, 12-VaBERT in the paper) of the same
# dataset (distil, fastbert, nas-prune), or found by a FlexiBERT architecture search per dataset and retrained
# (flexibert).

BASELINES = CFG.run.baselines
REFERENCE = CFG.run.reference
BASELINE_CODE = {"distil": ["baselines/distil.py"], "fastbert": ["baselines/fastbert.py"],
                 "nas-prune": ["baselines/nas_prune.py"],
                 "flexibert": [f"flexibert/{m}.py" for m in ("__init__", "pipeline", "model", "flops", "space", "search",
                                                             "embedding", "surrogate")]}
BASELINE_SECTION = {"distil": "distil", "fastbert": "fastbert", "nas-prune": "nas_prune", "flexibert": "flexibert"}


def baseline_code(wildcards):
    kind, _ = parse_baseline(wildcards.baseline)
    return code("baseline.py", "trainer.py", "model.py", "flops.py", "evaluation.py", "tracking.py", "runtime.py",
                "guard.py", "integrity.py", *BASELINE_CODE[kind])


def baseline_keys(wildcards):
    kind, _ = parse_baseline(wildcards.baseline)
    keys = ["seed", "device", "train", f"baselines.{BASELINE_SECTION[kind]}"]
    return tracked_params(CFG, keys + (["model"] if kind == "flexibert" else []))


def search_input(wildcards):
    """A flexibert-<ratio> baseline reads its dataset's search; the others read nothing more."""
    if parse_baseline(wildcards.baseline)[0] == "flexibert":
        return {"search": f"results/{wildcards.dataset}/flexibert-search/trace.json"}
    return {}


def search_arg(wildcards):
    kind, _ = parse_baseline(wildcards.baseline)
    return f"--search results/{wildcards.dataset}/flexibert-search" if kind == "flexibert" else ""


rule flexibert_search:
    input:
        code=code("flexibert_search.py", *BASELINE_CODE["flexibert"], "trainer.py", "tracking.py", "runtime.py",
                  "guard.py"),
        train="data/processed/{dataset}/train.parquet",
        meta="data/processed/{dataset}/meta.json",
        # The reference's architecture as built (the FLOP ratios' 1.00x), not the `model:` section, which need not
        # describe a checkpoint named by model.init.
        init_model="data/features/{dataset}/init_model",
    output:
        trace="results/{dataset}/flexibert-search/trace.json",
        figure="results/{dataset}/flexibert-search/search.png",
    params:
        tracked=tracked("seed", "device", "model", "train", "baselines.flexibert", "run.baselines"),
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/flexibert_search.py --profile {PROFILE} --dataset {wildcards.dataset}"
        " --processed data/processed/{wildcards.dataset} --init-model {input.init_model}"
        " --out results/{wildcards.dataset}/flexibert-search"
        " --threads {threads}"


rule baseline:
    input:
        unpack(search_input),  # positional, so first
        code=baseline_code,
        train="data/processed/{dataset}/train.parquet",
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        teacher=f"models/{{dataset}}/{REFERENCE}",
    output:
        metrics="results/{dataset}/{baseline}/metrics.json",
        predictions="results/{dataset}/{baseline}/predictions.csv",
        model=directory("models/{dataset}/{baseline}"),
    wildcard_constraints:
        baseline=r"distil-\d+|fastbert-[0-9.]+|nas-prune-[0-9.]+|flexibert-[0-9.]+",
    params:
        tracked=baseline_keys,
        search=search_arg,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/baseline.py --profile {PROFILE} --dataset {wildcards.dataset}"
        " --model {wildcards.baseline} --processed data/processed/{wildcards.dataset}"
        " --teacher {input.teacher} --results results/{wildcards.dataset}/{wildcards.baseline}"
        " --out-model models/{wildcards.dataset}/{wildcards.baseline} --threads {threads} {params.search}"
