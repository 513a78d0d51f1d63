"""Configuration: `params.yaml` resolved for one profile and validated before any job runs.

`params.yaml` holds the default profile at its top level and, under `profiles:`, overlays that list only what
they change. :func:`load_config` deep-merges the chosen overlay, validates the structure with pydantic
(unknown keys are errors, so typos fail loudly) and then checks the semantics the paper imposes (Section 6.1:
``(L - b)`` must be a multiple of ``c``; heads must divide the hidden size; ...). Every problem is reported as
``<key> = <value>: <what is wrong>; <what is allowed>`` so a user can fix params.yaml without reading code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILE_KEY = "profile"
OVERLAYS_KEY = "profiles"
EXTENDS_KEY = "extends"  # a profile that starts from another one


class ConfigError(ValueError):
    """A problem in params.yaml, phrased for the person who edits it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- datasets -----------------------------------------------------------------------------------------------


class EmbeddedDatasetSpec(_Strict):
    """The project's own generated dataset (docs/embedded-data.md): offline, seeded, with a difficulty column."""

    source: Literal["embedded"]
    num_classes: Annotated[int, Field(ge=2, le=8)] = 4
    n_train: Annotated[int, Field(ge=8)] = 4000
    n_test: Annotated[int, Field(ge=4)] = 1000
    difficulty_mix: tuple[float, float, float] = (0.4, 0.3, 0.3)
    max_length: Annotated[int, Field(ge=8)] = 48
    alias_hops: Annotated[int, Field(ge=1, le=10)] = 1  # lookups a hard sample takes (chained aliases when > 1)
    seed: int | None = None  # None: the top-level seed

    @model_validator(mode="after")
    def _mix_is_a_distribution(self) -> EmbeddedDatasetSpec:
        if any(p < 0 for p in self.difficulty_mix) or abs(sum(self.difficulty_mix) - 1.0) > 1e-6:
            raise ValueError(
                f"difficulty_mix = {list(self.difficulty_mix)}: must be three non-negative shares "
                "(easy, medium, hard) that sum to 1"
            )
        # A hard sample is its 2 x hops definitions (4 words each), >= 2 filler words, a negated distractor and
        # the 3-word query at the end, plus [CLS]/[SEP]: truncation would cut the query off.
        longest = 8 * self.alias_hops + 9 + 2
        if self.alias_hops > 1 and longest > self.max_length:
            raise ValueError(
                f"alias_hops = {self.alias_hops}: hard samples take about {longest} tokens, more than max_length = "
                f"{self.max_length}, and truncation would cut off their query; raise max_length (and "
                "model.max_position_embeddings) or lower alias_hops"
            )
        return self


class HubDatasetSpec(_Strict):
    """A Hugging Face dataset: a hub id (`fancyzhx/ag_news`) or a local directory (hub layout or save_to_disk)."""

    source: Literal["hub"]
    path: str
    name: str | None = None  # the hub dataset's config name, when it has several
    revision: str | None = None
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1)
    label_field: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    max_length: Annotated[int, Field(ge=8)] = 128
    max_train_samples: Annotated[int, Field(ge=1)] | None = None
    max_test_samples: Annotated[int, Field(ge=1)] | None = None
    paper: str | None = None  # the paper's dataset it is (ag_news, dbpedia, yelp_polarity, yelp_full); default: its name


class CsvDatasetSpec(_Strict):
    """Local `train.csv`/`test.csv` in the original Zhang et al. (2015) format (no header, 1-based class)."""

    source: Literal["csv"]
    path: str
    fields: list[str] = Field(min_length=1)  # names of the text columns after the class column
    unescape_newlines: bool | None = None  # None: true when there is one text field (the Yelp layout)
    max_length: Annotated[int, Field(ge=8)] = 128
    max_train_samples: Annotated[int, Field(ge=1)] | None = None
    max_test_samples: Annotated[int, Field(ge=1)] | None = None
    paper: str | None = None  # the paper's dataset it is (ag_news, dbpedia, yelp_polarity, yelp_full); default: its name


DatasetSpec = Annotated[
    EmbeddedDatasetSpec | HubDatasetSpec | CsvDatasetSpec, Field(discriminator="source")
]


# --- the rest -----------------------------------------------------------------------------------------------


class RunConfig(_Strict):
    datasets: list[str] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    baselines: list[str] = Field(default_factory=list)  # distil-<layers>, fastbert-<speed>, nas-prune-<ratio>
    # The full-depth model (a fixed mode running every layer with every head): the 1.00x of every FLOP ratio,
    # the row the reports compare against and the teacher of the baselines (12-VaBERT in the paper).
    reference: str = "vanilla-12"
    # A shallow fixed mode (b layers): the depth analysis asks whether DHT gives more layers to the samples it
    # gets wrong. None: no control.
    control: str | None = None
    # Training seeds: every model of run.models and run.baselines is trained once per seed, and the reports show
    # mean and standard deviation over them. None: one run with the top-level `seed`. The top-level seed still
    # draws the data subsets, the arm features and the FlexiBERT search, so seeds vary the training only
    # (order, dropout, exploration); docs/pipeline.md, "Several seeds".
    seeds: list[int] | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None:
            if not seeds:
                raise ValueError("an empty list trains nothing: list at least one seed, or remove the key")
            repeated = sorted({s for s in seeds if seeds.count(s) > 1})
            if repeated:
                raise ValueError(f"seed {', '.join(map(str, repeated))} listed twice: each seed is one run per model")
            negative = [s for s in seeds if s < 0]
            if negative:
                raise ValueError(f"seeds must be >= 0 (torch seeds); got {', '.join(map(str, negative))}")
        return seeds


class TokenizerConfig(_Strict):
    kind: Literal["wordpiece", "pretrained"] = "wordpiece"
    vocab_size: Annotated[int, Field(ge=32)] = 2000
    min_frequency: Annotated[int, Field(ge=1)] = 2
    lowercase: bool = True
    name_or_path: str | None = None


class ModelSection(_Strict):
    """params.yaml's `model:` section: the encoder to build or load (not the model's own config class,
    :class:`dht.model.DHTConfig`, which this section is turned into)."""

    init: str = "scratch"
    hidden_size: Annotated[int, Field(ge=1)] = 96
    num_hidden_layers: Annotated[int, Field(ge=1)] = 12
    num_attention_heads: Annotated[int, Field(ge=1)] = 12
    intermediate_size: Annotated[int, Field(ge=1)] = 384
    hidden_dropout_prob: Annotated[float, Field(ge=0, lt=1)] = 0.1
    attention_probs_dropout_prob: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_position_embeddings: Annotated[int, Field(ge=1)] = 64
    # Scratch models only (a BERT checkpoint is post-LN with its own weights); docs/model.md, "Training from scratch".
    layer_norm: Literal["post", "pre"] = "pre"
    residual_init_scale: Annotated[float, Field(ge=0, le=1)] = 0.0
    # What the classifier reads: cls (BERT's pooler on [CLS], the paper) | mean (mean of the token states, no
    # pooler: how sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained). docs/training.md.
    classifier_pooling: Literal["cls", "mean"] = "cls"

    @model_validator(mode="after")
    def _scratch_only_fields(self) -> ModelSection:
        if self.init != "scratch" and (self.layer_norm != "post" or self.residual_init_scale != 1.0):
            raise ValueError(
                f"model.init = {self.init!r} is a BERT checkpoint, trained post-LN with its own weights: set "
                "model.layer_norm: post and model.residual_init_scale: 1.0 (pre-LN and a scaled residual init are "
                "for init: scratch)"
            )
        if self.layer_norm == "post" and self.residual_init_scale == 0:
            raise ValueError(
                "model.residual_init_scale = 0 needs layer_norm: pre (post-LN puts a LayerNorm after the zeroed "
                "branch, so nothing would train); use pre, or a scale > 0 such as 1.0"
            )
        return self


class ModeSpec(_Strict):
    """One DHT configuration of Section 6.1 (or 12-VaBERT as the single fixed arm 12L12H)."""

    search: Literal["tree", "integrated", "fixed"]
    layers: list[int] | None = None  # tree search: UCB_L's options
    heads: list[int] | None = None  # tree search: UCB_H's options
    arms: list[str] | None = None  # integrated/fixed: UCB_cp's options, e.g. "6L8H" or "4L8H+2L12H"
    warmup_mode: str | None = None  # P-DHT: train as this mode first ...
    warmup_epochs: Annotated[int, Field(ge=0)] = 0  # ... for this many epochs


class PoolingConfig(_Strict):
    """Multi-granularity mean pooling (Section 7.1): split the tokens into 1, 2, ... parts and the hidden
    dimension into 4, 8, ... parts, and take each part's mean."""

    # The one description of a pooling: dht.contexts pools with it (multi_granularity_pool, pool_head_slices).
    seq_splits: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    hidden_splits: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)

    @property
    def size(self) -> int:
        """Features the pooling gives: sum(seq_splits) * sum(hidden_splits). Section 7.1: "(1+2)=3 sl features
        and 4+8+16 emb features" -> 3 * 28 = 84 (the paper prints 26 and "3x36", both arithmetic slips; 84 is the
        only value consistent with the vector size 168 of Section 7.3)."""
        return sum(self.seq_splits) * sum(self.hidden_splits)


def _pool(seq: list[int], hidden: list[int]) -> PoolingConfig:
    return PoolingConfig(seq_splits=seq, hidden_splits=hidden)


class FeaturesConfig(_Strict):
    """Context and arm-feature sizes; the defaults are the ones the paper's vector lengths imply
    (84 for UCB_L/UCB_cp, 42 for UCB_H, 12 for TSB; docs/bandits.md)."""

    # The paper's poolings (Section 7.1) and their sizes (Section 7.3): the context x, then the bandit's vector.
    ucb_l: PoolingConfig = _pool([1, 2], [4, 8, 16])  # 3 x 28 = 84; w = [x ; z_L] -> 168
    ucb_cp: PoolingConfig = _pool([1, 2], [4, 8, 16])  # 3 x 28 = 84; w = [x ; z_cp] -> 168
    ucb_h: PoolingConfig = _pool([1, 2], [2, 4, 8])  # 3 x 14 = 42; w = [x ; z_H ; e_l] -> 42 + 42 + 3 = 87
    tsb: PoolingConfig = _pool([1], [4, 8])  # 1 x 12 = 12; w = [x ; 1] -> 13
    arm_feature_samples: Annotated[int, Field(ge=1)] | None = None  # None: the whole training split
    batch_size: Annotated[int, Field(ge=1)] = 256
    # Plain full-depth training steps on a copy of the initial model before the arm-feature pass; training
    # still starts from the initial model (docs/paper-notes.md, row 10). 0: the initial model itself.
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    # epoch: recompute the arm features from the model being trained at the start of every epoch after the
    # first (docs/training.md, T14); none: the stage's single pass (the paper).
    refresh: Literal["none", "epoch"] = "none"
    # Add the shallow exit's uncertainty (1 - the top-class probability of the shared classifier read on S1) to
    # the UCB_L / UCB_cp context: not the paper's (its context is the pooled S1 alone); docs/training.md T23.
    exit_confidence: bool = False


class BanditConfig(_Strict):
    """Bandit and reward hyper-parameters (Sections 3.1, 3.2, 4.3; readings in docs/bandits.md, docs/training.md)."""

    ucb_alpha: Annotated[float, Field(ge=0)] = 1.0  # LinUCB exploration bonus
    ucb_lambda: Annotated[float, Field(gt=0)] = 1.0  # LinUCB ridge
    ts_alpha: Annotated[float, Field(ge=0)] = 1.0  # TSB posterior scale
    ts_lambda: Annotated[float, Field(gt=0)] = 1.0  # TSB prior precision
    reward_alpha: Annotated[float, Field(gt=0)] = 1.0  # alpha of r_L
    reward_beta_h: Annotated[float, Field(gt=0)] = 1.0  # beta_1 of r_H
    reward_beta_cp: Annotated[float, Field(gt=0)] = 1.0  # beta_cp of r_cp
    # gamma of delta = loss * L**gamma (* H**gamma): 1 is the paper; lower values let deeper arms win on loss.
    cost_exponent: Annotated[float, Field(ge=0)] = 1.0
    reward_clip: Annotated[float, Field(gt=0)] | None = 10.0  # cap on ratio rewards (one tiny loss must not dominate)
    reward_baseline: Literal["global", "per_queue"] = "global"  # "the previous batch": any queue's, or the same L's
    ts_reward_sign: Literal["text", "printed"] = "text"  # ambiguity 1 of docs/paper-notes.md
    tsb_arm_features: bool = False  # TSB vector [x ; 1] (size 13) or [x ; z_h]


class DHTSection(_Strict):
    """params.yaml's `dht:` section: b, c, the contexts, the bandits and the modes (:class:`ModeSpec`)."""

    fixed_layers: Annotated[int, Field(ge=0)] = 3
    group_size: Annotated[int, Field(ge=1)] = 3
    features: FeaturesConfig = FeaturesConfig()
    bandits: BanditConfig = BanditConfig()
    inference: Literal["greedy", "sample"] = "greedy"  # how the bandits act at test time (no updates)
    count_s1_flops: bool = True  # count the no-grad S1 pass in training FLOPs (the paper does not say)
    p_dht_freeze: Literal["all_but_last_two", "last_two", "none"] = "all_but_last_two"  # Section 6.1 reading
    # States UCB_H and the TSB decide from in training: an eval-mode pass as at inference, or the dropout-noised
    # states of the gradient pass (docs/training.md, T2)
    decision_states: Literal["clean", "train"] = "clean"
    modes: dict[str, ModeSpec]


class DistributedConfig(_Strict):
    """One model trained by several processes (torchrun + DistributedDataParallel, docs/distributed.md): each
    rank trains `train.batch_size` samples a step, so a step trains nproc_per_node x batch_size samples."""

    nproc_per_node: Annotated[int, Field(ge=1)] = 1  # processes (GPUs) of one node; 1: no torchrun, no DDP
    backend: Literal["nccl", "gloo"] = "nccl"  # nccl: CUDA GPUs; gloo: CPU (the tests)
    # rank: each rank's own per-L queues of q (the ranks of a step may run different depths, and a step lasts as
    # long as its deepest batch); global: one set of queues of N x q on every rank, each released batch split over
    # the ranks, so a step runs one depth everywhere (docs/distributed.md, T22)
    queues: Literal["rank", "global"] = "rank"


class TrainConfig(_Strict):
    epochs: Annotated[int, Field(ge=1)] = 3
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    batch_size: Annotated[int, Field(ge=1)] = 32  # also the queue size q of Algorithm 3
    eval_batch_size: Annotated[int, Field(ge=1)] = 128
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    checkpoint_every: Annotated[int, Field(ge=1)] = 50  # optimizer steps between resumable checkpoints
    log_model: bool = True  # copy the model directory into MLflow's artifacts
    distributed: DistributedConfig = DistributedConfig()


class DistilConfig(_Strict):
    """DistilBERT (Sanh et al. 2019) students of the trained 12-VaBERT (BL2)."""

    epochs: Annotated[int, Field(ge=1)] = 3
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    temperature: Annotated[float, Field(gt=0)] = 2.0
    alpha_kd: Annotated[float, Field(ge=0)] = 0.5
    alpha_ce: Annotated[float, Field(ge=0)] = 0.5
    alpha_cos: Annotated[float, Field(ge=0)] = 0.0


class FastBERTConfig(_Strict):
    """FastBERT (Liu et al. 2020) self-distillation of student classifiers on the trained 12-VaBERT (BL3)."""

    epochs: Annotated[int, Field(ge=1)] = 2
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    classifier_size: Annotated[int, Field(ge=2)] | None = None  # None: hidden x 128/768 (FastBERT's proportion)


class NASPruneConfig(_Strict):
    """Differentiable NAS pruning of the trained 12-VaBERT (the NAS-on-BERT report, Sections 5.3-5.5)."""

    search_epochs: Annotated[int, Field(ge=1)] = 2
    finetune_epochs: Annotated[int, Field(ge=1)] = 2
    lambda_cost: Annotated[float, Field(ge=0)] = 1.0
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.05
    lr_weights: Annotated[float, Field(gt=0)] = 1e-4
    lr_arch: Annotated[float, Field(gt=0)] = 5e-2
    temperature: Annotated[float, Field(gt=0)] = 2.0
    alpha_kd: Annotated[float, Field(ge=0, le=1)] = 0.5


FlexiOp = Literal["sdp", "wma", "dft", "dct", "conv5", "conv9", "conv13"]  # dht.flexibert.space.OPS (tested)


class FlexiBERTConfig(_Strict):
    """FlexiBERT (Tuli et al. 2022): heterogeneous encoders searched by BOSHNAS, one search per dataset, then the
    best architecture within each `flexibert-<ratio>` FLOP budget retrained (docs/baselines-flexibert.md)."""

    # The design space; defaults: the paper's "Tiny" space with every operation type.
    hidden: list[Annotated[int, Field(ge=1)]] = [128, 256]
    layers: list[Annotated[int, Field(ge=1)]] = [2, 4]
    heads: list[Annotated[int, Field(ge=1)]] = [2, 4]
    ffn_widths: list[Annotated[int, Field(ge=1)]] = [512, 1024]
    ffn_depths: list[Annotated[int, Field(ge=1)]] = [1, 2]
    ops: list[FlexiOp] = ["sdp", "wma", "dft", "dct", "conv5", "conv9", "conv13"]
    # BOSHNAS
    candidates: Annotated[int, Field(ge=1)] = 5000  # sampled when the space is larger (then filtered by budget)
    evaluations: Annotated[int, Field(ge=1)] = 12  # architectures trained by the search, over all budgets
    n_init: Annotated[int, Field(ge=1)] = 3  # random queries per budget before the surrogate steers
    kappa: Annotated[float, Field(ge=0)] = 0.5  # UCB weight of the surrogate's standard deviation
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # of the training split, scores the queries
    search_epochs: Annotated[int, Field(ge=1)] = 1  # brief training of each queried architecture ...
    search_max_steps: Annotated[int, Field(ge=1)] | None = None  # ... capped at this many steps
    # The chosen architecture, retrained on the whole training split
    epochs: Annotated[int, Field(ge=1)] = 3
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3


class BaselinesConfig(_Strict):
    distil: DistilConfig = DistilConfig()
    fastbert: FastBERTConfig = FastBERTConfig()
    nas_prune: NASPruneConfig = NASPruneConfig()
    flexibert: FlexiBERTConfig = FlexiBERTConfig()


_BASELINE = re.compile(
    r"(distil)-(\d+)|(fastbert)-(\d*\.?\d+)|(nas-prune)-(\d*\.?\d+)|(flexibert)-(\d*\.?\d+)"
)


def parse_baseline(name: str) -> tuple[str, float]:
    """("distil", layers) / ("fastbert", speed) / ("nas-prune" or "flexibert", FLOP ratio) from a baseline's name."""
    m = _BASELINE.fullmatch(name)
    if not m:
        raise ValueError(
            f"{name!r} is not a baseline: write distil-<layers> (e.g. distil-3), fastbert-<speed> "
            "(e.g. fastbert-0.5), nas-prune-<FLOP ratio> (e.g. nas-prune-0.5) or flexibert-<FLOP ratio> "
            "(e.g. flexibert-0.5)"
        )
    kind = m.group(1) or m.group(3) or m.group(5) or m.group(7)
    value = m.group(2) or m.group(4) or m.group(6) or m.group(8)
    return kind, float(value)


class TrackingConfig(_Strict):
    experiment_prefix: str = ""


class Config(_Strict):
    """The resolved configuration of one profile."""

    profile: str
    seed: int = 0
    device: str = "auto"
    datasets: dict[str, DatasetSpec]
    run: RunConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelSection = ModelSection()
    dht: DHTSection
    train: TrainConfig = TrainConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    tracking: TrackingConfig = TrackingConfig()

    def dataset(self, name: str) -> EmbeddedDatasetSpec | HubDatasetSpec | CsvDatasetSpec:
        """The spec of a dataset the active profile runs; a clear error otherwise."""
        if name not in self.run.datasets:
            raise ConfigError(
                f"dataset '{name}' is not in run.datasets of profile '{self.profile}' "
                f"(it runs: {', '.join(self.run.datasets)}). Add it to run.datasets in params.yaml, or pick "
                "the profile that runs it (snakemake --config profile=NAME / dvc exp run -S profile=NAME; "
                "after changing the dataset list, regenerate dvc.yaml with `dht dvc-yaml`)."
            )
        return self.datasets[name]

    @property
    def training_seeds(self) -> list[int]:
        """The seeds each model is trained with: run.seeds, or the top-level seed alone."""
        return list(self.run.seeds) if self.run.seeds is not None else [self.seed]

    def section(self, dotted: str) -> Any:
        """A resolved sub-tree by dotted key (`datasets.embedded-news`), as plain data."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node


# --- arms ---------------------------------------------------------------------------------------------------

_ARM_PART = re.compile(r"(\d+)L(\d+)H")


@dataclass(frozen=True)
class Arm:
    """An architecture choice, as printed in Section 6.1: segments of (layers, heads), e.g. 4L8H+2L12H."""

    segments: tuple[tuple[int, int], ...]

    @property
    def num_layers(self) -> int:
        return sum(n for n, _ in self.segments)

    def heads_per_layer(self) -> list[int]:
        return [h for n, h in self.segments for _ in range(n)]

    def __str__(self) -> str:
        return "+".join(f"{n}L{h}H" for n, h in self.segments)

    def layer_heads(self, fixed_layers: int, num_heads: int) -> list[int]:
        """Heads each layer really runs: the first b layers always run every head (Section 4.2), the rest follow
        the segments (4L8H+2L12H with b = 3: 12, 12, 12, 8, 12, 12)."""
        return [num_heads if layer < fixed_layers else h for layer, h in enumerate(self.heads_per_layer())]

    def runs_as(self, fixed_layers: int, num_heads: int) -> Arm:
        """The plan this arm really runs (:meth:`layer_heads`) as an arm, segments of equal heads merged:
        1L8H+2L12H with b = 3 runs as 3L12H."""
        heads = self.layer_heads(fixed_layers, num_heads)
        merged: list[list[int]] = []
        for h in heads:
            if merged and merged[-1][1] == h:
                merged[-1][0] += 1
            else:
                merged.append([1, h])
        return Arm(tuple((n, h) for n, h in merged))


def parse_arm(text: str) -> Arm:
    """Parse "6L8H" or "4L8H+2L12H" into an :class:`Arm`; raise ValueError on anything else."""
    parts = text.replace(" ", "").split("+")
    segments = []
    for part in parts:
        m = _ARM_PART.fullmatch(part)
        if not m:
            raise ValueError(
                f"'{text}' is not an arm: write <layers>L<heads>H, optionally joined by '+', "
                "e.g. 6L8H or 4L8H+2L12H"
            )
        segments.append((int(m.group(1)), int(m.group(2))))
    return Arm(tuple(segments))


# --- loading ------------------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; everything else in `overlay` replaces what `base` had."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges: later keys override them on purpose
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key is the base loader's error to report
                if key in first:
                    raise _DuplicateKey(
                        None, None,
                        f"key {key!r} is written twice in this mapping (first on line {first[key] + 1}); YAML would "
                        "keep the last one silently: delete one of them", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml as a mapping; invalid YAML and a key written twice are refused with the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Run from the project root, or pass the path of params.yaml.")
    try:
        with path.open(encoding="utf-8") as fh:  # a stream, so that YAML's messages name the file
            data = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as err:
        mark = err.problem_mark
        raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (profile, datasets, run, model, ...)")
    return data


def resolve_params(raw: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Apply the chosen profile's overlay to the top-level (default) sections.

    An overlay may start from another profile with ``extends: <profile>`` (resolved first, recursively): the
    ``tiny`` CI profile is the ``embedded`` profile made smaller, without restating it."""
    overlays = raw.get(OVERLAYS_KEY) or {}
    if not isinstance(overlays, Mapping):
        raise ConfigError(f"{OVERLAYS_KEY}: must be a mapping of profile name to overlay")
    name = profile if profile is not None else raw.get(PROFILE_KEY, "default")
    base = {k: v for k, v in raw.items() if k not in (OVERLAYS_KEY, PROFILE_KEY)}
    resolved = _apply_overlay(base, overlays, name, [])
    resolved[PROFILE_KEY] = name
    return resolved


def _apply_overlay(base: dict[str, Any], overlays: Mapping[str, Any], name: str, chain: list[str]) -> dict[str, Any]:
    if name not in overlays and name != "default":
        raise ConfigError(
            f"profile = {name!r}: unknown profile; allowed: {', '.join(sorted(overlays) or ['default'])}"
        )
    if name in chain:
        raise ConfigError(f"{OVERLAYS_KEY}: profiles extend each other in a cycle: {' -> '.join([*chain, name])}")
    overlay = overlays.get(name) or {}
    if not isinstance(overlay, Mapping):
        raise ConfigError(f"{OVERLAYS_KEY}.{name}: must be a mapping (use {{}} for no changes)")
    if PROFILE_KEY in overlay or OVERLAYS_KEY in overlay:
        raise ConfigError(f"{OVERLAYS_KEY}.{name}: an overlay cannot set '{PROFILE_KEY}' or '{OVERLAYS_KEY}'")
    parent = overlay.get(EXTENDS_KEY)
    if parent is not None:
        if not isinstance(parent, str) or parent not in overlays:
            raise ConfigError(
                f"{OVERLAYS_KEY}.{name}.{EXTENDS_KEY} = {parent!r}: must name another profile; allowed: "
                f"{', '.join(sorted(p for p in overlays if p != name))}"
            )
        base = _apply_overlay(base, overlays, parent, [*chain, name])
    return deep_merge(base, {k: v for k, v in overlay.items() if k != EXTENDS_KEY})


def load_config(
    path: str | Path = "params.yaml", profile: str | None = None, raw: Mapping[str, Any] | None = None
) -> Config:
    """Read, resolve and validate params.yaml for `profile` (default: its `profile:` key).

    Raises :class:`ConfigError` listing every problem found, each naming the key, the value and what is
    allowed.
    """
    if raw is None:
        raw = read_params(path)
    resolved = resolve_params(raw, profile)
    where = f"{Path(path).name} (profile '{resolved[PROFILE_KEY]}')"
    booleans = booleans_for_numbers(Config, resolved)
    try:
        cfg = Config.model_validate(resolved)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(where, err, resolved, booleans)) from None
    problems = booleans + check_semantics(cfg) + dataset_path_problems(cfg, Path(path).parent)
    if problems:
        raise ConfigError(f"{where} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def _wants_number(annotation: Any) -> bool:
    """Whether a field takes an int or a float (alone, optional, or as the items of a list or tuple)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Annotated:
        return _wants_number(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType, list, tuple):
        args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
        return bool(args) and bool not in args and all(_wants_number(a) for a in args)
    return False


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's value may be (through Annotated, unions and optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Annotated, Union, UnionType):
        args = get_args(annotation)[:1] if get_origin(annotation) is Annotated else get_args(annotation)
        return [m for a in args for m in _models_in(a)]
    return []


def booleans_for_numbers(model: type[BaseModel], data: Any, prefix: str = "") -> list[str]:
    """Keys given a boolean where a number is needed. YAML 1.1 reads yes/no/on/off (and true/false) as
    booleans, which pydantic would take as 1 and 0: `checkpoint_every: yes` would checkpoint every step."""
    if not isinstance(data, Mapping):
        return []
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(str(key))
        if field is None:
            continue  # unknown keys are the validation's to report
        name = f"{prefix}{key}"
        items = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, bool) for v in items) and _wants_number(field.annotation):
            problems.append(f"{name} = {json.dumps(value)}: a number is needed, not a yes/no (YAML reads yes, no, "
                            "on, off, true and false as booleans)")
        elif isinstance(value, Mapping):
            annotation = field.annotation
            if get_origin(annotation) is dict:  # name -> model (datasets, dht.modes)
                inner = _models_in(get_args(annotation)[1])
                for sub, sub_value in value.items():
                    problems += booleans_for_numbers(_pick(inner, sub_value), sub_value, f"{name}.{sub}.")
            elif _models_in(annotation):
                problems += booleans_for_numbers(_pick(_models_in(annotation), value), value, f"{name}.")
    return problems


def _pick(models: list[type[BaseModel]], value: Any) -> type[BaseModel]:
    """The model of a discriminated union (by `source`) that `value` is; the first when it says nothing."""
    if not models:
        return BaseModel
    source = value.get("source") if isinstance(value, Mapping) else None
    for m in models:
        if "source" in m.model_fields and source in get_args(m.model_fields["source"].annotation):
            return m
    return models[0]


def dataset_path_problems(cfg: Config, root: str | Path = ".") -> list[str]:
    """A `csv` dataset the profile runs must be there (relative paths from ``root``, the directory of
    params.yaml, where the stages run): checked with every other parameter, not in its first job."""
    problems = []
    for name in cfg.run.datasets:
        spec = cfg.datasets.get(name)
        if not isinstance(spec, CsvDatasetSpec):
            continue
        directory = Path(spec.path) if Path(spec.path).is_absolute() else Path(root) / spec.path
        if not directory.is_dir():
            problems.append(f"datasets.{name}.path = {spec.path!r}: no such directory; point it at the folder that "
                            "holds train.csv and test.csv (relative paths start at the project root)")
            continue
        missing = [f for f in ("train.csv", "test.csv") if not (directory / f).is_file()]
        if missing:
            problems.append(f"datasets.{name}.path = {spec.path!r}: no {' and no '.join(missing)} in it; a csv "
                            "dataset is a folder with train.csv and test.csv (and optionally classes.txt)")
    return problems


def _format_validation_error(where: str, err: ValidationError, data: Mapping[str, Any],
                             also: list[str] | None = None) -> str:
    lines = list(also or [])
    for e in err.errors():
        # Drop pydantic's discriminated-union tags ('embedded', 'hub', ...) from the key path.
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("embedded", "hub", "csv"))]
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _lookup_model(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent is not None else "see params.yaml"
            lines.append(f"{key}: unknown key; allowed here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required but missing")
        elif e["type"] == "union_tag_invalid":
            given = e["input"].get("source") if isinstance(e["input"], Mapping) else e["input"]
            lines.append(f"{key}.source = {given!r}: unknown source; allowed: embedded, hub, csv")
        else:
            value = json.dumps(e.get("input"), default=str)
            lines.append(f"{key} = {value}: {e['msg']}")
    return f"{where} has {len(lines)} problem(s):\n" + "\n".join(f"  - {line}" for line in lines)


def _lookup_model(loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model at a key path, to list the keys allowed there."""
    model: Any = Config
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            # Inside a dict[str, Model]: the key is a name, the model is the dict's value type.
            return model if model is not Config else None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = args[1] if getattr(ann, "__origin__", None) is dict and args else ann
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def allowed_layer_counts(cfg: Config) -> list[int]:
    b, c, n = cfg.dht.fixed_layers, cfg.dht.group_size, cfg.model.num_hidden_layers
    return [layers for layers in range(max(b, 1), n + 1) if (layers - b) % c == 0]


def modes_in_use(cfg: Config) -> set[str]:
    """The modes a profile runs: run.models, the warm-up modes they start with, and the reference and control.
    Only these are checked against the model's shape."""
    used = set(cfg.run.models)
    for name in (cfg.run.reference, cfg.run.control):
        if name:
            used.add(name)
    for name in list(used):
        mode = cfg.dht.modes.get(name)
        if mode is not None and mode.warmup_mode:
            used.add(mode.warmup_mode)
    return used


def _same_plan_arms(key: str, arms: list[str], b: int, num_heads: int) -> list[str]:
    """One message per group of arms that run the same per-layer plan (they would be one arm under several
    names: the bandit splits its updates between them, and the reward's H of the ones written with fewer heads
    in the first b layers is not the H they run)."""
    runs: dict[Arm, list[Arm]] = {}
    for text in arms:
        with contextlib.suppress(ValueError):  # unparsable arms have their own message
            arm = parse_arm(text)
            runs.setdefault(arm.runs_as(b, num_heads), []).append(arm)
    problems = []
    for plan, same in runs.items():
        if len(same) < 2:
            continue
        k = next((i for i, a in enumerate(same) if a.heads_per_layer() == plan.heads_per_layer()), 0)
        keep, drop = same[k], [str(a) for i, a in enumerate(same) if i != k]
        problems.append(
            f"{key}.arms: {', '.join(map(str, same))} all run {plan} (the first b = {b} layers always keep all "
            f"{num_heads} heads), so they are one arm under {len(same)} names; keep {keep} and drop "
            f"{', '.join(drop)}, or make them differ after layer {b}"
        )
    return problems


def run_param_keys(cfg: Config, mode_name: str) -> list[str]:
    """The params.yaml keys a training run of `mode_name` reads: its own mode (and its warm-up mode) and the
    shared settings. The one list behind the train rule's tracked params (Snakemake reruns, DVC's `params:`),
    the MLflow run's params and the checkpoint's :func:`fingerprint`."""
    mode = cfg.dht.modes[mode_name]
    keys = ["seed", "device", "model", "train", "dht.fixed_layers", "dht.group_size", "dht.features",
            "dht.bandits", "dht.inference", "dht.count_s1_flops", "dht.p_dht_freeze", "dht.decision_states",
            f"dht.modes.{mode_name}"]
    return keys + ([f"dht.modes.{mode.warmup_mode}"] if mode.warmup_mode else [])


def check_semantics(cfg: Config) -> list[str]:
    """Cross-field rules of the paper and of the pipeline; returns one message per problem."""
    problems: list[str] = []
    m, d = cfg.model, cfg.dht
    b, c = d.fixed_layers, d.group_size

    if m.hidden_size % m.num_attention_heads:
        divisors = [h for h in range(1, m.hidden_size + 1) if m.hidden_size % h == 0 and h <= 64]
        problems.append(
            f"model.num_attention_heads = {m.num_attention_heads}: must divide model.hidden_size = "
            f"{m.hidden_size}; allowed: {', '.join(map(str, divisors))} (or change hidden_size)"
        )
    if b > m.num_hidden_layers:
        problems.append(
            f"dht.fixed_layers = {b}: b cannot exceed model.num_hidden_layers = {m.num_hidden_layers}"
        )
    for bandit, pool in cfg.dht.features:
        if not isinstance(pool, PoolingConfig):
            continue
        bad = [h for h in pool.hidden_splits if m.hidden_size % h]
        if bad:
            problems.append(
                f"dht.features.{bandit}.hidden_splits = {pool.hidden_splits}: {', '.join(map(str, bad))} do not "
                f"divide model.hidden_size = {m.hidden_size}; use divisors of the hidden size"
            )
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", cfg.device):
        problems.append(f"device = {cfg.device!r}: allowed: auto, cpu, cuda, cuda:N, mps")
    distributed = cfg.train.distributed
    if distributed.nproc_per_node > 1:
        if cfg.device not in ("auto", "cpu", "cuda"):
            problems.append(
                f"device = {cfg.device!r}: train.distributed.nproc_per_node = {distributed.nproc_per_node} gives each "
                "process its own device (cuda:<local rank>); use auto, cuda or cpu"
            )
        if cfg.device == "cpu" and distributed.backend == "nccl":
            problems.append("train.distributed.backend = 'nccl' needs CUDA GPUs, but device = 'cpu'; use gloo")

    for name in cfg.run.datasets:
        if name not in cfg.datasets:
            problems.append(
                f"run.datasets: {name!r} is not a dataset; allowed (defined under datasets:): "
                f"{', '.join(cfg.datasets)}"
            )
        elif cfg.datasets[name].max_length > m.max_position_embeddings:
            problems.append(
                f"datasets.{name}.max_length = {cfg.datasets[name].max_length}: exceeds "
                f"model.max_position_embeddings = {m.max_position_embeddings}; lower max_length or raise "
                "max_position_embeddings"
            )
    for name in cfg.run.models:
        if name not in d.modes:
            problems.append(
                f"run.models: {name!r} is not a mode; allowed (defined under dht.modes:): {', '.join(d.modes)}"
            )

    for i, name in enumerate(cfg.run.baselines):
        try:
            kind, value = parse_baseline(name)
        except ValueError as err:
            problems.append(f"run.baselines[{i}] = {name!r}: {err}")
            continue
        if kind == "distil" and not 1 <= value <= m.num_hidden_layers:
            problems.append(f"run.baselines[{i}] = {name!r}: a student has 1..{m.num_hidden_layers} layers")
        if kind == "fastbert" and not 0 <= value <= 1:
            problems.append(f"run.baselines[{i}] = {name!r}: a FastBERT speed is in [0, 1]")
        if kind in ("nas-prune", "flexibert") and not 0 < value <= 1:
            problems.append(f"run.baselines[{i}] = {name!r}: a FLOP target ratio is in (0, 1]")
    fx = cfg.baselines.flexibert
    if any(n.startswith("flexibert-") for n in cfg.run.baselines):
        if not any(h % n == 0 for h in fx.hidden for n in fx.heads):
            problems.append(f"baselines.flexibert.heads = {fx.heads}: none divides a hidden size in {fx.hidden}")
        if fx.n_init > fx.evaluations:
            problems.append(f"baselines.flexibert.n_init = {fx.n_init}: at most evaluations = {fx.evaluations}")
    problems += _check_reference(cfg)
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.name_or_path:
        problems.append(
            "tokenizer.name_or_path = null: tokenizer.kind = pretrained needs a hub name, a local directory "
            "(e.g. bert-base-uncased) or package:NAME"
        )
    problems += _pretrained_package_problems(cfg)

    allowed_l = allowed_layer_counts(cfg)
    layer_rule = (
        f"(L - b) must be a multiple of c; with b = {b}, c = {c} and {m.num_hidden_layers} layers the allowed "
        f"layer counts are {', '.join(map(str, allowed_l)) or 'none'}"
    )
    in_use = modes_in_use(cfg)
    for mode_name, mode in d.modes.items():
        if mode_name not in in_use:
            continue  # a profile may keep modes of another model shape (the paper's 12-layer arms) that it never runs
        key = f"dht.modes.{mode_name}"
        bad_heads: set[int] = {h for h in mode.heads or [] if not 1 <= h <= m.num_attention_heads}
        if mode.search == "tree":
            if not mode.layers or not mode.heads:
                problems.append(f"{key}: search = tree needs both `layers` (UCB_L) and `heads` (UCB_H) lists")
            if mode.arms:
                problems.append(f"{key}.arms: search = tree takes `layers` and `heads`, not `arms`")
            for i, layers in enumerate(mode.layers or []):
                if layers not in allowed_l:
                    problems.append(f"{key}.layers[{i}] = {layers}: {layer_rule}")
        else:
            if not mode.arms:
                problems.append(f"{key}: search = {mode.search} needs an `arms` list (e.g. [6L8H, 12L12H])")
            if mode.layers or mode.heads:
                problems.append(f"{key}: search = {mode.search} takes `arms`, not `layers`/`heads`")
            if mode.search == "fixed" and mode.arms and len(mode.arms) != 1:
                problems.append(f"{key}.arms = {mode.arms}: search = fixed takes exactly one arm")
            for i, text in enumerate(mode.arms or []):
                try:
                    arm = parse_arm(text)
                except ValueError as err:
                    problems.append(f"{key}.arms[{i}] = {text!r}: {err}")
                    continue
                if arm.num_layers not in allowed_l:
                    problems.append(f"{key}.arms[{i}] = {text!r}: has L = {arm.num_layers} layers; {layer_rule}")
                bad_heads |= {h for _, h in arm.segments if not 1 <= h <= m.num_attention_heads}
            problems += _same_plan_arms(key, mode.arms or [], b, m.num_attention_heads)
        if bad_heads:
            problems.append(
                f"{key}: head counts {', '.join(map(str, sorted(bad_heads)))} are outside 1.."
                f"{m.num_attention_heads} (model.num_attention_heads)"
            )
        if mode.warmup_mode is not None:
            if mode.warmup_mode not in d.modes or mode.warmup_mode == mode_name:
                problems.append(
                    f"{key}.warmup_mode = {mode.warmup_mode!r}: must name another mode; allowed: "
                    f"{', '.join(n for n in d.modes if n != mode_name)}"
                )
            if mode.warmup_epochs >= cfg.train.epochs and mode_name in cfg.run.models:
                problems.append(
                    f"{key}.warmup_epochs = {mode.warmup_epochs}: must be fewer than train.epochs = "
                    f"{cfg.train.epochs}, or the mode never leaves its warm-up"
                )
    return problems


# The checkpoint's architecture wins over `model:` (model_from_params), but the arms, the layer rule and the
# feature splits above are checked against `model:`; so for a package, whose config.json is at hand, they must agree.
_CHECKPOINT_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _pretrained_package_problems(cfg: Config) -> list[str]:
    """``package:NAME`` values (dht/pretrained.py): a known, importable package whose architecture is `model:`'s,
    used with its own tokenizer. The weights' checksum is not computed here (0.3 s a profile, at every job's
    config load); it is verified when the model or tokenizer is loaded."""
    from dht import pretrained

    problems: list[str] = []
    m, tok = cfg.model, cfg.tokenizer
    usable: dict[str, bool] = {}
    refs = [("model.init", m.init)]
    if tok.kind == "pretrained":
        refs.append(("tokenizer.name_or_path", tok.name_or_path))
    for key, value in refs:
        if not pretrained.is_package_ref(value):
            continue
        try:
            pretrained.package_dir(value)
            usable[key] = True
        except pretrained.PretrainedPackageError as err:
            problems.append(f"{key} = {err}")
            usable[key] = False
    if not usable.get("model.init"):
        return problems
    entry = pretrained.lookup(m.init)
    own_tokenizer = (
        tok.kind == "pretrained"
        and pretrained.is_package_ref(tok.name_or_path)
        and (not usable["tokenizer.name_or_path"] or pretrained.lookup(tok.name_or_path) == entry)
    )  # an unusable tokenizer package is reported above already
    if not own_tokenizer:
        problems.append(
            f"tokenizer.name_or_path = {tok.name_or_path!r} (kind: {tok.kind}): model.init = {m.init!r} needs its "
            "own tokenizer, since token ids index its embeddings; set tokenizer.kind: pretrained and "
            f"tokenizer.name_or_path: {m.init}"
        )
    try:
        ckpt = pretrained.checkpoint_config(m.init)
    except pretrained.PretrainedPackageError as err:
        return [*problems, f"model.init = {err}"]
    for field in _CHECKPOINT_SIZES:
        if getattr(m, field) != ckpt.get(field):
            problems.append(
                f"model.{field} = {getattr(m, field)}: model.init = {m.init!r} has {ckpt.get(field)}; set "
                f"model.{field}: {ckpt.get(field)} (the checkpoint's architecture is what runs, and the arms and "
                "feature splits are checked against model:)"
            )
    limit = ckpt.get("max_position_embeddings")
    if isinstance(limit, int) and m.max_position_embeddings > limit:
        problems.append(
            f"model.max_position_embeddings = {m.max_position_embeddings}: model.init = {m.init!r} has {limit} "
            f"positions; allowed: at most {limit}"
        )
    return problems


def _check_reference(cfg: Config) -> list[str]:
    """run.reference: a fixed mode running all N_L layers with all heads (the 1.00x of the FLOP ratios and the
    baselines' teacher; in run.models when baselines are run); run.control, when set: a fixed mode."""
    problems: list[str] = []
    m, modes, ref = cfg.model, cfg.dht.modes, cfg.run.reference
    fixed = [n for n, mode in modes.items() if mode.search == "fixed"]
    full = f"{m.num_hidden_layers}L{m.num_attention_heads}H"
    if ref not in modes or modes[ref].search != "fixed":
        problems.append(
            f"run.reference = {ref!r}: must be a fixed mode of dht.modes (search: fixed, arms: [{full}]); "
            f"fixed modes: {', '.join(fixed) or 'none'}"
        )
    else:
        try:
            arm = parse_arm((modes[ref].arms or [""])[0])
        except ValueError:
            arm = None  # reported with the mode's own arms
        if arm is not None and arm.heads_per_layer() != [m.num_attention_heads] * m.num_hidden_layers:
            problems.append(
                f"run.reference = {ref!r}: its arm {arm} must run every layer with every head ({full}, "
                f"model.num_hidden_layers x model.num_attention_heads): it is the 1.00x of every FLOP ratio"
            )
    if cfg.run.baselines and ref not in cfg.run.models:
        problems.append(
            f"run.reference = {ref!r}: the baselines are built from the trained reference, so run.models must "
            f"include it (run.models: {', '.join(cfg.run.models)})"
        )
    control = cfg.run.control
    if control is not None and (control not in modes or modes[control].search != "fixed"):
        problems.append(
            f"run.control = {control!r}: must be a fixed mode of dht.modes (e.g. {cfg.dht.fixed_layers}L"
            f"{m.num_attention_heads}H), or null; fixed modes: {', '.join(fixed) or 'none'}"
        )
    return problems


def json_schema() -> dict[str, Any]:
    """JSON Schema of a resolved profile (workflow/schemas/config.schema.json, for editors and other tools)."""
    return Config.model_json_schema()
