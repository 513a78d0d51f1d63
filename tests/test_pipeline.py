"""The pipeline as a user runs it: Snakemake (dry and real, in a throw-away copy of the project), dvc.yaml
generated from it, DVC on the same stages, and MLflow receiving every run."""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, run_cli

from dht import curves
from dht_workflow.project import python_path


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count}."""
    lines = output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def set_params(project: Path, edit) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_dvc_yaml_is_generated_from_the_current_workflow(project):
    """Fails when dvc.yaml and the Snakefile disagree: regenerate with `dht dvc-yaml`."""
    proc = run_cli(["dht", "dvc-yaml", "--check"], cwd=project, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_csv_datasets_files_are_inputs_of_its_download(project):
    """Editing a shipped CSV (data/external) must rerun its download in both runners."""
    from dht_workflow.dvc_params import expand_dvc_stages

    stages = expand_dvc_stages(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    deps = next(s["deps"] for name, s in stages.items() if name.startswith("download") and "sst2" in name)
    assert {"data/external/sst2/train.csv", "data/external/sst2/test.csv", "data/external/sst2/classes.txt"} <= set(deps)
    dry = run_cli(["snakemake", "-n", "--cores", "1", "data/raw/sst2/meta.json"], cwd=project)
    assert "data/external/sst2/train.csv" in dry.stdout


def test_drift_between_snakefile_and_dvc_yaml_is_detected(project):
    rules = project / "workflow" / "rules" / "data.smk"
    text = rules.read_text()
    assert 'tracked("data_seed", "data", "datasets.{dataset}")' in text
    rules.write_text(text.replace('tracked("data_seed", "data", "datasets.{dataset}")',
                                  'tracked("data_seed", "tokenizer", "data", "datasets.{dataset}")'))
    proc = run_cli(["dht", "dvc-yaml", "--check"], cwd=project, check=False)
    assert proc.returncode == 1 and "out of date" in proc.stderr
    run_cli(["dht", "dvc-yaml"], cwd=project)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert stages["download-sst2"]["params"] == [{"params.resolved.yaml": ["data_seed", "tokenizer", "data", "datasets.sst2"]}]


def test_dvc_stages_mirror_snakemake_jobs(project):
    """dvc.yaml is generated for the default profile: sst2 and dbpedia-subset, six models, five baselines; a
    rule's jobs that differ only in their wildcards are one `matrix:` stage, as DVC's examples write them. The
    params come from the resolved profile, which DVC's own first stage writes."""
    from dht_workflow.dvc_params import expand_dvc_stages

    written = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    datasets = ["dbpedia-subset", "sst2"]
    # the two downloads read differently named folders of data/external: two stages
    # the fixed modes read no bandit key, P-DHT its warm-up mode: three train stages
    assert list(written) == ["resolve_params", "download-dbpedia-subset", "download-sst2", "tokenize",
                             "arm_features", "flexibert_search", "train", "train-p-dht", "train-vanilla",
                             "baseline-distil-2", "baseline-fastbert", "baseline-flexibert-0.5",
                             "baseline-nas-prune-0.5", "compare", "figures", "table1", "table2",
                             "index"]
    assert written["resolve_params"] == {
        "cmd": "python -m dht.cli config show --out params.resolved.yaml",
        "deps": ["dht/cli.py", "dht/__init__.py", "dht/arms.py", "dht/config.py", "dht/config_checks.py",
                 "dht/config_loading.py", "dht/pretrained.py"],
        "params": [{"params.yaml": None}], "outs": ["params.resolved.yaml"]}
    for name in ("tokenize", "arm_features", "flexibert_search"):
        assert written[name]["matrix"] == {"dataset": datasets}
    assert written["train"]["matrix"] == {"dataset": datasets, "model": ["f-dht", "s-dht", "t-dht"]}
    assert written["train-vanilla"]["matrix"] == {"dataset": datasets, "model": ["vanilla-2", "vanilla-6"]}
    # no --profile: DVC would paste `${profile}` into the command unquoted; the stages read params.yaml's profile:
    assert written["train"]["cmd"].startswith("python workflow/scripts/train.py --dataset ${item.dataset} "
                                              "--model ${item.model} ")
    assert written["train-p-dht"]["matrix"] == {"dataset": datasets}  # p-dht's warm-up mode is one more param
    assert written["baseline-fastbert"]["matrix"] == {"dataset": datasets, "baseline": ["fastbert-0.5", "fastbert-0.8"]}

    stages = expand_dvc_stages(written)  # as DVC runs them (checked against DVC below)
    names = list(stages)
    assert names[:9] == ["resolve_params", "download-dbpedia-subset", "download-sst2", "tokenize@dbpedia-subset",
                         "tokenize@sst2", "arm_features@dbpedia-subset", "arm_features@sst2",
                         "flexibert_search@dbpedia-subset", "flexibert_search@sst2"]
    assert set(names[-4:]) == {"table1", "table2", "figures", "index"} and names[-1] == "index"
    assert len(names) == 1 + 6 + 2 + 12 + 10 + 2 + 4
    assert {"compare@dbpedia-subset", "compare@sst2"} == set(names[31:33])  # the evaluation stage, per dataset
    assert stages["compare@sst2"]["metrics"] == ["results/sst2/paired.json"]  # `dvc metrics show` lists it
    # reports, metrics and plots are git-ignored outputs: cached, so that `dvc pull` restores them
    assert "reports/figures/pareto-sst2.png" in stages["figures"]["plots"] and "reports/table1.md" in stages["table1"]["outs"]
    assert {f"train@{d}-{m}" for d in datasets for m in ("t-dht", "s-dht", "f-dht")} | {
        f"train-vanilla@{d}-{m}" for d in datasets for m in ("vanilla-6", "vanilla-2")} | {
        f"train-p-dht@{d}" for d in datasets} == set(names[9:21])
    assert {f"baseline-fastbert@{d}-{b}" for d in datasets for b in ("fastbert-0.5", "fastbert-0.8")} | {
        f"baseline-{b}@{d}" for d in datasets for b in ("distil-2", "nas-prune-0.5", "flexibert-0.5")} == set(names[21:31])
    flexi = stages["baseline-flexibert-0.5@sst2"]
    assert "results/sst2/flexibert-search/trace.json" in flexi["deps"]
    assert flexi["cmd"].endswith("--search results/sst2/flexibert-search")
    base = stages["baseline-fastbert@sst2-fastbert-0.8"]
    assert "models/sst2/vanilla-6" in base["deps"] and "dht/baselines/fastbert.py" in base["deps"]
    assert "--model fastbert-0.8 " in base["cmd"] and "models/sst2/fastbert-0.8" in base["outs"]
    def params(stage):
        (entry,) = stage["params"]
        return entry["params.resolved.yaml"]

    train = stages["train-p-dht@sst2"]
    assert params(train)[-2:] == ["dht.modes.p-dht", "dht.modes.f-dht"]  # its warm-up mode
    assert "models/sst2/p-dht" in train["outs"]
    assert train["metrics"] == ["results/sst2/p-dht/metrics.json"]
    assert "results/sst2/p-dht/loss.csv" in train["outs"] and "plots" not in train  # the figures are the plots
    assert params(stages["train@sst2-t-dht"])[-1] == "dht.modes.t-dht" and "dht.bandits" in params(stages["train@sst2-t-dht"])
    assert "dht.bandits" not in params(stages["train-vanilla@sst2-vanilla-6"])  # one fixed arm, no bandit
    assert "--threads 1 " in stages["arm_features@sst2"]["cmd"]  # the rule's threads
    assert stages["arm_features@sst2"]["cmd"].endswith(" --log logs/arm_features/sst2.log")  # the rule's log:
    tok = stages["tokenize@sst2"]
    assert tok["cmd"].startswith("python workflow/scripts/tokenize_data.py --dataset sst2 ")
    assert not any("profile" in stage["cmd"] for stage in stages.values())
    assert "data/raw/sst2/train.parquet" in tok["deps"] and "dht/tokenization.py" in tok["deps"]
    assert params(tok) == ["tokenizer", "datasets.sst2.max_length"]
    assert "data/processed/sst2/tokenizer" in tok["outs"]


def dvc_reads(project: Path) -> dict:
    """dvc.yaml's stages as DVC itself expands and interpolates them (${profile} from params.yaml)."""
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    if not (project / ".git").is_dir():
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)  # DVC wants a git repository
    if not (project / ".dvc").is_dir():
        run_cli(["dvc", "init", "-q"], cwd=project)
    with Repo(str(project)) as repo:
        return DataResolver(repo, repo.root_dir, yaml.safe_load((project / "dvc.yaml").read_text())).resolve()["stages"]


def test_dvc_runs_exactly_one_stage_per_snakemake_job(project):
    """The matrix stages are a way of writing, nothing more: DVC's own expansion of dvc.yaml is, stage for stage,
    the plain stage of each Snakemake job (command less --profile, deps, params, outs, metrics, plots), and DVC's own
    stage that resolves the profile."""
    from dht_workflow.dvc_params import expand_dvc_stages
    from dht_workflow.dvc_yaml import PARAMS_STAGE, _stage_body, params_stage
    from dht_workflow.snakemake_dag import snakemake_jobs

    written = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    read = dvc_reads(project)
    assert len(written) < len(read)  # grouped

    def interpolated(body):
        return json.loads(json.dumps(body).replace("${profile}", "default"))
    assert {name: interpolated(body) for name, body in expand_dvc_stages(written).items()} == read
    assert read.pop(PARAMS_STAGE) == interpolated(params_stage(project))
    by_cmd = {body["cmd"]: body for body in read.values()}
    jobs = snakemake_jobs(project, "default")
    assert len(jobs) == len(by_cmd) == len(read)
    for job in jobs:
        assert job.cmd.replace(" --profile default ", " ") == _stage_body(job, "default")["cmd"]
        assert by_cmd[_stage_body(job, "default")["cmd"]] == interpolated(_stage_body(job, "default")), job.stage_name


def test_a_stage_run_by_dvc_stops_when_dvc_yaml_tracks_other_keys_than_it_reads(project, monkeypatch):
    """Which keys a stage reads can depend on values (arm_features reads the warm-up's train keys only with
    dht.features.warmup_steps): DVC reruns the stage when such a value changes (it is tracked), and the stage then
    stops, naming the fix, instead of being recorded in dvc.lock under dvc.yaml's old list of keys."""
    import os

    from dht.config import arm_feature_keys
    from dht.config_loading import load_config
    from dht_workflow.dvc_params import check_dvc_keys, expand_dvc_stages

    stage = "arm_features@sst2"
    cmd = expand_dvc_stages(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])[stage]["cmd"]
    monkeypatch.setenv("DVC_STAGE", stage)
    assert check_dvc_keys(project, arm_feature_keys(load_config(project / "params.yaml")), "default") is None  # current
    assert load_config(project / "params.yaml").dht.features.warmup_steps == 0
    set_params(project, lambda r: r["dht"]["features"].__setitem__("warmup_steps", 10))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=python_path(project))
    proc = subprocess.run(cmd.replace("${profile}", "default"), shell=True, cwd=project, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (f"error: dvc.yaml is out of date for stage {stage}: params.yaml changed what it reads (it now reads "
            "train.batch_size, train.grad_clip, train.learning_rate, train.warmup_ratio, train.weight_decay, which dvc.yaml "
            "does not track). Regenerate dvc.yaml (dht dvc-yaml --profile default), then dvc repro") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "data/features/sst2").exists()  # stopped before any work


def fit_job(dataset: str, model: str, seed: str, extra: tuple[str, ...] = ()):
    from dht_workflow.snakemake_dag import Job

    run = f"{dataset}/{model}/seed-{seed}"
    return Job(rule="fit", wildcards=(("dataset", dataset), ("model", model), ("seed", seed)),
               cmd=f"python fit.py --profile p --dataset {dataset} --model {model} --seed {seed} --threads 2 "
                   f"--out out/{run}",
               inputs=(f"data/{dataset}/train.csv", "static/m-1x/vocab.txt", "static/a2/notes.txt"),
               outputs=(f"out/{run}/model", f"out/{run}/metrics.json", f"out/{run}/loss.csv"),
               tracked=("seed", f"datasets.{dataset}", f"modes.{model}", *extra))


def test_jobs_that_differ_only_in_wildcards_become_one_stage_that_dvc_expands_back(tmp_path):
    """A rule's jobs whose stages differ only in their wildcard values are one stage: `matrix:` over a full
    product, else `foreach:` over named items; a job whose stage differs otherwise is a stage of its own. Values
    are replaced only where they stand whole (`m-1` in `static/m-1x` and `a` in `static/a2` stay), a value met
    by accident (seed 2 in `--threads 2`) stays literal, and DVC expands the result back to every job's stage."""
    from dht_workflow.dvc_params import expand_dvc_stages
    from dht_workflow.dvc_yaml import _stage_body, _template, dvc_stages, dvc_yaml_text
    from dht_workflow.snakemake_dag import Job

    assert _template("out/a/m-1/seed-2 --threads 2 ${profile} a2 m-1x", {"dataset": "a", "model": "m-1", "seed": "2"}) \
        == "out/${item.dataset}/${item.model}/seed-${item.seed} --threads ${item.seed} ${profile} a2 m-1x"
    full = [fit_job(d, m, s) for d in ("a", "b") for m in ("m-1", "k-2") for s in ("1", "2")]
    partial = [j for j in full if (dict(j.wildcards)["dataset"], dict(j.wildcards)["model"]) != ("b", "k-2")]
    warm = [fit_job(d, "p-3", s, extra=("modes.m-1",)) for d in ("a", "b") for s in ("1", "2")]
    odd = Job(rule="fit", wildcards=(("dataset", "c"), ("model", "m-1"), ("seed", "1")), cmd="echo ${item.dataset} c",
              inputs=(), outputs=("out/c",), tracked=())
    solo = Job(rule="report", wildcards=(("dataset", "a"),), cmd="python report.py --profile p out/a", inputs=(),
               outputs=("reports/a.md",), tracked=())

    matrix = dvc_stages(full + [solo], "p")["stages"]
    assert list(matrix) == ["fit", "report-a"]  # one job: a plain stage, named as before
    assert matrix["fit"]["matrix"] == {"dataset": ["a", "b"], "model": ["m-1", "k-2"], "seed": ["1", "2"]}
    assert matrix["fit"]["cmd"] == ("python fit.py --dataset ${item.dataset} --model ${item.model}"
                                    " --seed ${item.seed} --threads 2 --out out/${item.dataset}/${item.model}/seed-${item.seed}")
    assert matrix["fit"]["deps"][1:] == ["static/m-1x/vocab.txt", "static/a2/notes.txt"]
    assert matrix["fit"]["params"] == [{"params.resolved.yaml": ["seed", "datasets.${item.dataset}", "modes.${item.model}"]}]

    stages = dvc_stages(partial + warm + [odd], "p")["stages"]
    assert list(stages) == ["fit", "fit-p-3", "fit-c-m-1-1"]  # fit-p-3: its extra param; fit-c-...: plain
    assert stages["fit-c-m-1-1"]["cmd"] == "echo ${item.dataset} c"  # not a template: left as it was
    del stages["fit-c-m-1-1"]  # (and no stage DVC could read)
    assert stages["fit"]["foreach"]["a-k-2-1"] == {"dataset": "a", "model": "k-2", "seed": "1"}
    assert len(stages["fit"]["foreach"]) == 6 and "b-k-2-1" not in stages["fit"]["foreach"]
    assert stages["fit-p-3"]["matrix"] == {"dataset": ["a", "b"], "seed": ["1", "2"]}  # p-3 is in its name
    assert "--model p-3 " in stages["fit-p-3"]["cmd"] and stages["fit"]["do"]["cmd"] == matrix["fit"]["cmd"]
    # `1` there is no seed, though the jobs of seed 1 say so
    assert stages["fit-p-3"]["params"][0]["params.resolved.yaml"][-1] == "modes.m-1"

    # DVC's own reading of what was written: every job's plain stage, under the names expand_dvc_stages gives
    (tmp_path / "params.yaml").write_text("profile: p\n")
    for written, jobs in ((matrix, [*full, solo]), (stages, [*partial, *warm])):
        (tmp_path / "dvc.yaml").write_text(dvc_yaml_text({"stages": written}, "p"))
        read = dvc_reads(tmp_path)
        assert read == json.loads(json.dumps(expand_dvc_stages(written)).replace("${profile}", "p"))
        assert sorted(map(json.dumps, read.values())) == sorted(
            json.dumps(_stage_body(j, "p")).replace("${profile}", "p") for j in jobs)
    assert set(read) >= {"fit@a-k-2-1", "fit-p-3@b-2", "fit@b-m-1-2"}


LOADED_FILES = r"""
import importlib, json, runpy, sys
sys.path.insert(0, "workflow/scripts")
loaded = {}
for job in json.loads(sys.argv[1]):
    script, extra = job[0], job[1:]
    # Forget the project's modules, so this job imports them afresh (third-party ones such as torch stay loaded,
    # which keeps one process for every stage cheap).
    for name in [n for n in sys.modules if n.partition(".")[0] in ("dht", "dht_workflow", "_stage")]:
        del sys.modules[name]
    sys.argv = [script, "--help"]  # every stage script stops at argument parsing, after its module-level imports
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    for module in extra:  # what a job imports on top (a baseline's kind)
        importlib.import_module(module)
    loaded[" ".join(job)] = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
print(json.dumps(loaded))
"""


def test_each_stage_declares_the_code_it_really_runs(project):
    """A stage's declared code inputs hold every project file its script loads (and, for a baseline job, its
    kind's module): a module added to a stage's imports reruns the stage, and dvc.yaml's deps say the same."""
    import os

    from dht.baselines import KINDS
    from dht_workflow.snakemake_dag import snakemake_jobs

    kinds = {kind: b.module for kind, b in KINDS.items()}
    declared: dict[str, set[str]] = {}
    for job in snakemake_jobs(project, "tiny"):
        script = next(c for c in job.cmd.split() if c.startswith("workflow/scripts/"))
        extra = [kinds[k] for k in kinds if job.rule == "baseline" and dict(job.wildcards)["baseline"].startswith(k)]
        key = " ".join([script, *extra])
        code = {f for f in job.inputs if f.endswith(".py")}
        assert declared.setdefault(key, code) == code, key  # every job of a script declares the same code
    assert len(declared) == 12  # 8 scripts (report.py serves three rules), baseline.py once per kind
    env = dict(os.environ, PYTHONPATH=python_path(project))  # the copy's code
    proc = subprocess.run([str(BIN / "python"), "-c", LOADED_FILES, json.dumps([k.split() for k in declared])],
                          cwd=project, env=env, capture_output=True, text=True, check=True)
    root = project.resolve()
    for key, files in json.loads(proc.stdout.splitlines()[-1]).items():
        paths = {Path(f).resolve() for f in files}
        mine = {f.relative_to(root).as_posix() for f in paths if f.is_relative_to(root)}
        assert {"workflow/scripts/_stage.py", "dht/config.py"} <= mine, (key, sorted(mine))
        if key == "workflow/scripts/train.py":  # the workflow's tooling is a stage's code too
            assert "workflow/dht_workflow/dvc_params.py" in mine, sorted(mine)
        missing = mine - declared[key]
        assert not missing, f"{key} loads code its stage does not declare: {sorted(missing)}"


def test_stage_code_follows_lazy_and_relative_imports(tmp_path):
    from dht_workflow.stage_code import stage_code

    (tmp_path / "workflow/scripts").mkdir(parents=True)
    (tmp_path / "workflow/dht_workflow").mkdir(parents=True)
    (tmp_path / "dht/sub").mkdir(parents=True)
    for f in ("dht/__init__.py", "dht/sub/__init__.py", "dht/unused.py", "workflow/dht_workflow/__init__.py"):
        (tmp_path / f).write_text("")
    (tmp_path / "dht/a.py").write_text("def f():\n    from dht.sub import b\n")  # lazy, from-import of a module
    (tmp_path / "dht/sub/b.py").write_text("from .c import x\n")  # relative
    (tmp_path / "dht/sub/c.py").write_text("import json\nx = 1\n")
    (tmp_path / "workflow/scripts/_helper.py").write_text("import dht.a\n")
    # the workflow's tooling, a package of its own folder: its files are the code of a script that imports them
    (tmp_path / "workflow/dht_workflow/checks.py").write_text("from dht.sub.c import x\n")
    (tmp_path / "workflow/scripts/s.py").write_text(
        "import _helper\nfrom dht_workflow.checks import x\ndef main():\n    import dht.unused\n")
    assert stage_code("s.py", root=tmp_path) == [
        "workflow/scripts/s.py", "dht/__init__.py", "dht/a.py", "dht/sub/__init__.py", "dht/sub/b.py",
        "dht/sub/c.py", "dht/unused.py", "workflow/dht_workflow/__init__.py", "workflow/dht_workflow/checks.py",
        "workflow/scripts/_helper.py"]
    shallow = stage_code("s.py", root=tmp_path, top_level_only=True)
    assert "dht/unused.py" not in shallow and "dht/sub/c.py" in shallow  # only the script's own lazy import
    with pytest.raises(ValueError, match=r"dht\.nothing: not a module of the project's packages \(dht, dht_workflow\)"):
        stage_code("s.py", "dht.nothing", root=tmp_path)


def test_dry_run_of_table1(project):
    proc = run_cli(["snakemake", "-n", "--cores", "1", "reports/table1.md"], cwd=project)
    # the baselines too: Table 1 charges every model its training budget
    assert job_counts(proc.stdout) == {"download": 2, "tokenize": 2, "arm_features": 2, "train": 12,
                                       "flexibert_search": 2, "baseline": 10, "table1": 1}
    one = run_cli(["snakemake", "-n", "--cores", "1", "results/sst2/t-dht/metrics.json"], cwd=project)
    assert job_counts(one.stdout) == {"download": 1, "tokenize": 1, "arm_features": 1, "train": 1}
    # a baseline trains its teacher, the reference vanilla-6, first
    base = run_cli(["snakemake", "-n", "--cores", "1", "results/dbpedia-subset/distil-2/metrics.json"], cwd=project)
    assert job_counts(base.stdout) == {"download": 1, "tokenize": 1, "arm_features": 1, "train": 1, "baseline": 1}
    assert "models/dbpedia-subset/vanilla-6" in base.stdout
    everything = run_cli(["snakemake", "-n", "--cores", "1"], cwd=project)
    counts = job_counts(everything.stdout)
    assert counts["baseline"] == 10 and counts["flexibert_search"] == 2 and counts["table2"] == 1
    assert counts["compare"] == 2  # the evaluation stage: one per dataset


def test_slurm_profile_submits_model_jobs_with_a_gpu_on_the_paper_profile(project):
    """A dry run through the SLURM executor's profile: the model stages ask for a GPU where the profile runs on
    CUDA (paper), and for none on the CPU default."""
    proc = run_cli(["snakemake", "-n", "--workflow-profile", "workflow/profiles/slurm", "--config", "profile=paper"],
                   cwd=project)
    gpu_jobs = {}
    rule = None
    for line in proc.stdout.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
        elif "resources:" in line and rule:
            gpu_jobs.setdefault(rule, set()).add("gpu=1" in line)
    assert gpu_jobs["train"] == {True} and gpu_jobs["baseline"] == {True} and gpu_jobs["arm_features"] == {True}
    assert gpu_jobs["flexibert_search"] == {True}
    assert gpu_jobs["tokenize"] == {False} and gpu_jobs["table1"] == {False}
    assert job_counts(proc.stdout)["train"] == 24  # 4 datasets x 6 models
    default = run_cli(["snakemake", "-n", "--cores", "1", "results/sst2/t-dht/metrics.json"], cwd=project)
    assert "gpu=0" in default.stdout and "gpu=1" not in default.stdout


def test_bad_params_fail_before_any_job(project):
    set_params(project, lambda r: r["dht"]["modes"]["t-dht"].__setitem__("layers", [2, 3]))  # b = c = 2
    proc = run_cli(["snakemake", "-n", "--cores", "1", "reports/table1.md"], cwd=project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dht.modes.t-dht.layers[1] = 3: (L - b) must be a multiple of c" in out
    assert [p.name for p in (project / "data").iterdir()] == ["external"]  # the shipped CSVs alone: no job ran


def test_only_profile_can_be_overridden_on_the_command_line(project):
    proc = run_cli(["snakemake", "-n", "--cores", "1", "--config", "seed=3"], cwd=project, check=False)
    assert proc.returncode != 0 and "--config seed: only `profile` can be set" in proc.stdout + proc.stderr
    bad = run_cli(["snakemake", "-n", "--cores", "1", "--config", "profile=huge"], cwd=project, check=False)
    assert bad.returncode != 0 and "profile = 'huge': unknown profile" in bad.stdout + bad.stderr


def test_a_bad_name_fails_the_dry_run_before_the_dag_is_built(project):
    """A '.' in a dataset's name passed validation and then stopped the DAG build with a KeyError (the rules track
    `datasets.<name>`); a profile name from the command line reaches every command as --profile. Both are
    refused by the name rule, with the key, before any job."""
    def add(raw):
        raw["datasets"]["my.data"] = {"source": "embedded"}
        raw["run"]["datasets"] = ["my.data"]
    params = project / "params.yaml"
    shipped = params.read_text()
    set_params(project, add)
    proc = run_cli(["snakemake", "-n", "--cores", "1"], cwd=project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'datasets: key "my.data": not a valid name' in out, out[-3000:]
    assert "KeyError" not in out and "Traceback" not in out
    params.write_text(shipped)
    proc = run_cli(["snakemake", "-n", "--cores", "1", "--config", "profile=tiny;touch PWNED"], cwd=project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'profile (the one asked for) = "tiny;touch PWNED": not a valid name' in out, out
    assert not (project / "PWNED").exists() and [p.name for p in (project / "data").iterdir()] == ["external"]


def shell_fields(project: Path) -> dict[str, list[tuple[str, str]]]:
    """Each rule's command template as Snakemake parsed it: {rule: [(field, format spec), ...]}."""
    import string

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, Quietness, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=project / "Snakefile",
                                workdir=project)._workflow
        return {rule.name: [(field, spec) for _, field, spec, _ in string.Formatter().parse(rule.shellcmd) if field]
                for rule in workflow.rules if rule.shellcmd}


def test_every_stage_command_quotes_every_value_it_interpolates(project):
    """Defence in depth behind the name rule: every {wildcards.x}, {params.x}, {input.x}, {output}, {log},
    {threads} and {PROFILE} of every rule's shell: is written {...:q} (shell-quoted by Snakemake, one word
    whatever the value). Then a dry run with a log path holding a space and shell characters prints it as one
    quoted word, runs nothing, and dvc.yaml's command for it keeps the quoting."""
    fields = shell_fields(project)
    assert {"download", "tokenize", "arm_features", "train", "baseline", "flexibert_search", "table1"} <= set(fields)
    unquoted = {rule: [f for f, spec in found if not spec.endswith("q")] for rule, found in fields.items()}
    assert not any(unquoted.values()), unquoted
    assert all({"PROFILE", "log"} <= {f for f, _ in found} for found in fields.values())

    rules = project / "workflow" / "rules" / "data.smk"
    text = rules.read_text()
    assert '"logs/download/{dataset}.log"' in text
    rules.write_text(text.replace('"logs/download/{dataset}.log"', '"logs/download/{dataset} ;touch PWNED;.log"'))
    proc = run_cli(["snakemake", "-n", "-p", "--cores", "1", "data/raw/sst2/meta.json"], cwd=project)
    cmd = next(line for line in proc.stdout.splitlines() if line.startswith("Shell command: "))
    assert cmd.endswith(" --log 'logs/download/sst2 ;touch PWNED;.log'"), cmd
    assert shlex.split(cmd.removeprefix("Shell command: "))[-2:] == ["--log", "logs/download/sst2 ;touch PWNED;.log"]
    assert not (project / "PWNED").exists() and [p.name for p in (project / "data").iterdir()] == ["external"]
    from dht_workflow.snakemake_dag import snakemake_jobs

    job = next(j for j in snakemake_jobs(project, targets=["data/raw/sst2/meta.json"]) if j.rule == "download")
    assert job.cmd.endswith(" --log 'logs/download/sst2 ;touch PWNED;.log'"), job.cmd


@pytest.mark.slow
def test_a_stage_runs_with_a_log_path_that_holds_shell_characters(project):
    """The quoting through a real job: the download stage's log path holding ` ;touch PWNED;` is one argument:
    the job writes that log, and no command `touch PWNED` runs."""
    rules = project / "workflow" / "rules" / "data.smk"
    rules.write_text(rules.read_text().replace('"logs/download/{dataset}.log"',
                                               '"logs/download/{dataset} ;touch PWNED;.log"'))
    run_cli(["snakemake", "--cores", "1", "data/raw/embedded-news/meta.json", "--config", "profile=tiny"], cwd=project)
    log = project / "logs" / "download" / "embedded-news ;touch PWNED;.log"
    assert "download embedded-news:" in log.read_text()
    assert not (project / "PWNED").exists() and not (project / "PWNED;.log").exists()


@pytest.mark.slow
def test_dvc_runs_no_profile_name_in_the_shell(project):
    """dvc.yaml's commands carry no `--profile ${profile}`: DVC pastes an interpolated value into the shell
    unquoted before any stage runs, so params.yaml's `profile: default;touch PWNED;` (with a profile of that name)
    ran `touch PWNED`. The stage reads `profile:` from params.yaml, and refuses it by the name rule."""
    def poison(raw):
        raw["profile"] = "default;touch PWNED;"
        raw["profiles"]["default;touch PWNED;"] = {}
    set_params(project, poison)
    dvc_reads(project)  # git and DVC initialised
    # with its upstream: resolve_params, which resolves params.yaml's profile: and refuses the name
    proc = run_cli(["dvc", "repro", "download-sst2"], cwd=project, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'profile = "default;touch PWNED;": not a valid name' in out, out[-3000:]
    assert not (project / "PWNED").exists() and not (project / "data" / "raw").exists()


def test_dvc_commands_keep_quoted_words_whole():
    """dvc.yaml's commands are the Snakemake jobs' on one line (less --profile): runs of spaces between words
    become one, but a quoted word is kept as Snakemake quoted it."""
    from dht_workflow.dvc_yaml import _stage_body
    from dht_workflow.snakemake_dag import Job, squeeze_spaces

    quoted = shlex.quote("logs/a  b;c's.log")
    assert squeeze_spaces(f"python  s.py --log {quoted}  --x \"y  z\" ") == f'python s.py --log {quoted} --x "y  z"'
    job = Job(rule="r", wildcards=(), cmd=squeeze_spaces(f"python s.py --profile tiny  --log {quoted} "), inputs=(),
              outputs=("o",), tracked=())
    cmd = _stage_body(job, "tiny")["cmd"]
    assert cmd == f"python s.py --log {quoted}"
    assert shlex.split(cmd)[-1] == "logs/a  b;c's.log"


def mlflow_runs(project: Path) -> list[tuple[str, str]]:
    """(experiment, run name) of every run in the project's MLflow store."""
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute(
            "SELECT e.name, r.name FROM runs r JOIN experiments e USING (experiment_id) ORDER BY e.name, r.name"
        ).fetchall()


@pytest.mark.slow
def test_tokenization_stage_runs_through_snakemake(project):
    run_cli(["snakemake", "--cores", "2", "data/processed/embedded-news/meta.json", "--config", "profile=tiny"],
            cwd=project)
    meta = json.loads((project / "data/processed/embedded-news/meta.json").read_text())
    # tiny's n_train 320, and a validation split of a tenth of that (data.val_fraction; a third generated stream)
    assert meta["splits"]["train"]["n"] == 320 and meta["splits"]["val"]["n"] == 32
    assert meta["max_length"] == 40 and meta["num_labels"] == 4
    assert (project / "data/processed/embedded-news/tokenizer/tokenizer.json").is_file()
    assert ("embedded-news.stages", "tokenize") in mlflow_runs(project)  # not among the models
    assert not (project / "data/processed/embedded-sentiment").exists()  # only what was asked for
    # every rule keeps a log of what its stage printed (log:, written by the stage itself, so DVC runs get it too)
    log = (project / "logs/tokenize/embedded-news.log").read_text().splitlines()
    assert log[0].startswith("=== ") and "workflow/scripts/tokenize_data.py --profile tiny" in log[0]
    assert any(line.startswith("tokenize embedded-news: vocab ") for line in log)
    failed = run_cli(["python", "workflow/scripts/download.py", "--profile", "tiny", "--dataset", "nope",
                      "--out", "x", "--log", "logs/x/nope.log"], cwd=project, check=False)
    assert failed.returncode != 0  # an error ends up in the log as well, in a folder the stage made
    assert "error: " in (project / "logs/x/nope.log").read_text()


def assert_mlflow_reads_first_what_matters(project: Path, dataset: str, models: tuple[str, ...]) -> None:
    """In the dataset's experiment, described: every model run's headline metrics sort first and were logged
    first (the runs table's and the run page's order), train_loss is per optimizer step, and its model is an
    MLflow model."""
    import mlflow

    from dht.tracking import NOTE_TAG, SUMMARY, tracking_uri

    client = mlflow.MlflowClient(tracking_uri(project))
    experiment = client.get_experiment_by_name(dataset)
    assert f"**{dataset}**" in experiment.tags[NOTE_TAG] and "`tiny`" in experiment.tags[NOTE_TAG]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(models)
    for run in runs:
        keys = list(run.data.metrics)
        assert keys[: len(SUMMARY)] == list(SUMMARY) == sorted(keys)[: len(SUMMARY)], (run.info.run_name, keys)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert len(steps) > 3 and steps == sorted(steps), run.info.run_name  # per step, not per epoch
    logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert {m.source_run_id for m in logged} == {r.info.run_id for r in runs}


@pytest.mark.slow
@pytest.mark.e2e
def test_end_to_end_tiny_then_noop(project, tmp_path):
    """The tiny profile's whole DAG through Snakemake; then the run recorded in DVC and its round trip through a
    remote (tests/test_dvc_record.py, on this run rather than a second one); then a changed parameter."""
    from dht.config_loading import load_config

    set_params(project, lambda r: r.__setitem__("profile", "tiny"))  # the profile DVC runs, to record the run
    # the whole DAG: ~10 minutes on 2 free cores, more on a loaded CI machine
    proc = run_cli(["snakemake", "--cores", "2", "--config", "profile=tiny"], cwd=project, timeout=1500)
    table = (project / "reports/table1.md").read_text()
    assert "Profile `tiny`" in table
    assert "| embedded-news | embedded | 4 | 320 | 32 | 96 | 40 |" in table  # train, val, test
    assert "| embedded-sentiment | embedded | 2 | 320 | 32 | 96 | 40 |" in table
    runs = set(mlflow_runs(project))
    models = ("vanilla-12", "vanilla-3", "t-dht", "s-dht", "f-dht", "p-dht", "distil-3", "fastbert-0.5",
              "nas-prune-0.5", "flexibert-0.5")
    for dataset in ("embedded-news", "embedded-sentiment"):
        # the dataset's experiment compares its models only; the stages that made their inputs have their own
        assert {name for experiment, name in runs if experiment == dataset} == set(models)
        for run in ("tokenize", "arm_features", "flexibert-search", "query-02"):
            assert (f"{dataset}.stages", run) in runs
    assert_mlflow_reads_first_what_matters(project, "embedded-news", models)
    for baseline in ("distil-3", "fastbert-0.5", "nas-prune-0.5", "flexibert-0.5"):  # the DHT runs' schema
        m = json.loads((project / f"results/embedded-news/{baseline}/metrics.json").read_text())
        assert {"accuracy", "macro_f1", "train_flop_ratio", "infer_flop_ratio", "infer_flop_ratio_linear",
                "mean_layers", "n_test", "accuracy_easy", "val_accuracy", "val_macro_f1", "n_val"} <= set(m)
    distil = json.loads((project / "results/embedded-news/distil-3/metrics.json").read_text())
    assert distil["mean_layers"] == 3 and 0.24 < distil["infer_flop_ratio"] < 0.27
    metrics = json.loads((project / "results/embedded-news/t-dht/metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "train_flop_ratio", "infer_flop_ratio", "infer_flop_ratio_linear",
                "mean_layers", "mean_heads", "train_seconds", "infer_seconds", "n_test", "accuracy_easy",
                "mean_layers_easy", "val_accuracy", "val_macro_f1", "val_infer_flop_ratio", "n_val"):
        assert key in metrics
    assert "accuracy_hard" not in metrics  # tiny has easy samples only: no level without samples
    assert metrics["n_test"] == 96 and 0 < metrics["infer_flop_ratio"] <= 1
    # Every model and baseline learns tiny's easy samples, well above chance (1/4 of 4 topics, 1/2 of 2
    # polarities): a model that does not learn fails here. Measured: 0.94-1.00 (the tiny profile's comment).
    cfg = load_config(project / "params.yaml", profile="tiny")
    floor = {"embedded-news": 0.6, "embedded-sentiment": 0.75}
    assert sorted(floor) == sorted(cfg.run.datasets)
    accuracy = {(ds, model): json.loads((project / f"results/{ds}/{model}/metrics.json").read_text())["accuracy"]
                for ds in cfg.run.datasets for model in [*cfg.run.models, *cfg.run.baselines]}
    assert len(accuracy) == 20
    low = {f"{ds}/{model}": acc for (ds, model), acc in accuracy.items() if acc < floor[ds]}
    assert not low, f"below {floor}: {low}"
    # what the compare stage paired, with the budgets (tests/test_statistics.py), and what read the validation split
    # (tests/test_validation.py), on this run rather than on runs of their own
    from test_statistics import assert_the_evaluation_stage_paired_the_trained_models
    from test_validation import (
        assert_every_model_reports_val_accuracy_and_the_search_and_the_probe_read_the_validation_split,
    )

    for ds in cfg.run.datasets:
        assert_the_evaluation_stage_paired_the_trained_models(project, ds, cfg.run.models, cfg.run.baselines,
                                                              cfg.train.epochs, distil=("distil-3", cfg.baselines.distil.epochs))
    assert_every_model_reports_val_accuracy_and_the_search_and_the_probe_read_the_validation_split(
        project, [*cfg.run.models, *cfg.run.baselines])
    assert "| t-dht |" in table and "| vanilla-12 | " in table and "## The paper's Table 1" in table
    index = (project / "reports/index.md").read_text()
    assert index.count("/#/experiments/") == 20  # 2 datasets x 10 models, each linked to its MLflow run
    assert "](../results/embedded-news/flexibert-search/search.png)" in index
    trace = json.loads((project / "results/embedded-news/flexibert-search/trace.json").read_text())
    assert len(trace["queries"]) == 3 and all(q["flop_ratio"] <= 0.5 for q in trace["queries"])
    # the search measures its budgets against the 12-VaBERT the baseline stage evaluates against
    from dht.baselines.flexibert.search_stage import choose

    chosen = next(q for q in trace["queries"] if q["arch_id"] == choose(trace["queries"], 0.5).id)
    flexi = json.loads((project / "results/embedded-news/flexibert-0.5/metrics.json").read_text())
    assert chosen["flop_ratio"] == pytest.approx(flexi["infer_flop_ratio"], rel=1e-3)
    assert ("embedded-news.stages", "query-02") in runs  # one nested MLflow run per query
    # every long job's log shows its progress as plain lines (the first, then one every 30 s, the last)
    for name in ("distil-3", "fastbert-0.5", "nas-prune-0.5", "flexibert-0.5"):
        log = (project / f"logs/baseline/embedded-news/{name}.log").read_text()
        assert "\r" not in log and "100%|" in log and "loss=" in log, log[-2000:]
    assert all("\r" not in f.read_text() for f in (project / "logs").rglob("*.log"))
    # and so does Snakemake's own output: a stage's bar is drawn live only on a terminal
    assert "\r" not in proc.stdout + proc.stderr and "loss=" in proc.stdout + proc.stderr
    assert (project / "reports/figures/selection-embedded-sentiment.png").is_file()
    table2 = (project / "reports/table2.md").read_text()
    for model in ("vanilla-12", "distil-3", "fastbert-0.5", "nas-prune-0.5", "flexibert-0.5", "t-dht", "p-dht"):
        assert f"| {model} |" in table2
    # FastBERT's curve over its speeds (dht.curves): every speed of the grid on both splits, the speed chosen on the
    # validation split by the rule, in Table 2
    fast = json.loads((project / "results/embedded-news/fastbert-0.5/metrics.json").read_text())
    reference = json.loads((project / "results/embedded-news/vanilla-12/metrics.json").read_text())
    assert [p["dial"] for p in fast["curve"]] == sorted(cfg.baselines.fastbert.speeds)
    assert fast["chosen"]["dial"] == curves.choose(fast["curve"], reference["val_accuracy"], 0.01)["dial"]
    assert "### Accuracy-FLOPs curves" in table2 and "**fastbert-0.5** (speed chosen on validation: " in table2
    predicted = run_cli(["dht", "predict", "--model", "models/embedded-news/t-dht", "--format", "jsonl",
                         "--input", "data/raw/embedded-news/meta.json"], cwd=project)
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert rows and all(r["label"] in ("world", "sports", "business", "scitech") and r["layers"] in (3, 6, 9, 12)
                        for r in rows)
    assert not (project / "checkpoints/embedded-news/t-dht/checkpoint.pt").exists()  # removed once done
    from dht.arm_features import load_arm_features

    feats = load_arm_features(project / "data/features/embedded-news")
    assert feats["ucb_l/3"].shape == (84,) and feats["ucb_h/8"].shape == (42,) and "ucb_cp/4L8H+2L12H" in feats
    assert (project / "data/features/embedded-news/init_model/config.json").is_file()
    again = run_cli(["snakemake", "-n", "--cores", "2", "--config", "profile=tiny"], cwd=project)
    assert "Nothing to be done" in again.stdout + again.stderr, proc.stdout[-2000:]
    from test_dvc_record import record_and_round_trip

    record_and_round_trip(project, tmp_path, sorted(cfg.run.datasets), ["t-dht", "s-dht", "f-dht", "p-dht"])
    # a changed parameter reruns exactly the jobs that read it
    set_params(project, lambda r: r["profiles"]["tiny"]["tokenizer"].__setitem__("vocab_size", 500))
    changed = run_cli(["snakemake", "-n", "--cores", "2", "--config", "profile=tiny"], cwd=project)
    assert job_counts(changed.stdout) == {"tokenize": 2, "arm_features": 2, "flexibert_search": 2, "train": 12,
                                          "baseline": 8, "compare": 2, "table1": 1, "table2": 1, "figures": 1,
                                          "index": 1, "all": 1}


@pytest.mark.slow
def test_a_user_adds_a_local_zhang_csv_dataset(project):
    from test_data import AG_TEST, AG_TRAIN, write

    write(project / "data/external/agcsv/train.csv", AG_TRAIN * 10)
    write(project / "data/external/agcsv/test.csv", AG_TEST * 5)
    write(project / "data/external/agcsv/classes.txt", "World\nSports\nBusiness\nSci/Tech\n")

    def add(raw):
        raw["datasets"]["agcsv"] = {"source": "csv", "path": "data/external/agcsv", "fields": ["title", "description"],
                                    "max_length": 32}
        raw["run"]["datasets"] = ["agcsv"]
    set_params(project, add)
    run_cli(["snakemake", "--cores", "2", "data/processed/agcsv/meta.json"], cwd=project)
    meta = json.loads((project / "data/processed/agcsv/meta.json").read_text())
    assert meta["classes"] == ["World", "Sports", "Business", "Sci/Tech"]
    # 40 rows, 10 a class: a tenth, one a class, held out as the validation split
    assert meta["splits"]["train"]["n"] == 36 and meta["splits"]["train"]["label_counts"] == [9, 9, 9, 9]
    assert meta["splits"]["val"]["label_counts"] == [1, 1, 1, 1]


def test_a_missing_csv_dataset_fails_validation_and_the_dry_run(project):
    def add(raw):
        raw["datasets"]["mine"] = {"source": "csv", "path": "data/external/mine", "fields": ["text"], "max_length": 32}
        raw["run"]["datasets"] = ["mine"]
    set_params(project, add)
    expected = "datasets.mine.path = 'data/external/mine': no such directory"
    validate = run_cli(["dht", "config", "validate"], cwd=project, check=False)
    assert validate.returncode == 1 and expected in validate.stderr
    proc = run_cli(["snakemake", "-n", "--cores", "1", "data/raw/mine/meta.json"], cwd=project, check=False)
    assert proc.returncode != 0 and expected in proc.stdout + proc.stderr


def test_a_malformed_or_ambiguous_params_file_fails_the_dry_run_with_its_line(project):
    """Snakemake's own reader said only "Config file is not valid JSON or YAML", and kept the last of a key
    written twice; params.yaml is read by dht.config_loading alone now."""
    import re

    path = project / "params.yaml"
    text = path.read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("  checkpoint_every:"))
    for broken, expected in [
        (text.replace("\n  epochs:", "\n   epochs:", 1), r'in "params.yaml", line \d+, column \d+'),
        (text.replace("  checkpoint_every:", "  checkpoint_every: 3\n  checkpoint_every:", 1),
         rf"params.yaml, line {line + 1}, column 3: key 'checkpoint_every' is written twice"),
    ]:
        path.write_text(broken)
        proc = run_cli(["snakemake", "-n", "--cores", "1"], cwd=project, check=False)
        assert proc.returncode != 0 and re.search(expected, proc.stdout + proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_dvc_repro_makes_the_reports_and_a_restored_checkout_does_not_retrain(project):
    """DVC runs the generated stages to the reports (one dataset, two models and one baseline, to keep CI
    short: the full DAG is the same commands, checked by test_dvc_stages_mirror_snakemake_jobs); then, as on a
    fresh clone after `dvc pull` / `dvc checkout`, Snakemake would rerun everything until `dht sync-snakemake`."""
    import os
    import time

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]

    def small(raw):
        raw["profile"] = "tiny"
        raw["profiles"]["tiny"]["run"] = {"datasets": ["embedded-news"], "models": ["vanilla-12", "t-dht"],
                                          "baselines": ["distil-1"]}
    set_params(project, small)
    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=project)  # the datasets changed: regenerate
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=project, check=True)
    run_cli(["dvc", "repro"], cwd=project, timeout=900)

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["resolve_params"]["params"]["params.yaml"]["profile"] == "tiny"
    tok = lock["stages"]["tokenize-embedded-news"]["params"]["params.resolved.yaml"]
    assert tok["datasets.embedded-news.max_length"] == 40 and tok["tokenizer"]["vocab_size"] == 600  # tiny's, resolved
    # one dataset: the fixed modes are one matrix stage, t-dht (the one bandit mode), the single baseline and
    # tokenize plain stages
    assert {"table1", "table2", "figures", "index", "train-embedded-news-t-dht", "baseline-embedded-news-distil-1",
            "train@embedded-news-vanilla-3"} <= set(lock["stages"])  # the shallow control: the depth analysis reads it
    index = (project / "reports/index.md").read_text()
    assert "Profile `tiny`" in index and "](table1.md)" in index and "figures/pareto-embedded-news.png" in index
    assert "| t-dht | " in index and "/#/experiments/" in index  # each cell links its MLflow run
    for name in ("selection", "loss", "pareto", "difficulty"):
        assert (project / f"reports/figures/{name}-embedded-news.png").stat().st_size > 10_000
    shown = run_cli(["dvc", "metrics", "show", "--json"], cwd=project).stdout
    assert '"results/embedded-news/t-dht/metrics.json"' in shown and '"mean_layers_easy"' in shown
    assert "up to date" in run_cli(["dvc", "status"], cwd=project).stdout

    def snakemake_todo() -> str:
        proc = run_cli(["snakemake", "-n", "--cores", "1"], cwd=project)
        return proc.stdout + proc.stderr

    assert "Nothing to be done" in snakemake_todo()  # Snakemake and DVC agree on what exists
    # A fresh clone: no Snakemake records, and files restored in DVC's order, not the DAG's.
    subprocess.run(["rm", "-rf", ".snakemake"], cwd=project, check=True)
    later = time.time() + 5
    for path in (project / "data/processed/embedded-news").iterdir():
        os.utime(path, (later, later))
    assert "Nothing to be done" not in snakemake_todo()  # without the fix: everything downstream reruns
    synced = run_cli(["dht", "sync-snakemake"], cwd=project)
    assert "outputs restored by DVC as up to date" in synced.stdout
    assert "Nothing to be done" in snakemake_todo()
    # dvc checkout restores deleted models, results and reports from the cache; nothing retrains
    subprocess.run(["rm", "-rf", "models/embedded-news/t-dht", "results", "reports", ".snakemake"], cwd=project,
                   check=True)
    run_cli(["dvc", "checkout"], cwd=project)
    run_cli(["dht", "sync-snakemake"], cwd=project)
    assert (project / "models/embedded-news/t-dht/config.json").is_file()
    assert (project / "reports/figures/loss-embedded-news.png").is_file()
    assert "mean_layers_easy" in (project / "results/embedded-news/t-dht/metrics.json").read_text()
    assert "Nothing to be done" in snakemake_todo()
    # a matrix stage is synced by its name (all its items: 2 fixed models x 5 outputs) or by one item's
    assert "takes 10 outputs" in run_cli(["dht", "sync-snakemake", "train"], cwd=project).stdout
    assert "takes 5 outputs" in run_cli(["dht", "sync-snakemake", "train@embedded-news-vanilla-3"], cwd=project).stdout
    # ... but a changed parameter still reruns what reads it, and the sync refuses to hide it
    set_params(project, lambda r: r["profiles"]["tiny"]["train"].__setitem__("epochs", 3))
    refused = run_cli(["dht", "sync-snakemake"], cwd=project, check=False)
    assert refused.returncode == 1 and "train-embedded-news-t-dht" in refused.stderr
    # naming only a downstream stage does not hide its stale upstream training either
    downstream = run_cli(["dht", "sync-snakemake", "figures"], cwd=project, check=False)
    assert downstream.returncode == 1 and "train-embedded-news-t-dht" in downstream.stderr
    nothing = run_cli(["dht", "sync-snakemake", "train@embedded-news-nothing"], cwd=project, check=False)
    assert nothing.returncode == 1 and "not stages of dvc.yaml: train@embedded-news-nothing" in nothing.stderr
    # the two models and the control vanilla-3 (tiny's run.control, kept by the run: overlay above)
    assert job_counts(run_cli(["snakemake", "-n", "--cores", "1"], cwd=project).stdout)["train"] == 3


@pytest.mark.slow
def test_a_killed_training_resumes_when_rerun_and_ends_with_the_same_metrics(tiny_project):
    """The data and arm features come built (conftest.tiny_project): only the training is killed and rerun."""
    import os
    import signal
    import time

    from conftest import BIN

    project = tiny_project

    def tiny(raw):
        raw["profiles"]["tiny"]["train"].update({"epochs": 3, "checkpoint_every": 2})
    set_params(project, tiny)
    target = "results/embedded-news/f-dht/metrics.json"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DHT_NO_PROGRESS="1")
    proc = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", target, "--config", "profile=tiny"], cwd=project,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = project / "checkpoints/embedded-news/f-dht/checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, "training ended before a checkpoint was seen"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no cleanup runs
    proc.wait()
    assert not (project / target).exists()

    # what a user does after a kill: release Snakemake's lock, rerun the incomplete job
    run_cli(["snakemake", "--unlock", target, "--config", "profile=tiny"], cwd=project)
    rerun = run_cli(["snakemake", "--cores", "1", "--rerun-incomplete", target, "--config", "profile=tiny"], cwd=project)
    assert "f-dht: resuming at epoch" in rerun.stdout + rerun.stderr
    assert not checkpoint.exists()

    def timeless(path):
        m = json.loads(path.read_text())
        return {k: v for k, v in m.items() if not k.endswith("_seconds")}

    resumed = timeless(project / target)
    # the target before --forcerun, whose nargs would swallow it (and rebuild the whole DAG for `all`)
    run_cli(["snakemake", "--cores", "1", target, "--forcerun", "train", "--config", "profile=tiny"], cwd=project)
    assert timeless(project / target) == resumed  # same seed, uninterrupted: identical metrics.json


def test_a_device_that_is_not_there_is_a_clear_error(project):
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error cannot happen here")
    set_params(project, lambda r: r.__setitem__("device", "cuda"))
    proc = subprocess.run([sys.executable, "workflow/scripts/arm_features.py", "--dataset", "sst2",
                           "--processed", "data/processed/sst2", "--out", "data/features/sst2"],
                          cwd=project, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error: device = 'cuda' but no CUDA device is available here; set `device: auto`" in proc.stderr
    assert "Traceback" not in proc.stderr


def summary(project: Path) -> dict[str, tuple[str, str]]:
    """`snakemake --summary`: each output's (status, plan); status `params changed` when the params its job
    tracks changed, plan `update pending` when the job would run."""
    out = run_cli(["snakemake", "--summary", "--cores", "1"], cwd=project).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0] == ["output_file", "date", "rule", "log-file(s)", "status", "plan"], out[-2000:]
    return {row[0]: (row[4], row[5]) for row in rows[1:] if len(row) == 6}


def downstream(jobs, names: set[str], label) -> set[str]:
    """`names` (job labels) and every job that reads what they write, transitively."""
    done = set(names)
    while True:
        outs = [o for j in jobs if label(j) in done for o in j.outputs]
        more = {label(j) for j in jobs if label(j) not in done
                and any(i == o or i.startswith(o.rstrip("/") + "/") for i in j.inputs for o in outs)}
        if not more:
            return done
        done |= more


@pytest.mark.slow
def test_a_changed_parameter_reruns_exactly_the_stages_that_read_it(tiny_project):
    """For one parameter of each section, Snakemake names exactly the jobs whose tracked params changed (and, as
    to rerun, those and everything that reads their outputs), and `dvc status` names the same stages once
    `resolve_params` has resolved the edit. The tiny profile on one dataset, with its upstream built
    (tiny_project) and the rest of its outputs stand-ins recorded as current (`snakemake --touch`, then
    dht_workflow.dvc_sync.record_dvc_run): dry runs, not trainings."""
    from dht_workflow.dvc_params import expand_dvc_stages
    from dht_workflow.dvc_sync import record_dvc_run
    from dht_workflow.dvc_yaml import PARAMS_STAGE
    from dht_workflow.snakemake_dag import snakemake_jobs

    project = tiny_project
    fixed, bandit = ["vanilla-12", "vanilla-3"], ["t-dht", "s-dht", "f-dht", "p-dht"]
    baselines = ["distil-3", "flexibert-0.5"]

    def small(raw):  # tiny's models (its arm features were built for them), two baselines, one dataset
        raw["profile"] = "tiny"
        raw["profiles"]["tiny"]["run"] = {"datasets": ["embedded-news"], "baselines": baselines}
    set_params(project, small)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)  # DVC wants a git repository
    run_cli(["dht", "dvc-yaml", "--profile", "tiny"], cwd=project)
    jobs = snakemake_jobs(project, "tiny")

    def label(job) -> str:
        w = dict(job.wildcards)
        return ":".join([job.rule, *([w[k] for k in ("model", "baseline") if k in w])])
    assert sorted(map(label, jobs)) == sorted(["download", "tokenize", "arm_features", "flexibert_search",
                                               *(f"train:{m}" for m in fixed + bandit),
                                               *(f"baseline:{b}" for b in baselines),
                                               "compare", "table1", "table2", "figures", "index"])
    files = {".json", ".csv", ".md", ".png"}  # the file outputs' suffixes; the others are directories (models/...)
    for job in jobs:  # stand-ins for what the upstream did not build
        for out in map(Path, job.outputs):
            if not (project / out).exists():
                if out.suffix in files:
                    (project / out).parent.mkdir(parents=True, exist_ok=True)
                    (project / out).write_text(f"{out}\n")
                else:
                    (project / out).mkdir(parents=True)
                    (project / out / "stand-in.txt").write_text(f"{out}\n")
    run_cli(["snakemake", "--cores", "1", "--touch", "--forceall"], cwd=project)  # records, as after a run
    assert {plan for _, plan in summary(project).values()} == {"no update"}
    recorded = record_dvc_run(project)
    assert recorded[0] == PARAMS_STAGE and len(recorded) > 1
    assert json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout) == {}

    stages = expand_dvc_stages(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    stage_of = {out: name for name, body in stages.items()
                for out in [*body.get("outs", []), *body.get("metrics", []), *body.get("plots", [])]}
    by_output = {out: label(job) for job in jobs for out in job.outputs}
    dvc_name = {label(job): stage_of[job.outputs[0]] for job in jobs}
    saved = {name: (project / name).read_bytes() for name in ("params.yaml", "params.resolved.yaml", "dvc.lock")}

    def top(key, value):  # a top-level key the tiny profile inherits
        def edit(raw):
            node = raw
            *path, last = key.split(".")
            for part in path:
                node = node[part]
            node[last] = value
        return edit

    def tiny(key, value):  # a key the tiny overlay sets
        return top(f"profiles.tiny.{key}", value)

    trains = {f"train:{m}" for m in fixed + bandit}
    bandit_trains = {f"train:{m}" for m in bandit}
    reports = {"table1", "table2", "figures", "index"}
    cases = [
        ("data_seed", top("data_seed", 1), {"download", "arm_features", "flexibert_search"}),
        # one seed, no seed level in the paths: the same jobs, each training now with seed 1
        ("run.training_seeds", top("run.training_seeds", [1]), {*trains, *(f"baseline:{b}" for b in baselines),
                                                                 "compare", *reports}),
        ("device", top("device", "cpu"), {"arm_features", "flexibert_search", *trains,
                                          *(f"baseline:{b}" for b in baselines)}),
        ("datasets.embedded-news.n_test", tiny("datasets.embedded-news.n_test", 80), {"download"}),
        ("tokenizer.min_frequency", top("tokenizer.min_frequency", 1), {"tokenize"}),
        ("model.hidden_dropout_prob", top("model.hidden_dropout_prob", 0.2),
         {"arm_features", "flexibert_search", "baseline:flexibert-0.5"}),
        ("dht.features.batch_size", top("dht.features.batch_size", 128), {"arm_features", *bandit_trains}),
        ("dht.bandits.ucb_alpha", top("dht.bandits.ucb_alpha", 2.0), bandit_trains),
        ("dht.inference", top("dht.inference", "sample"), bandit_trains),
        ("dht.modes.t-dht.exit_loss", top("dht.modes.t-dht.exit_loss", "path"), {"train:t-dht"}),
        # f-dht is also p-dht's warm-up mode
        ("dht.modes.f-dht.exit_loss", top("dht.modes.f-dht.exit_loss", "path"), {"train:f-dht", "train:p-dht"}),
        ("train.epochs", tiny("train.epochs", 3), {*trains, *(f"baseline:{b}" for b in baselines)}),
        # read under torchrun only (nproc_per_node > 1)
        ("train.distributed.backend", top("train.distributed.backend", "gloo"), set()),
        ("baselines.distil.epochs", tiny("baselines.distil.epochs", 2), {"baseline:distil-3"}),
        ("baselines.flexibert.evaluations", tiny("baselines.flexibert.evaluations", 4), {"flexibert_search"}),
        ("baselines.flexibert.epochs", tiny("baselines.flexibert.epochs", 9), {"baseline:flexibert-0.5"}),
        ("tracking.experiment_prefix", top("tracking.experiment_prefix", "x-"), {"index"}),
    ]
    for key, edit, expected in cases:
        set_params(project, edit)
        # --summary rather than a dry run's reasons, which name a params change only for a job with no upstream
        # job to wait for (and --list-params-changes, which in Snakemake 9.27 also lists the last output of every
        # job whose params did not change)
        status = summary(project)
        assert set(status) == set(by_output)
        assert {by_output[out] for out, (st, _) in status.items() if st == "params changed"} == expected, key
        rerun = {by_output[out] for out, (_, plan) in status.items() if plan == "update pending"}
        assert rerun == downstream(jobs, expected, label), key  # and what reads their outputs
        if key == "data_seed":  # DVC sees params.yaml change first; resolve_params turns it into the stages' keys
            assert set(json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout)) == {PARAMS_STAGE}
        run_cli(["dvc", "repro", "--single-item", PARAMS_STAGE], cwd=project)
        stale = json.loads(run_cli(["dvc", "status", "--json"], cwd=project).stdout)
        assert set(stale) == {dvc_name[j] for j in expected}, key
        assert all("params.resolved.yaml" in str(reasons) for reasons in stale.values()), key
        for name, data in saved.items():
            (project / name).write_bytes(data)


# Keys a stage reads without tracking them, and why that is right (test_every_stage_tracks_the_params_it_reads).
NOT_TRACKED = {
    "profile": "the MLflow run's profile tag (the reports, which print it, track it)",
    "tracking.experiment_prefix": "the MLflow experiment a stage logs to (the index, which reads the store by it, "
                                  "tracks it)",
    "train.log_model": "whether the MLflow run keeps a copy of the model",
    "datasets": "a stage checks that its dataset is defined (Config.dataset)",
    "run.datasets": "... and run by the profile: which jobs exist (the reports, which list them, track run)",
    "run.training_seeds": "a training checks that its --training-seed is one of the profile's: which jobs exist",
    "run.reference": "a baseline checks that its teacher, an input, is the reference",
    "<profile>": "policy.json keeps a copy of the resolved profile beside a trained model, a record of its run",
}
# What a fixed mode's training reads and cannot act on: one arm, no bandit, so no context to pool, no decision
# to make, nothing to act greedily or not on at test time (dht.policy.Policy builds empty context normalisers).
FIXED_MODE_UNUSED = ("dht.inference", "dht.decision_states", "dht.features")
RECORDER = Path(__file__).with_name("record_reads.py")


def stage_reads(path: Path) -> set[str]:
    """The params.yaml keys a stage read (tests/record_reads.py's record): not the copies of its tracked keys
    (MLflow params, the fingerprint), nor a section or mapping taken only to reach keys below it, nor an object
    the code built."""
    recorded = json.loads(path.read_text())
    out = set()
    for key, hows in recorded.items():
        real = set(hows) - {"section"}
        below = any(other.startswith(f"{key}.") for other in recorded)
        if key.startswith("?") or not real or (real <= {"object", "mapping"} and below) or real == {"object"}:
            continue
        out.add(key)
    return out


@pytest.mark.slow
def test_every_stage_tracks_the_params_it_reads(project):
    """Every stage of a small tiny DAG (one dataset; a fixed mode, the control, a tree mode and P-DHT with its
    warm-up mode; every baseline kind; the search; the reports) runs with each read of its configuration
    recorded, and every key it reads is one its rule tracks (so Snakemake and DVC rerun it when the key changes),
    or one of NOT_TRACKED, or, for a fixed mode, one it cannot act on."""
    import os
    import shlex

    from conftest import two_epoch_tiny

    from dht_workflow.snakemake_dag import snakemake_jobs

    def small(raw):
        raw["profile"] = "tiny"
        two_epoch_tiny(raw)
        raw["profiles"]["tiny"]["run"] = {
            "datasets": ["embedded-news"], "models": ["vanilla-12", "vanilla-3", "t-dht", "p-dht"],
            "baselines": ["distil-3", "fastbert-0.5", "nas-prune-0.5", "flexibert-0.5"]}
    set_params(project, small)
    jobs = snakemake_jobs(project, "tiny")
    assert {j.rule for j in jobs} == {"download", "tokenize", "arm_features", "flexibert_search", "train",
                                      "baseline", "compare", "table1", "table2", "figures", "index"}
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=python_path(project),
               DHT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    untracked = {}
    for i, job in enumerate(jobs):  # in the DAG's order
        python, *args = shlex.split(job.cmd)
        assert python == "python", job.cmd
        record = project / f"reads-{i}.json"
        proc = subprocess.run([str(BIN / "python"), str(RECORDER), str(record), *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{job.cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        fixed = job.rule == "train" and dict(job.wildcards)["model"] in ("vanilla-12", "vanilla-3")
        missing = sorted(
            key for key in stage_reads(record)
            if key not in NOT_TRACKED and not any(key == t or key.startswith(f"{t}.") for t in job.tracked)
            and not (fixed and any(key == k or key.startswith(f"{k}.") for k in FIXED_MODE_UNUSED)))
        if missing:
            untracked[job.stage_name] = missing
    assert not untracked, f"stages read params.yaml keys their rules do not track: {untracked}"
