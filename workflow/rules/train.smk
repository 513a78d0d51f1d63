# DHT training per mode and dataset (Algorithms 2-3), evaluated with the inference policy. The fixed modes (the
# reference, the shallow control) are the same trainer with one arm.

MODELS = CFG.run.models


wildcard_constraints:
    model="|".join(re.escape(m) for m in CFG.dht.modes),


def mode_keys(wildcards):
    """params.yaml keys a mode's run reads: its own mode (and its warm-up mode) and the shared settings."""
    mode = CFG.dht.modes[wildcards.model]
    keys = ["seed", "device", "model", "train", "dht.fixed_layers", "dht.group_size", "dht.features",
            "dht.bandits", "dht.inference", "dht.count_s1_flops", "dht.p_dht_freeze", f"dht.modes.{wildcards.model}"]
    if mode.warmup_mode:
        keys.append(f"dht.modes.{mode.warmup_mode}")
    return tracked_params(CFG, keys)


rule train:
    input:
        code=code("train.py", "trainer.py", "model.py", "bandits.py", "features.py", "flops.py", "arm_features.py",
                  "evaluation.py", "tracking.py", "runtime.py", "guard.py", "integrity.py"),
        train="data/processed/{dataset}/train.parquet",
        test="data/processed/{dataset}/test.parquet",
        meta="data/processed/{dataset}/meta.json",
        features="data/features/{dataset}/arm_features.safetensors",
        features_meta="data/features/{dataset}/meta.json",
        init_model="data/features/{dataset}/init_model",
    output:
        metrics="results/{dataset}/{model}/metrics.json",
        selections="results/{dataset}/{model}/selections.json",
        loss="results/{dataset}/{model}/loss.csv",
        predictions="results/{dataset}/{model}/predictions.csv",
        model=directory("models/{dataset}/{model}"),
    params:
        tracked=mode_keys,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/train.py --profile {PROFILE} --dataset {wildcards.dataset} --model {wildcards.model}"
        " --processed data/processed/{wildcards.dataset} --features data/features/{wildcards.dataset}"
        " --results results/{wildcards.dataset}/{wildcards.model} --out-model models/{wildcards.dataset}/{wildcards.model}"
        " --threads {threads}"
