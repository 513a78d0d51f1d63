# Reports: generated, never edited by hand. Short jobs: they run on the submitting host under a cluster executor.

from dht.figures import FIGURES_DIR, figure_paths
from dht.report import depth_models, flexibert_search_figure, report_param_keys

REPORT_CODE = code("report.py", files=["dht/paper_values.yaml"])
FIGURES = figure_paths(CFG)
# Per-sample predictions of the DHT modes, the reference and the control: "Where the depth goes" (Table 1 and
# depth-<dataset>.png).
# (The first seed's: the analysis reads one run.)
DEPTH_PREDICTIONS = expand(f"results/{RUN}/predictions.csv", dataset=DATASETS, model=depth_models(CFG), seed=SEEDS[0])
# The evaluation stage's paired comparisons (workflow/rules/evaluation.smk): Table 2 and the index.
PAIRED = [paired_path(CFG, d) for d in DATASETS]

localrules: all, table1, table2, figures, index


rule table1:
    input:
        code=REPORT_CODE,
        metas=expand("data/processed/{dataset}/meta.json", dataset=DATASETS),
        # the baselines too: every model's training budget, total and own
        metrics=run_paths(f"results/{RUN}/metrics.json", dataset=DATASETS, model=MODELS + BASELINES),
        predictions=DEPTH_PREDICTIONS,
    output:
        "reports/table1.md",
    params:
        tracked=tracked_by(report_param_keys, "table1"),
    log:
        "logs/report/table1.log",
    shell:
        "python workflow/scripts/report.py --profile {PROFILE:q} --report table1 --out {output:q} --log {log:q}"


rule table2:
    input:
        code=REPORT_CODE,
        metrics=run_paths(f"results/{RUN}/metrics.json", dataset=DATASETS, model=MODELS + BASELINES),
        paired=PAIRED,
    output:
        "reports/table2.md",
    params:
        tracked=tracked_by(report_param_keys, "table2"),
    log:
        "logs/report/table2.log",
    shell:
        "python workflow/scripts/report.py --profile {PROFILE:q} --report table2 --out {output:q} --log {log:q}"


rule figures:
    input:
        code=code("figures.py"),
        metrics=run_paths(f"results/{RUN}/metrics.json", dataset=DATASETS, model=MODELS + BASELINES),
        selections=expand(f"results/{RUN}/selections.json", dataset=DATASETS, model=MODELS, seed=SEEDS[0]),
        loss=expand(f"results/{RUN}/loss.csv", dataset=DATASETS, model=MODELS, seed=SEEDS[0]),
        predictions=DEPTH_PREDICTIONS,
    output:
        FIGURES,
    params:
        tracked=tracked_by(report_param_keys, "figures"),
        out=FIGURES_DIR,
    log:
        "logs/report/figures.log",
    shell:
        "python workflow/scripts/figures.py --profile {PROFILE:q} --out-dir {params.out:q} --log {log:q}"


rule index:
    input:
        code=REPORT_CODE,
        tables=["reports/table1.md", "reports/table2.md"],
        figures=FIGURES,
        searches=[f for f in (flexibert_search_figure(CFG, d) for d in DATASETS) if f],
        paired=PAIRED,
    output:
        "reports/index.md",
    params:
        tracked=tracked_by(report_param_keys, "index"),
    log:
        "logs/report/index.log",
    shell:
        "python workflow/scripts/report.py --profile {PROFILE:q} --report index --out {output:q} --log {log:q}"
