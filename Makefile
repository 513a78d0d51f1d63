# Set-up and the two commands README.md promises. Everything installs into .venv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= default
CORES   ?= 4
TARGET  ?= all
WORKERS ?= 2

.PHONY: install reproduce test test-all test-fast lint benchmarks dvc-yaml dvc-repro dvc-record dvc-pull dvc-checkout mlflow-ui clean

install: $(STAMP)

# torch==2.13.0 comes from the local CPU wheel where pip is configured with one (this project's machines),
# from PyPI otherwise (a CUDA build on a GPU machine).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## The main job: the pipeline on the default profile (the pretrained MiniLM on SST-2 and a DBpedia subset, real
## text; PROFILE=full|seeds|embedded|tiny|paper to change it, embedded and tiny being the generated data with a
## model from scratch), then the run recorded in DVC (dht dvc-record: dvc.lock and DVC's cache, seconds), so that
## `dvc status` is clean and `dvc push` sends the models and results. The record is skipped, saying why, where DVC
## cannot version the run: PROFILE is not params.yaml's `profile:` (DVC's stages run that one), dvc.yaml lists
## another profile's stages, no git repository; and for a TARGET other than all (`make dvc-record` once the whole
## DAG is built).
reproduce: $(STAMP)
	$(BIN)/snakemake --workflow-profile workflow/profiles/default --cores $(CORES) $(TARGET) --config profile=$(PROFILE)
ifeq ($(TARGET),all)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dht dvc-record --profile $(PROFILE) --optional
else
	@echo "note: TARGET=$(TARGET) is not the whole DAG: not recorded in DVC (make dvc-record once it is built)"
endif

## The test suite CI runs (README's test command): every fast test and the pipeline's end-to-end path (the tiny
## profile's whole DAG through Snakemake, then recorded in DVC, MLflow's runs and the reports read back; marker
## e2e), on WORKERS pytest-xdist processes: the end-to-end run keeps one worker and both cores busy while the other
## worker runs the fast tests. WORKERS=0 runs it in this process, one test at a time.
test: $(STAMP)
	$(BIN)/pytest -n $(WORKERS) -m "not slow or e2e"

## Every test, the other slow ones included: pipelines through Snakemake and `dvc repro` on parts of the tiny
## profile, two-process training, a killed training or rank resumed, the parameter-tracking audit (README gives
## the time). Run it before a change is submitted.
test-all: $(STAMP)
	$(BIN)/pytest -n $(WORKERS)

## The quick subset while developing: no pipeline run, no training beyond a few steps.
test-fast: $(STAMP)
	$(BIN)/pytest -n $(WORKERS) -m "not slow"

## Wall time beside FLOPs, bandit share, pipeline and suite times, scaling -> reports/benchmarks.md. Needs the
## trained models of the profile (make reproduce first); takes ~25 min on 2 cores (the cold pipeline run and the
## test suite included: SKIP="--skip-pipeline --skip-suite" leaves them out).
benchmarks: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/run.py --profile $(PROFILE) $(SKIP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/dht config validate
	$(BIN)/dht dvc-yaml --check

## Regenerate dvc.yaml after changing the Snakemake workflow.
dvc-yaml: $(STAMP)
	$(BIN)/dht dvc-yaml

## The same pipeline through DVC (stage commands call `python`: the venv's, via PATH).
dvc-repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

## Record a Snakemake run in DVC without rerunning anything (refused, naming the rules, unless Snakemake has nothing
## left to do); then `git add dvc.lock && git commit` and `dvc push`.
dvc-record: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dht dvc-record

## Restore data, models and results from DVC's cache or remote without Snakemake retraining them afterwards
## (dht sync-snakemake: only when `dvc status` confirms they match params.yaml and the code).
dvc-pull: $(STAMP)
	$(BIN)/dvc pull
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dht sync-snakemake

dvc-checkout: $(STAMP)
	$(BIN)/dvc checkout
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dht sync-snakemake

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" --port 5000

clean:
	rm -rf .snakemake data/raw data/processed data/features results models checkpoints reports/*.md reports/figures \
		mlflow.db mlartifacts mlruns
