# Reports: generated, never edited by hand.


rule table1:
    input:
        code=code("report.py", "report.py"),
        metas=expand("data/processed/{dataset}/meta.json", dataset=DATASETS),
        metrics=expand("results/{dataset}/{model}/metrics.json", dataset=DATASETS, model=MODELS),
    output:
        "reports/table1.md",
    params:
        tracked=tracked("run", "dht.count_s1_flops"),
    shell:
        "python workflow/scripts/report.py --profile {PROFILE} --out {output}"
