# Evaluation (between the models and the reports): per dataset, every model against the reference and against
# the best baseline at no more inference FLOPs, paired on the same test samples (dht/comparison.py). Its own
# file, not the models' metrics.json: each of those is written by its model's job, before the others exist.

from dht.comparison import compared_models
from dht.results import paired_path

# The reference too when run.models leaves it out (the reports train it anyway).
COMPARED = compared_models(CFG)

localrules: compare  # reads CSV files: a short job on the submitting host under a cluster executor


def compared_runs(wildcards):
    """The metrics.json and predictions.csv of every compared model of the dataset, every seed's."""
    return {kind: run_paths(f"results/{RUN}/{kind}.{ext}", dataset=wildcards.dataset, model=COMPARED)
            for kind, ext in (("metrics", "json"), ("predictions", "csv"))}


rule compare:
    input:
        unpack(compared_runs),
        code=code("compare.py"),
    output:
        paired_path(CFG, "{dataset}"),
    params:
        tracked=tracked("run"),
    log:
        "logs/compare/{dataset}.log",
    shell:
        "python workflow/scripts/compare.py --profile {PROFILE:q} --dataset {wildcards.dataset:q} --out {output:q}"
        " --log {log:q}"
