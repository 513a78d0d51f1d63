# Reports: generated, never edited by hand.

REPORT_CODE = code("report.py", "report.py", "paper_values.yaml")


rule table1:
    input:
        code=REPORT_CODE,
        metas=expand("data/processed/{dataset}/meta.json", dataset=DATASETS),
        metrics=expand("results/{dataset}/{model}/metrics.json", dataset=DATASETS, model=MODELS),
    output:
        "reports/table1.md",
    params:
        tracked=tracked("run", "dht.count_s1_flops"),
    shell:
        "python workflow/scripts/report.py --profile {PROFILE} --table 1 --out {output}"


rule table2:
    input:
        code=REPORT_CODE,
        metrics=expand("results/{dataset}/{model}/metrics.json", dataset=DATASETS, model=MODELS + BASELINES),
    output:
        "reports/table2.md",
    params:
        tracked=tracked("run"),
    shell:
        "python workflow/scripts/report.py --profile {PROFILE} --table 2 --out {output}"
