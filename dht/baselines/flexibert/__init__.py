"""FlexiBERT / BOSHNAS baseline (Tuli et al. 2022, "FlexiBERT: Are Current Transformer Architectures too
Homogeneous and Rigid?", JAIR 76; arXiv:2205.11656) at this project's scale: the ``flexibert-<ratio>`` baseline
(:func:`run`) is the architecture the dataset's FlexiBERT search (``flexibert_search`` stage,
:mod:`~dht.baselines.flexibert.search_stage`) found most accurate on the validation split within ``ratio`` of the
teacher's FLOPs, retrained on the training split.

* :mod:`~dht.baselines.flexibert.space`: the heterogeneous design space and architectures;
* :mod:`~dht.baselines.flexibert.model`: a plain-torch FlexiBERT classifier;
* :mod:`~dht.baselines.flexibert.flops`: analytic FLOPs in :mod:`dht.flops`'s conventions, ratios to 12-VaBERT;
* :mod:`~dht.baselines.flexibert.embedding`: fixed-length architecture embeddings (in place of Transformer2vec);
* :mod:`~dht.baselines.flexibert.surrogate`: heteroscedastic ensemble surrogate (BOSHNAS);
* :mod:`~dht.baselines.flexibert.search`: the BOSHNAS loop with weight inheritance;
* :mod:`~dht.baselines.flexibert.search_stage`: the search as the ``flexibert_search`` stage runs it, and the
  chosen architecture's retraining.

Paper sections are cited by subject ("design space", "Transformer2vec", "weight transfer", "BOSHNAS"):
the project keeps only the abstract (/work/shared/seeds/flexibert-abstract.txt), and details were checked against
the authors' code (github.com/jha-lab/txf_design-space), not against numbered sections.

What follows the paper and what was adapted: docs/baselines-flexibert.md.
"""

from __future__ import annotations

import json

import numpy as np

from dht.baselines import BaselineError, BaselineJob, BaselineRun, Loaded, LoadJob
from dht.evaluation import SplitData

from .embedding import ArchEmbedder, embedding_distance
from .flops import flop_ratio, layer_flops, mixer_flops, model_flops, reference_flops, within_budget
from .model import FlexiBertConfig, FlexiBertForSequenceClassification, FlexiBertOutput
from .search import (
    TrainingEvaluator,
    TrainResult,
    best_under_budget,
    candidate_pool,
    inherit_weights,
    inheritance_overlap,
    pareto_front,
    predict_proba,
    search,
    train_and_evaluate,
)
from .search_stage import choose, predictions, retrain, search_train_flops
from .space import (
    OPS,
    Architecture,
    LayerSpec,
    SpaceConfig,
    enumerate_space,
    neighbours,
    sample,
    sample_unique,
)
from .surrogate import HeteroscedasticEnsemble, SurrogatePrediction

__all__ = [
    "OPS",
    "ArchEmbedder",
    "Architecture",
    "FlexiBertConfig",
    "FlexiBertForSequenceClassification",
    "FlexiBertOutput",
    "HeteroscedasticEnsemble",
    "LayerSpec",
    "SpaceConfig",
    "SurrogatePrediction",
    "TrainResult",
    "TrainingEvaluator",
    "best_under_budget",
    "candidate_pool",
    "embedding_distance",
    "enumerate_space",
    "flop_ratio",
    "inherit_weights",
    "inheritance_overlap",
    "layer_flops",
    "load",
    "mixer_flops",
    "model_flops",
    "neighbours",
    "pareto_front",
    "predict_proba",
    "reference_flops",
    "run",
    "sample",
    "sample_unique",
    "search",
    "train_and_evaluate",
    "within_budget",
]


def _arrays(data: SplitData) -> dict[str, np.ndarray]:
    """The split as the FlexiBERT code takes it (the columns of dht.tokenization.load_processed)."""
    return {"input_ids": data.input_ids.numpy(), "attention_mask": data.attention_mask.numpy(),
            "label": data.labels.numpy()}


def run(ratio: float, job: BaselineJob) -> BaselineRun:
    """Choose, retrain and write to ``job.out_model`` (:func:`dht.baselines.run_baseline`). The search's training
    counts in its training FLOPs and epochs, as NAS pruning's does: it is what finding the architecture cost."""
    if job.search is None:
        raise BaselineError("flexibert baselines need --search (the flexibert_search stage's output directory)")
    trace = json.loads((job.search / "trace.json").read_text())["queries"]
    try:
        arch = choose(trace, ratio)
    except ValueError as err:
        raise BaselineError(str(err)) from None
    model, info = retrain(job.cfg, arch, _arrays(job.train), _arrays(job.val), job.meta, job.device)
    model.save_pretrained(job.out_model)
    # The search's trainings (on part of the split, a few steps each) as passes over the split, then the retraining.
    epochs = sum(e["train_samples"] for e in trace) / len(job.train) + job.cfg.baselines.flexibert.epochs
    return BaselineRun(lambda data: predictions(model, data, job.cfg.train.eval_batch_size, job.seq_len, job.device),
                       search_train_flops(trace) + info["train_flops"], epochs, [info["train_loss"]],
                       {"train_loss": info["step_losses"]}, params={"arch_id": arch.id})


def load(job: LoadJob) -> Loaded:
    """A ``flexibert-<ratio>`` model directory read back (:func:`dht.baselines.saved.load_baseline`)."""
    flexi = FlexiBertForSequenceClassification.from_pretrained(job.directory, device=job.device)
    c = flexi.config
    return Loaded(flexi, lambda data, batch_size, seq_len: predictions(flexi, data, batch_size, seq_len, job.device),
                  c.vocab_size, c.max_len, c.num_labels)
