"""Stage `flexibert_search`: BOSHNAS over FlexiBERT's heterogeneous design space on one dataset, for every
`flexibert-<ratio>` FLOP budget of run.baselines (docs/baselines-flexibert.md). Each queried architecture is
trained briefly on the training split and scored on the validation split; writes the search trace and its figure to
results/<dataset>/flexibert-search/, and one nested MLflow run per query under the search's run."""

import json
import sys
from pathlib import Path

import _stage

from dht.baselines import FLEXIBERT_SEARCH_PARAMS
from dht.baselines.flexibert.search_stage import budgets, reference_name, run_search, search_figure
from dht.model import DHTConfig
from dht.tokenization import load_processed
from dht.tracking import stage_run

p = _stage.parser(__doc__)
p.add_argument("--dataset", required=True)
p.add_argument("--processed", required=True)
p.add_argument("--init-model", required=True, help="data/features/<dataset>/init_model: the reference as built")
p.add_argument("--out", required=True)
_stage.add_threads(p)
args = p.parse_args()
cfg = _stage.config(args)
cfg.dataset(args.dataset)
_stage.stop_cleanly(f"flexibert_search {args.dataset}")
device, _ = _stage.runtime(args, cfg)
processed, out = Path(args.processed), Path(args.out)
meta = json.loads((processed / "meta.json").read_text())
train = load_processed(processed, "train")
val = load_processed(processed, "val")  # scores the queries (data.val_fraction); the test split is never read
# The reference's architecture as built from model.init (the FLOP ratios' 1.00x, the same reference the baseline
# stage evaluates against); the `model:` section need not describe a checkpoint.
reference = DHTConfig.from_pretrained(args.init_model)
params = {**{key: cfg.section(key) for key in FLEXIBERT_SEARCH_PARAMS},  # what the rule tracks
          "model_name": "flexibert-search", "dataset": args.dataset, "device": str(device), "budgets": budgets(cfg)}

with stage_run(args.dataset, "flexibert-search", stage="flexibert_search", profile=cfg.profile, params=params,
               prefix=cfg.tracking.experiment_prefix) as parent:
    import mlflow

    def log_query(entry: dict) -> None:
        # The parent's experiment explicitly: a nested run otherwise lands in the active (Default) experiment.
        with mlflow.start_run(run_name=f"query-{entry['step']:02d}", nested=True,
                              experiment_id=parent.info.experiment_id,
                              tags={"stage": "flexibert_query", "profile": cfg.profile}):
            mlflow.log_params({"arch_id": entry["arch_id"], "method": entry["method"], "budget": entry["budget"],
                               "parent_id": entry["parent_id"] or "none", "layers": len(entry["arch"]["layers"])})
            mlflow.log_metrics({k: float(entry[k]) for k in ("accuracy", "flop_ratio", "predicted_mean", "epistemic",
                                                             "aleatoric", "acquisition", "seconds")
                                if entry.get(k) is not None})
        print(f"flexibert {args.dataset} query {entry['step']} ({entry['method']}, budget {entry['budget']}x): "
              f"{entry['arch_id']} -> accuracy {entry['accuracy']:.3f} at {entry['flop_ratio']:.2f}x", flush=True)

    try:
        trace = run_search(cfg, train, val, meta, reference, device, on_query=log_query)
    except ValueError as err:
        sys.exit(f"error: {err}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace.json").write_text(json.dumps({"dataset": args.dataset, "budgets": budgets(cfg),
                                                "n_train": len(train["label"]), "n_val": len(val["label"]),
                                                "queries": trace}, indent=2) + "\n")
    figure = search_figure(trace, budgets(cfg), out / "search.png",
                           f"{args.dataset}: FlexiBERT architectures searched by BOSHNAS",
                           reference=reference_name(cfg, reference))
    best = max(trace, key=lambda e: e["accuracy"])
    mlflow.log_metrics({"queries": len(trace), "best_accuracy": best["accuracy"]})
    mlflow.log_artifact(str(out / "trace.json"))
    mlflow.log_artifact(str(figure))
print(f"flexibert_search {args.dataset}: {len(trace)} architectures, best {best['arch_id']} "
      f"({best['accuracy']:.3f} at {best['flop_ratio']:.2f}x) -> {out}")
