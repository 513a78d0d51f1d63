# Studies (workflow/studies.yaml, dht.studies; docs/pipeline.md, "Studies"): named overlays of the profile, each
# run the train stage's own script on the validation split, summarised by dht.study_report. Not part of `all`:
#
#   snakemake --cores 1 reports/studies/selection/summary.md reports/studies/selection/selection.md

import json

from dht.studies import STUDIES_FILE, Run, load_studies, resolve_study, study_settings
from dht.study_report import LADDER, LADDER_TRAIN, TABLES, is_fixed, ladder_runs, readings_runs, tables_of

# The file is validated as params.yaml is, at every start: its structure and names; and every setting of the studies
# of this profile, resolved and checked (a typo in an overlay fails here, before any job).
try:
    STUDIES = load_studies(STUDIES_FILE)
    RESOLVED = {name: resolve_study(STUDIES, name, PARAMS_FILE, profile=CFG)
                for name, study in STUDIES.studies.items() if study.profile == PROFILE}
except ConfigError as err:
    raise WorkflowError(f"invalid studies file\n{err}") from None

STUDY_RUN = "studies/{study}/{setting}/{dataset}/{study_model}"


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)) or "(?!)"


# Only the names the file defines match (no other string reaches a path or a command).
wildcard_constraints:
    study=_alternatives(STUDIES.studies),
    setting=_alternatives(s for study in STUDIES.studies.values() for s in study_settings(study)),
    study_model=_alternatives(m for r in RESOLVED.values() for c in r.configs.values() for m in c.dht.modes),
    table="|".join(TABLES),


def resolved_study(wildcards):
    name = wildcards.study
    if name not in RESOLVED:
        raise WorkflowError(f"study {name!r} runs on profile {STUDIES.studies[name].profile!r}, not {PROFILE!r}: "
                            f"add --config profile={STUDIES.studies[name].profile}")
    return RESOLVED[name]


def study_run(wildcards):
    """The study and the run a job's wildcards name; an error when the study does not list that run."""
    study = resolved_study(wildcards)
    run = Run(wildcards.setting, wildcards.dataset, wildcards.study_model)
    if run not in study.runs():
        raise WorkflowError(f"{'/'.join(run)} is not a run of study {study.name!r} ({STUDIES_FILE} lists its "
                            "settings, models and datasets)")
    return study, run


def study_run_keys(wildcards):
    """The values the run reads, of its setting's configuration (dht.config.run_param_keys, as the train rule)."""
    study, run = study_run(wildcards)
    cfg = study.configs[run.setting]
    return tracked_params(cfg, run_param_keys(cfg, run.model))


def study_overlay(wildcards):
    """The setting's overlay as canonical JSON: a changed overlay reruns that setting's runs (and only those)."""
    study, run = study_run(wildcards)
    return json.dumps(study.overlays[run.setting], sort_keys=True, separators=(",", ":"))


def study_reference_input(wildcards):
    """A mode with init: reference (T30) starts from the study's `default` run of run.reference on its dataset."""
    study, run = study_run(wildcards)
    if not study.starts_from_reference(run):
        return {}
    ref = "/".join(study.reference_run(run.dataset))
    return {"reference": f"models/studies/{study.name}/{ref}", "reference_metrics":
            f"results/studies/{study.name}/{ref}/metrics.json"}


rule study_train:
    input:
        unpack(study_reference_input),  # positional, so first
        code=code("train.py"),
        train="data/processed/{dataset}/train.parquet",
        val="data/processed/{dataset}/val.parquet",  # what the run is scored on; the test split is not read
        meta="data/processed/{dataset}/meta.json",
        features="data/features/{dataset}/arm_features.safetensors",
        features_meta="data/features/{dataset}/meta.json",
        init_model="data/features/{dataset}/init_model",
    output:
        metrics=f"results/{STUDY_RUN}/metrics.json",
        selections=f"results/{STUDY_RUN}/selections.json",
        loss=f"results/{STUDY_RUN}/loss.csv",
        predictions=f"results/{STUDY_RUN}/predictions.csv",
        model=directory(f"models/{STUDY_RUN}"),
    params:
        tracked=study_run_keys,
        overlay=study_overlay,
        # `--reference-model=` (empty: the mode starts from the initial model); Snakemake quotes "" as nothing
        reference=lambda wildcards, input: input.get("reference", ""),
        reference_metrics=lambda wildcards, input: input.get("reference_metrics", ""),
        processed=folder("meta", of="input"),
        features=folder("features_meta", of="input"),
        results=folder("metrics"),
        checkpoints="checkpoints/studies/{study}/{setting}",
    log:
        f"logs/{STUDY_RUN}.log",
    threads: NPROC
    resources:
        gpu=GPU * NPROC,
    shell:
        TRAIN_LAUNCH + " workflow/scripts/train.py --profile {PROFILE:q} --overlay {params.overlay:q}"
        " --study {wildcards.study:q} --setting {wildcards.setting:q} --split val"
        " --dataset {wildcards.dataset:q} --model {wildcards.study_model:q} --processed {params.processed:q}"
        " --features {params.features:q} --results {params.results:q} --out-model {output.model:q}"
        " --checkpoints {params.checkpoints:q}"
        " --reference-model={params.reference:q} --reference-metrics={params.reference_metrics:q}"
        " --threads {threads:q} --log {log:q}"


def study_ladder_model(wildcards):
    study, run = study_run(wildcards)
    if is_fixed(study, run):
        raise WorkflowError(f"{'/'.join(run)} is a fixed model: one exit, no ladder")
    return f"models/studies/{study.name}/{'/'.join(run)}"


rule study_ladder:
    input:
        code=code("exit_ladder.py"),
        model=study_ladder_model,
        train="data/processed/{dataset}/train.parquet",
        val="data/processed/{dataset}/val.parquet",
        meta="data/processed/{dataset}/meta.json",
    output:
        val=f"results/{STUDY_RUN}/{LADDER}",
        train=f"results/{STUDY_RUN}/{LADDER_TRAIN}",
    params:
        processed=folder("meta", of="input"),
    log:
        f"logs/{STUDY_RUN}.ladder.log",
    resources:
        gpu=GPU,
    shell:
        "python workflow/scripts/exit_ladder.py --profile {PROFILE:q} --model-dir {input.model:q}"
        " --processed {params.processed:q} --out {output.val:q} --out-train {output.train:q}"
        " --threads {threads:q} --log {log:q}"


def study_table_input(wildcards):
    """What a table reads: every run's results (summary, selection), the DHT runs' exit ladders (ladder), the
    default's fixed predictions and one setting's ladders (readings)."""
    study = resolved_study(wildcards)
    if wildcards.table not in tables_of(study):
        raise WorkflowError(f"study {study.name!r} has no {wildcards.table} table (its tables: "
                            f"{', '.join(tables_of(study))}; {STUDIES_FILE} sets select, ladder and readings)")
    base = f"results/studies/{study.name}"
    path = lambda run, file: f"{base}/{'/'.join(run)}/{file}"  # noqa: E731
    if wildcards.table == "ladder":
        runs = ladder_runs(study)
        return [path(r, f) for r in runs for f in ("metrics.json", LADDER)]
    if wildcards.table == "readings":
        fixed, ladders = readings_runs(study)
        return ([path(r, f) for r in fixed for f in ("metrics.json", "predictions.csv")]
                + [path(r, f) for r in ladders for f in ("metrics.json", LADDER)])
    return [path(r, f) for r in study.runs() for f in ("metrics.json", "predictions.csv", "selections.json")]


def study_definition(wildcards):
    """The study as the file defines it (settings, models, rules): a changed definition rewrites its tables."""
    return json.dumps(resolved_study(wildcards).study.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


localrules: study_report


rule study_report:
    input:
        code=code("study_report.py"),
        runs=study_table_input,
    output:
        "reports/studies/{study}/{table}.md",
    params:
        study=study_definition,
        reference=lambda wildcards: f"{CFG.run.reference},{CFG.run.control},{CFG.dht.fixed_layers}",
        results="results/studies/{study}",
    log:
        "logs/studies/{study}/{table}.log",
    shell:
        "python workflow/scripts/study_report.py --profile {PROFILE:q} --study {wildcards.study:q}"
        " --table {wildcards.table:q} --results {params.results:q} --out {output:q} --log {log:q}"
