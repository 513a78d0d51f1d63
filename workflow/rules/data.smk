# Dataset download (or generation, or reading local CSV) and tokenization.


def local_files(wildcards):
    """A `csv` dataset's files (the shipped data/external sets among them): editing one reruns its download."""
    spec = CFG.datasets[wildcards.dataset]
    if spec.source != "csv":
        return []
    folder = Path(spec.path)
    return [str(folder / name) for name in ("train.csv", "test.csv", "classes.txt") if (folder / name).is_file()]


rule download:
    input:
        code=code("download.py"),
        local=local_files,
    output:
        train="data/raw/{dataset}/train.parquet",
        test="data/raw/{dataset}/test.parquet",
        meta="data/raw/{dataset}/meta.json",
    params:
        tracked=tracked("seed", "datasets.{dataset}"),
        out=folder("meta"),
    log:
        "logs/download/{dataset}.log",
    shell:
        "python workflow/scripts/download.py --profile {PROFILE} --dataset {wildcards.dataset} --out {params.out}"
        " --log {log}"


rule tokenize:
    input:
        code=code("tokenize_data.py"),
        train="data/raw/{dataset}/train.parquet",
        test="data/raw/{dataset}/test.parquet",
        meta="data/raw/{dataset}/meta.json",
    output:
        train="data/processed/{dataset}/train.parquet",
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        tokenizer=directory("data/processed/{dataset}/tokenizer"),
    params:
        # the dataset's other keys are the download's, an input
        tracked=tracked("tokenizer", "datasets.{dataset}.max_length"),
        raw=folder("meta", of="input"),
        out=folder("meta"),
    log:
        "logs/tokenize/{dataset}.log",
    shell:
        "python workflow/scripts/tokenize_data.py --profile {PROFILE} --dataset {wildcards.dataset}"
        " --raw {params.raw} --out {params.out} --log {log}"
