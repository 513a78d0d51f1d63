# Arm features (Section 4.2): one pass without gradient through the initial model (or, with
# dht.features.warmup_steps, a copy of it after that many plain training steps), per dataset.


rule arm_features:
    input:
        code=code("arm_features.py"),
        train="data/processed/{dataset}/train.parquet",
        meta="data/processed/{dataset}/meta.json",
    output:
        features="data/features/{dataset}/arm_features.safetensors",
        meta="data/features/{dataset}/meta.json",
        model=directory("data/features/{dataset}/init_model"),
    params:
        # the warm-up (dht.features.warmup_steps) trains with the profile's optimiser settings
        tracked=tracked("seed", "device", "model", "dht", "run.models", "train.learning_rate", "train.weight_decay",
                        "train.warmup_ratio", "train.batch_size", "train.grad_clip"),
        processed=folder("meta", of="input"),
        out=folder("meta"),
    # One torch thread per job; parallelism comes from Snakemake running jobs side by side (two 2-thread
    # jobs on 2 cores made this stage 14x slower: OpenMP threads spin at barriers when oversubscribed).
    log:
        "logs/arm_features/{dataset}.log",
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/arm_features.py --profile {PROFILE:q} --dataset {wildcards.dataset:q}"
        " --processed {params.processed:q} --out {params.out:q} --threads {threads:q} --log {log:q}"
