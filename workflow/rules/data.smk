# Dataset download (or generation, or reading local CSV), with the validation split held out of the training split
# (data.val_fraction), and tokenization of the three splits.


def local_files(wildcards):
    """A `csv` dataset's files (the shipped data/external sets among them): editing one reruns its download."""
    spec = CFG.datasets[wildcards.dataset]
    if spec.source != "csv":
        return []
    folder = spec.folder(Path(PARAMS_FILE).parent)
    return [str(folder / name) for name in ("train.csv", "test.csv", "classes.txt") if (folder / name).is_file()]


rule download:
    input:
        code=code("download.py"),
        local=local_files,
    output:
        train="data/raw/{dataset}/train.parquet",
        val="data/raw/{dataset}/val.parquet",
        test="data/raw/{dataset}/test.parquet",
        meta="data/raw/{dataset}/meta.json",
    params:
        tracked=tracked("data_seed", "data", "datasets.{dataset}"),
        out=folder("meta"),
    log:
        "logs/download/{dataset}.log",
    shell:
        "python workflow/scripts/download.py --profile {PROFILE:q} --dataset {wildcards.dataset:q}"
        " --out {params.out:q} --log {log:q}"


rule tokenize:
    input:
        code=code("tokenize_data.py"),
        train="data/raw/{dataset}/train.parquet",
        val="data/raw/{dataset}/val.parquet",
        test="data/raw/{dataset}/test.parquet",
        meta="data/raw/{dataset}/meta.json",
    output:
        train="data/processed/{dataset}/train.parquet",
        val="data/processed/{dataset}/val.parquet",
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
        "python workflow/scripts/tokenize_data.py --profile {PROFILE:q} --dataset {wildcards.dataset:q}"
        " --raw {params.raw:q} --out {params.out:q} --log {log:q}"
