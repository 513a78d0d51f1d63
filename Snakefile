# DHT pipeline: a table of contents. Stages live in workflow/rules/*.smk, their scripts in workflow/scripts/,
# and every parameter in params.yaml (validated by dht.config_loading before any job runs).
#
#   snakemake --cores 4 reports/table1.md                    # default profile (pretrained MiniLM, real text, CPU)
#   snakemake --cores 4 reports/table1.md --config profile=tiny
#
# dvc.yaml is generated from this workflow's jobs (`dht dvc-yaml`); tests fail when the two drift apart.

# params.yaml is read by dht.config_loading (workflow/rules/common.smk), not by `configfile:`: Snakemake's own reader
# reports a malformed file without its line and column, and keeps the last of a key written twice.


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/arm_features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/studies.smk"  # not part of `all`: docs/pipeline.md, "Studies"


onstart:
    # A new sqlite MLflow store must be created once before parallel jobs write to it.
    init_tracking_store()


rule all:
    default_target: True
    input:
        "reports/table1.md",
        "reports/table2.md",
        "reports/index.md",
        run_paths(f"results/{RUN}/metrics.json", dataset=DATASETS, model=MODELS + BASELINES),
