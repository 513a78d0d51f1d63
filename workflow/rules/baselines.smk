# Baselines of Table 2, built from the trained 12-VaBERT of the same dataset.

BASELINES = CFG.run.baselines
BASELINE_CODE = {"distil": "distil.py", "fastbert": "fastbert.py", "nas-prune": "nas_prune.py"}


def baseline_code(wildcards):
    kind, _ = parse_baseline(wildcards.baseline)
    return code("baseline.py", "trainer.py", "model.py", "flops.py", "tracking.py", "runtime.py",
                f"baselines/{BASELINE_CODE[kind]}")


def baseline_keys(wildcards):
    kind, _ = parse_baseline(wildcards.baseline)
    section = {"distil": "distil", "fastbert": "fastbert", "nas-prune": "nas_prune"}[kind]
    return tracked_params(CFG, ["seed", "device", "train", f"baselines.{section}"])


rule baseline:
    input:
        code=baseline_code,
        train="data/processed/{dataset}/train.parquet",
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        teacher="models/{dataset}/vanilla-12",
    output:
        metrics="results/{dataset}/{baseline}/metrics.json",
        model=directory("models/{dataset}/{baseline}"),
    wildcard_constraints:
        baseline=r"distil-\d+|fastbert-[0-9.]+|nas-prune-[0-9.]+",
    params:
        tracked=baseline_keys,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/baseline.py --profile {PROFILE} --dataset {wildcards.dataset}"
        " --model {wildcards.baseline} --processed data/processed/{wildcards.dataset}"
        " --teacher models/{wildcards.dataset}/vanilla-12 --results results/{wildcards.dataset}/{wildcards.baseline}"
        " --out-model models/{wildcards.dataset}/{wildcards.baseline} --threads {threads}"
