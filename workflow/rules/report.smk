# Reports: generated, never edited by hand.


rule table1:
    input:
        code=code("report.py", "report.py"),
        metas=expand("data/processed/{dataset}/meta.json", dataset=DATASETS),
    output:
        "reports/table1.md",
    params:
        tracked=tracked("run"),
    shell:
        "python workflow/scripts/report.py --profile {PROFILE} --out {output}"
