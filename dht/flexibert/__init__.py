"""FlexiBERT / BOSHNAS baseline (Tuli et al. 2022, "FlexiBERT: Are Current Transformer Architectures too
Homogeneous and Rigid?", JAIR 76; arXiv:2205.11656) at this project's scale.

* :mod:`~dht.flexibert.space`: the heterogeneous design space and architectures;
* :mod:`~dht.flexibert.model`: a plain-torch FlexiBERT classifier;
* :mod:`~dht.flexibert.flops`: analytic FLOPs in :mod:`dht.flops`'s conventions, ratios to 12-VaBERT;
* :mod:`~dht.flexibert.embedding`: fixed-length architecture embeddings (in place of Transformer2vec);
* :mod:`~dht.flexibert.surrogate`: heteroscedastic ensemble surrogate (BOSHNAS);
* :mod:`~dht.flexibert.search`: the BOSHNAS loop with weight inheritance.

Paper sections are cited by subject ("design space", "Transformer2vec", "weight transfer", "BOSHNAS"):
the project keeps only the abstract (/work/shared/seeds/flexibert-abstract.txt), and details were checked against
the authors' code (github.com/jha-lab/txf_design-space), not against numbered sections.

What follows the paper and what was adapted: docs/baselines-flexibert.md.
"""

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
    "mixer_flops",
    "model_flops",
    "neighbours",
    "pareto_front",
    "predict_proba",
    "reference_flops",
    "sample",
    "sample_unique",
    "search",
    "train_and_evaluate",
    "within_budget",
]
