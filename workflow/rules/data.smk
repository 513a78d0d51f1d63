# Dataset download (or generation, or reading local CSV) and tokenization.


rule download:
    input:
        code=code("download.py", "data.py", "embedded.py"),
    output:
        train="data/raw/{dataset}/train.parquet",
        test="data/raw/{dataset}/test.parquet",
        meta="data/raw/{dataset}/meta.json",
    params:
        tracked=tracked("seed", "datasets.{dataset}"),
    shell:
        "python workflow/scripts/download.py --profile {PROFILE} --dataset {wildcards.dataset}"
        " --out data/raw/{wildcards.dataset}"


rule tokenize:
    input:
        code=code("tokenize_data.py", "data.py", "tokenization.py", "tracking.py"),
        train="data/raw/{dataset}/train.parquet",
        test="data/raw/{dataset}/test.parquet",
        meta="data/raw/{dataset}/meta.json",
    output:
        train="data/processed/{dataset}/train.parquet",
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        tokenizer=directory("data/processed/{dataset}/tokenizer"),
    params:
        tracked=tracked("tokenizer", "datasets.{dataset}"),
    shell:
        "python workflow/scripts/tokenize_data.py --profile {PROFILE} --dataset {wildcards.dataset}"
        " --raw data/raw/{wildcards.dataset} --out data/processed/{wildcards.dataset}"
