"""Configuration: the sections of `params.yaml` as pydantic models; :class:`Config`, one resolved profile.

params.yaml is the one source of every value: no field here has a default, so a key params.yaml leaves out is an
error, and unknown keys are errors too (typos fail loudly). Its comments are the documentation of the keys; the
models say what each key takes. A dataset or mode entry lists what differs from its collection's defaults, which
params.yaml states too (`dataset_defaults.<source>`, `dht.mode_defaults`; :func:`with_entry_defaults`).
tests/test_config.py holds both to it. Reading params.yaml and choosing a profile is :mod:`dht.config_loading`
(:func:`~dht.config_loading.load_config`); the rules across fields (Section 6.1: ``(L - b)`` must be a multiple of
``c``; heads must divide the hidden size; ...) are :mod:`dht.config_checks`.

Which stage reads a key is said on the field (:class:`ReadBy`), and the params each stage tracks (Snakemake's
reruns, DVC's `params:`, the MLflow run's params) are derived from it (:func:`keys_read_by`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    create_model,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A problem in params.yaml, phrased for the person who edits it."""


# --- names --------------------------------------------------------------------------------------------------

# The one rule for every name params.yaml gives that becomes a folder, a file, an MLflow experiment, a
# Snakemake wildcard or a command argument: dataset keys, mode names, profile names and the tracking prefix
# (baselines keep their kinds' patterns, :meth:`BaselineValue.pattern`, as safe). No '/', '.', space or shell
# character: `../evil` or `/tmp/evil` would write outside the project, `x;touch PWNED` would run in a stage's
# shell, and a '.' splits the dotted params keys (`datasets.<name>`) the rules track.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
NAME_PATTERN = f"^{_NAME.pattern}$"
NAME_RULE = (
    f"a name is letters, digits, '_' and '-', starting with a letter or digit ({NAME_PATTERN}), since it becomes "
    "folder names, MLflow experiments and command arguments"
)
NOT_A_NAME = f"not a valid name; {NAME_RULE}; rename it"


def is_name(value: object) -> bool:
    """Whether `value` is a name (:data:`NAME_PATTERN`)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: str) -> str:
    """`value` when it is a name; a ValueError stating the rule otherwise (the caller names the key and value)."""
    if not is_name(value):
        raise ValueError(NOT_A_NAME)
    return value


def _check_prefix(value: str) -> str:
    """tracking.experiment_prefix: empty (the experiment is the dataset's name) or a name."""
    return check_name(value) if value else value


# A name in params.yaml (a key of `datasets:` or `dht.modes:`, or a value naming one); editors see the pattern.
Name = Annotated[str, AfterValidator(check_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- which stage reads a key ----------------------------------------------------------------------------------

TRAIN = "train"  # a training (workflow/scripts/train.py, dht.trainer, dht.policy)
ARM_FEATURES = "arm_features"  # the arm-feature pass (workflow/scripts/arm_features.py, dht.arm_features)
ARM_FEATURES_WARMUP = "arm_features warm-up"  # its warm-up steps, when dht.features.warmup_steps > 0


@dataclass(frozen=True)
class ReadBy:
    """Field metadata: the stages that read a key (:data:`TRAIN`, :data:`ARM_FEATURES`, ...). :func:`keys_read_by`
    turns it into the keys a stage tracks, so a key added to a section is tracked by the stages that say they read
    it, and by no other (``ReadBy()``: read by none of them, e.g. train.log_model, MLflow's only)."""

    stages: tuple[str, ...]

    def __init__(self, *stages: str) -> None:
        object.__setattr__(self, "stages", stages)


def keys_read_by(section: type[BaseModel], stage: str) -> tuple[str, ...]:
    """The fields of `section` whose :class:`ReadBy` names `stage`, in the section's order."""
    return tuple(name for name, field in section.model_fields.items()
                 if any(isinstance(m, ReadBy) and stage in m.stages for m in field.metadata))


# A baseline's name, <kind>-<value>: a kind of the registry (:data:`KINDS`, below with the sections' models) and its
# number, checked by :func:`parse_baseline`.
def _check_baseline(value: str) -> str:
    parse_baseline(value)
    return value


BaselineName = Annotated[str, AfterValidator(_check_baseline)]


# --- datasets -----------------------------------------------------------------------------------------------


class EmbeddedDatasetSpec(_Strict):
    """The project's own generated dataset (docs/embedded-data.md): offline, seeded, with a difficulty column."""

    source: Literal["embedded"]
    num_classes: Annotated[int, Field(ge=2, le=8)]
    n_train: Annotated[int, Field(ge=8)]
    n_test: Annotated[int, Field(ge=4)]
    difficulty_mix: tuple[float, float, float]
    max_length: Annotated[int, Field(ge=8)]
    alias_hops: Annotated[int, Field(ge=1, le=10)]  # lookups a hard sample takes (chained aliases when > 1)
    data_seed: int | None  # the generator's seed; None: the top-level data_seed

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
    name: str | None  # the hub dataset's config name, when it has several
    revision: str | None
    text_fields: list[str] = Field(min_length=1)
    label_field: str
    train_split: str
    test_split: str
    max_length: Annotated[int, Field(ge=8)]
    max_train_samples: Annotated[int, Field(ge=1)] | None
    max_test_samples: Annotated[int, Field(ge=1)] | None
    paper: str | None  # the paper's dataset it is (ag_news, dbpedia, yelp_polarity, yelp_full); None: its name


class CsvDatasetSpec(_Strict):
    """Local `train.csv`/`test.csv` in the original Zhang et al. (2015) format (no header, 1-based class)."""

    source: Literal["csv"]
    path: str
    fields: list[str] = Field(min_length=1)  # names of the text columns after the class column
    unescape_newlines: bool | None  # None: true when there is one text field (the Yelp layout)
    max_length: Annotated[int, Field(ge=8)]
    max_train_samples: Annotated[int, Field(ge=1)] | None
    max_test_samples: Annotated[int, Field(ge=1)] | None
    paper: str | None  # the paper's dataset it is (ag_news, dbpedia, yelp_polarity, yelp_full); None: its name

    def folder(self, params_dir: str | Path) -> Path:
        """The folder of train.csv and test.csv: `path`, relative to `params_dir`, the folder of the params file
        that names it, unless absolute. The one reading of `path` for validation, Snakemake's inputs and the
        download stage, wherever they are started from (`dht config validate --params other/params.yaml`)."""
        path = Path(self.path)
        return path if path.is_absolute() else Path(params_dir) / path


DatasetSpec = Annotated[
    EmbeddedDatasetSpec | HubDatasetSpec | CsvDatasetSpec, Field(discriminator="source")
]
DATASET_SPECS: dict[str, type[BaseModel]] = {"embedded": EmbeddedDatasetSpec, "hub": HubDatasetSpec, "csv": CsvDatasetSpec}


def entry_default_problems(spec: type[BaseModel], defaults: Mapping[str, Any], exclude: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a collection's defaults (`dataset_defaults.<source>`, `dht.mode_defaults`): a key that is
    not one of an entry's (or one an entry must state itself, `exclude`), or a value of the wrong type. Each value
    is checked here, not only where it lands, so a wrong default fails before any entry uses it."""
    from pydantic import TypeAdapter, ValidationError

    problems = []
    for key, value in defaults.items():
        field = spec.model_fields.get(key)
        if field is None or key in exclude:
            allowed = ", ".join(k for k in spec.model_fields if k not in exclude)
            problems.append(f"{key}: not a key an entry takes from its defaults; allowed: {allowed}")
            continue
        try:
            kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
            TypeAdapter(kind).validate_python(value)
        except ValidationError as err:
            problems.append(f"{key} = {value!r}: {err.errors()[0]['msg']}")
    return problems


class DatasetDefaults(_Strict):
    """params.yaml's `dataset_defaults:`: the keys a dataset of each source takes when its entry under `datasets:`
    leaves them out (:func:`with_entry_defaults`); an entry states its `source` and whatever else differs."""

    embedded: dict[str, Any]
    hub: dict[str, Any]
    csv: dict[str, Any]

    @model_validator(mode="after")
    def _keys_are_an_entrys(self) -> DatasetDefaults:
        problems = [f"{source}.{p}" for source, spec in DATASET_SPECS.items()
                    for p in entry_default_problems(spec, getattr(self, source), exclude=("source",))]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DataConfig(_Strict):
    """What the data stages do to every dataset: the validation split (docs/pipeline.md, "The validation split")."""

    # The share of each training split held out as the validation split (seeded by `seed`, stratified by label),
    # before max_train_samples draws the training subset; no model trains on it, and everything that chooses a
    # setting reads it. 0: no validation split. No default here: params.yaml holds the one default.
    val_fraction: Annotated[float, Field(ge=0, lt=1)]

    def val_rows(self, n: int) -> int:
        """Rows of a training split of `n` rows that the validation split takes: val_fraction of them, rounded up
        (so any fraction above 0 holds at least one row)."""
        return math.ceil(round(self.val_fraction * n, 6))  # round: 0.1 x 30 is 3, not 4 by a float's last bit


# --- the rest -----------------------------------------------------------------------------------------------


class RunConfig(_Strict):
    datasets: list[Name] = Field(min_length=1)
    models: list[Name] = Field(min_length=1)
    baselines: list[BaselineName]  # distil-<layers>, fastbert-<speed>, nas-prune-<ratio>, flexibert-<ratio>
    # The full-depth model (a fixed mode running every layer with every head): the 1.00x of every FLOP ratio,
    # the row the reports compare against and the teacher of the baselines (12-VaBERT in the paper).
    reference: Name
    # A shallow fixed mode (b layers): the depth analysis asks whether DHT gives more layers to the samples it
    # gets wrong. None: no control.
    control: Name | None
    # Training seeds: every model of run.models and run.baselines is trained once per seed (its batch order,
    # dropout, bandit exploration), and with more than one the reports show mean and standard deviation over them.
    # The data (subsets, validation split, embedded data), the arm features and the FlexiBERT search are drawn
    # once, with the top-level data_seed; docs/pipeline.md, "Several seeds".
    training_seeds: list[int] = Field(min_length=1)

    @field_validator("training_seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seed {', '.join(map(str, repeated))} listed twice: each seed is one run per model")
        negative = [s for s in seeds if s < 0]
        if negative:
            raise ValueError(f"seeds must be >= 0 (torch seeds); got {', '.join(map(str, negative))}")
        return seeds


class TokenizerConfig(_Strict):
    kind: Literal["wordpiece", "pretrained"]
    vocab_size: Annotated[int, Field(ge=32)]
    min_frequency: Annotated[int, Field(ge=1)]
    lowercase: bool
    name_or_path: str | None


class ModelSection(_Strict):
    """params.yaml's `model:` section: the encoder to build or load (not the model's own config class,
    :class:`dht.model.DHTConfig`, which this section is turned into)."""

    init: str
    hidden_size: Annotated[int, Field(ge=1)]
    num_hidden_layers: Annotated[int, Field(ge=1)]
    num_attention_heads: Annotated[int, Field(ge=1)]
    intermediate_size: Annotated[int, Field(ge=1)]
    hidden_dropout_prob: Annotated[float, Field(ge=0, lt=1)]
    attention_probs_dropout_prob: Annotated[float, Field(ge=0, lt=1)]
    max_position_embeddings: Annotated[int, Field(ge=1)]
    # Scratch models only (a BERT checkpoint is post-LN with its own weights); docs/model.md, "Training from scratch".
    layer_norm: Literal["post", "pre"]
    residual_init_scale: Annotated[float, Field(ge=0, le=1)]
    # What the classifier reads: cls (BERT's pooler on [CLS], the paper) | mean (mean of the token states, no
    # pooler: how sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained). docs/training.md.
    classifier_pooling: Literal["cls", "mean"]
    # Which classifier reads a sample stopped after L layers (docs/training.md, T29): shared (one pooler and
    # classifier for every depth: the reading so far; the paper does not say) | per_depth (one per exit depth b,
    # b + c, ..., N_L, each starting as a copy of the full-depth one; the same FLOPs per read).
    exit_heads: Literal["shared", "per_depth"]

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

    # sequential (not the paper's; docs/training.md T31): stop or continue decided at every group boundary
    search: Literal["tree", "integrated", "fixed", "sequential"]
    # Which arms the mode can choose: the arm_features stage computes their features, a training chooses among them.
    layers: Annotated[list[int] | None, ReadBy(ARM_FEATURES)]  # tree: UCB_L's options; sequential: where it may stop
    heads: Annotated[list[int] | None, ReadBy(ARM_FEATURES)]  # tree search: UCB_H's options
    arms: Annotated[list[str] | None, ReadBy(ARM_FEATURES)]  # integrated/fixed: UCB_cp's options, "6L8H", "4L8H+2L12H"
    warmup_mode: Name | None  # P-DHT: train as this mode first ...
    warmup_epochs: Annotated[int, Field(ge=0)]  # ... for this many epochs
    # What UCB_L learns from a training sample (docs/training.md, T24): `chosen`, the chosen depth's reward (the
    # paper); `all_depths`, every depth option's, from one no-grad pass read at each (tree search, one process).
    depth_feedback: Literal["chosen", "all_depths"]
    # Which exits a training sample's loss reads (docs/training.md, T26): `chosen`, the classifier after the chosen
    # depth only (the paper); `path`, also after every shallower depth option the sample's path passes (deep
    # supervision: the shallow exits train on every sample, at the cost of the classifier reads only).
    exit_loss: Literal["chosen", "path"]
    # How long UCB_L / UCB_cp remember (docs/training.md, T28): `run`, every reward since the start (Algorithm 1's
    # sums); `epoch`, its statistics restart at each epoch after the first, so the last epoch's router learns
    # only from the exits as they are then, not as they were before training moved them.
    depth_memory: Literal["run", "epoch"]
    # What the run starts from (docs/training.md, T30): `pretrained`, the initial model of the arm_features stage
    # (model.init: the checkpoint, or from scratch; the paper); `reference`, the trained run.reference of the same
    # dataset and seed (as the baselines start from it), whose training then counts in the run's total FLOPs.
    init: Literal["pretrained", "reference"]
    # With depth_feedback: all_depths, this mode's own value of the dht.bandits key of the same name (T25, T27;
    # null: dht.bandits'), so that one mode can be priced without changing what every other mode reads.
    all_depths_reward: Literal["ratio", "difference"] | None
    depth_price: Annotated[float, Field(ge=0)] | None
    depth_loss: Literal["cross_entropy", "error_probability"] | None
    # search: sequential only (docs/training.md T31). How the exits on a sample's path weigh in its loss: `depth`,
    # each in proportion to its depth (the deepest weighs most); `uniform`, each the same (T26's mean).
    exit_weights: Literal["uniform", "depth"]
    # The share of each shallower exit's loss that is self-distillation (KL from the deepest exit's probabilities,
    # read without gradient before the step, as FastBERT's students learn from its teacher); 0: none.
    distil_weight: Annotated[float, Field(ge=0, le=1)]
    # What continuing at a boundary is worth: `next`, err_d - err_next - price x (layers added) (the issue's
    # one-step gain); `best`, err_d - min over the deeper depths d' of (err_d' + price x (d' - d)).
    continue_reward: Literal["next", "best"]
    # This mode's own model.exit_heads (T29; null: model.exit_heads), so that one mode can train an exit head per
    # depth while the reference it starts from, and every other mode, keep theirs.
    exit_heads: Literal["shared", "per_depth"] | None
    # search: sequential only (T31, "A curve, not a point"). The prices per layer the trained mode is evaluated at
    # on the validation and the test split (its accuracy-FLOPs curve, metrics.json's `curve`; the bandits learned at
    # depth_price, their estimate moves with the price, dht.policy.Policy.stop_price), and its predictions are at
    # the one dht.curves.choose picks on the validation split: the fewest FLOPs within `chosen_within` accuracy of
    # the reference's. None: no curve, the predictions at depth_price.
    prices: list[Annotated[float, Field(ge=0)]] | None
    chosen_within: Annotated[float, Field(ge=0, le=1)]


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


class FeaturesConfig(_Strict):
    """Contexts and arm features. The paper's vector lengths imply its poolings (84 for UCB_L/UCB_cp, 42 for UCB_H,
    12 for TSB; docs/bandits.md), which params.yaml's default profile states. A training reads every key (its
    contexts, the refreshed features); the arm_features stage those marked."""

    # The poolings (Section 7.1) and their sizes (Section 7.3): the context x, then the bandit's vector; with the
    # paper's: ucb_l, ucb_cp 3 x 28 = 84 (w = [x ; z] -> 168); ucb_h 3 x 14 = 42 (w = [x ; z_H ; e_l] -> 87);
    # tsb 1 x 12 = 12 (w = [x ; 1] -> 13).
    ucb_l: Annotated[PoolingConfig, ReadBy(ARM_FEATURES)]
    ucb_cp: Annotated[PoolingConfig, ReadBy(ARM_FEATURES)]
    ucb_h: Annotated[PoolingConfig, ReadBy(ARM_FEATURES)]
    tsb: Annotated[PoolingConfig, ReadBy(ARM_FEATURES)]
    arm_feature_samples: Annotated[Annotated[int, Field(ge=1)] | None, ReadBy(ARM_FEATURES)]  # None: the whole split
    batch_size: Annotated[int, Field(ge=1), ReadBy(ARM_FEATURES)]
    # Plain full-depth training steps on a copy of the initial model before the arm-feature pass; training
    # still starts from the initial model (docs/paper-notes.md, row 10). 0: the initial model itself.
    warmup_steps: Annotated[int, Field(ge=0), ReadBy(ARM_FEATURES)]
    # epoch: recompute the arm features from the model being trained at the start of every epoch after the
    # first (docs/training.md, T14); none: the stage's single pass (the paper).
    refresh: Literal["none", "epoch"]
    # Add the shallow exit's uncertainty (1 - the top-class probability of the shared classifier read on S1) to
    # the UCB_L / UCB_cp context: not the paper's (its context is the pooled S1 alone); docs/training.md T23.
    exit_confidence: bool


class BanditConfig(_Strict):
    """Bandit and reward hyper-parameters (Sections 3.1, 3.2, 4.3; readings in docs/bandits.md, docs/training.md)."""

    ucb_alpha: Annotated[float, Field(ge=0)]  # LinUCB exploration bonus
    ucb_lambda: Annotated[float, Field(gt=0)]  # LinUCB ridge
    ts_alpha: Annotated[float, Field(ge=0)]  # TSB posterior scale
    ts_lambda: Annotated[float, Field(gt=0)]  # TSB prior precision
    reward_alpha: Annotated[float, Field(gt=0)]  # alpha of r_L
    reward_beta_h: Annotated[float, Field(gt=0)]  # beta_1 of r_H
    reward_beta_cp: Annotated[float, Field(gt=0)]  # beta_cp of r_cp
    # gamma of delta = loss * L**gamma (* H**gamma): 1 is the paper; lower values let deeper arms win on loss.
    cost_exponent: Annotated[float, Field(ge=0)]
    reward_clip: Annotated[float, Field(gt=0)] | None  # cap on ratio rewards (one tiny loss must not dominate)
    reward_baseline: Literal["global", "per_queue"]  # "the previous batch": any queue's, or the same L's
    ts_reward_sign: Literal["text", "printed"]  # ambiguity 1 of docs/paper-notes.md
    tsb_arm_features: bool  # TSB vector [x ; 1] (size 13) or [x ; z_h]
    # depth_feedback: all_depths (T24): how every depth option's reward is formed. ratio: Section 4.3's
    # alpha * mean / (loss * L**gamma); difference: alpha * -(loss + depth_price * L), both against the sample's own
    # mean over the options (docs/training.md, T25).
    all_depths_reward: Literal["ratio", "difference"]
    depth_price: Annotated[float, Field(ge=0)]  # difference: the loss one more layer must save to pay
    # depth_feedback: all_depths (T27): the loss each depth option is read with. cross_entropy: the training loss
    # (the paper's currency); error_probability: 1 - p(true class), bounded, so one confidently wrong exit cannot
    # outweigh the samples it gets right.
    depth_loss: Literal["cross_entropy", "error_probability"]


MODE_BANDIT_KEYS = ("all_depths_reward", "depth_price", "depth_loss")  # ModeSpec fields over dht.bandits'


def mode_bandits(bandits: BanditConfig, mode: ModeSpec) -> BanditConfig:
    """The bandit settings one mode trains with: dht.bandits, with the mode's own all-depths reward settings
    (:data:`MODE_BANDIT_KEYS`) where it sets them."""
    own = {k: getattr(mode, k) for k in MODE_BANDIT_KEYS if getattr(mode, k) is not None}
    return bandits.model_copy(update=own) if own else bandits


class DHTSection(_Strict):
    """params.yaml's `dht:` section: b, c, the contexts, the bandits and the modes (:class:`ModeSpec`)."""

    fixed_layers: Annotated[int, Field(ge=0)]
    group_size: Annotated[int, Field(ge=1)]
    features: FeaturesConfig
    bandits: BanditConfig
    inference: Literal["greedy", "sample"]  # how the bandits act at test time (no updates)
    count_s1_flops: bool  # count the no-grad S1 pass in training FLOPs (the paper does not say)
    p_dht_freeze: Literal["all_but_last_two", "last_two", "none"]  # Section 6.1 reading
    # States UCB_H and the TSB decide from in training: an eval-mode pass as at inference, or the dropout-noised
    # states of the gradient pass (docs/training.md, T2)
    decision_states: Literal["clean", "train"]
    # What a mode takes when its entry under `modes:` leaves a key out (every key but its `search`).
    mode_defaults: dict[str, Any]
    modes: dict[Name, ModeSpec]

    @field_validator("mode_defaults")
    @classmethod
    def _keys_are_a_modes(cls, defaults: dict[str, Any]) -> dict[str, Any]:
        problems = entry_default_problems(ModeSpec, defaults, exclude=("search",))
        if problems:
            raise ValueError("; ".join(problems))
        return defaults


class DistributedConfig(_Strict):
    """One model trained by several processes (torchrun + DistributedDataParallel, docs/distributed.md): each
    rank trains `train.batch_size` samples a step, so a step trains nproc_per_node x batch_size samples and an
    epoch takes 1/nproc_per_node of one process's steps; `batch: split` keeps one process's schedule instead."""

    nproc_per_node: Annotated[int, Field(ge=1)]  # processes (GPUs) of one node; 1: no torchrun, no DDP
    backend: Literal["nccl", "gloo"]  # nccl: CUDA GPUs; gloo: CPU (the tests)
    # rank: each rank's own per-L queues of q (the ranks of a step may run different depths, and a step lasts as
    # long as its deepest batch); global: one set of queues of N x q on every rank, each released batch split over
    # the ranks, so a step runs one depth everywhere (docs/distributed.md, T22)
    queues: Literal["rank", "global"]
    # per_rank: each rank trains batch_size a step (a step of N x batch_size, N times fewer steps an epoch); split:
    # each rank batch_size / N, so a step trains batch_size and an epoch has one process's steps (docs/distributed.md)
    batch: Literal["per_rank", "split"]


class TrainConfig(_Strict):
    """How a model is trained. Every training reads the keys marked :data:`TRAIN` (dht.trainer.Trainer: the
    schedule, the optimiser, the queue size q, the evaluation batches, the resumable checkpoints); the arm_features
    stage's warm-up (dht.arm_features.warm_up) those marked :data:`ARM_FEATURES_WARMUP`. `distributed`:
    :func:`run_param_keys`."""

    epochs: Annotated[int, Field(ge=1), ReadBy(TRAIN)]
    learning_rate: Annotated[float, Field(gt=0), ReadBy(TRAIN, ARM_FEATURES_WARMUP)]
    weight_decay: Annotated[float, Field(ge=0), ReadBy(TRAIN, ARM_FEATURES_WARMUP)]
    warmup_ratio: Annotated[float, Field(ge=0, le=1), ReadBy(TRAIN, ARM_FEATURES_WARMUP)]
    # also the queue size q of Algorithm 3
    batch_size: Annotated[int, Field(ge=1), ReadBy(TRAIN, ARM_FEATURES_WARMUP)]
    eval_batch_size: Annotated[int, Field(ge=1), ReadBy(TRAIN)]
    grad_clip: Annotated[Annotated[float, Field(gt=0)] | None, ReadBy(TRAIN, ARM_FEATURES_WARMUP)]
    checkpoint_every: Annotated[int, Field(ge=1), ReadBy(TRAIN)]  # optimizer steps between resumable checkpoints
    # log the model directory as an MLflow pyfunc model (dht.tracking.log_model): what the MLflow run keeps only
    log_model: Annotated[bool, ReadBy()]
    distributed: DistributedConfig

    @property
    def queue_size(self) -> int:
        """q of Algorithm 3: a depth's queue releases a training batch when q samples wait in it. The paper trains
        every batch from one queue, so q is the training batch size: one key, read by this name where it is q.
        Per process: with ``distributed.batch: split`` each of the N ranks queues and trains batch_size / N."""
        if self.distributed.nproc_per_node > 1 and self.distributed.batch == "split":  # one process: no split to read
            return self.batch_size // self.distributed.nproc_per_node
        return self.batch_size


# --- baselines: the registry of kinds -------------------------------------------------------------------------
# One entry per kind of baseline (docs/baselines.md, "Adding a baseline"). Everything else follows from it: the
# names run.baselines accepts (parse_baseline, the baseline rule's wildcard), their ranges
# (dht.config_checks), the `baselines:` section (BaselinesConfig), a job's code and tracked keys
# (workflow/rules/baselines.smk), and which module builds and loads it (dht.baselines).


@dataclass(frozen=True)
class BaselineValue:
    """The number in a baseline's name, ``<kind>-<value>``: what it is (the name's placeholder in messages,
    ``distil-<layers>``), an example, whether it is a whole number, and the values it may take: ``[low, high]``, or
    ``(low, high]`` with `low_open`; `high` is a number or the dotted params.yaml key whose value bounds it (a
    student has at most ``model.num_hidden_layers`` layers)."""

    placeholder: str
    example: str
    integer: bool
    low: float
    high: float | str
    low_open: bool = False

    @property
    def pattern(self) -> str:
        """[0-9], not \\d (which takes any script's digits), and at most one '.', so that a name is letters, digits,
        '-' and one '.': safe as a folder name and a command argument (see NAME_PATTERN)."""
        return "[0-9]+" if self.integer else r"[0-9]*\.?[0-9]+"

    def problem(self, value: float, cfg: Config) -> str | None:
        """What is wrong with `value` under `cfg`, or None when it is in range."""
        high = float(cfg.section(self.high)) if isinstance(self.high, str) else self.high
        if (self.low < value if self.low_open else self.low <= value) and value <= high:
            return None
        bound = f" ({self.high} = {high:g})" if isinstance(self.high, str) else ""
        return f"{self.placeholder} in {'(' if self.low_open else '['}{self.low:g}, {high:g}]{bound}"


# A kind is lower-case words joined by '-' (its value, digits and at most one '.', has none, so a name splits at its
# last '-'); a section is a params.yaml key.
_KIND = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_SECTION = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Baseline:
    """One kind of baseline: its name's number (:class:`BaselineValue`), its ``baselines:`` section in params.yaml
    and the model of that section (`config`), the module whose ``run(value, job)`` builds it and ``load(job)``
    reads it back (:mod:`dht.baselines`, :mod:`dht.baselines.saved`), what it is in words (`title`; dht predict
    says it of a baseline's model directory, with `inference`, what every text runs, ``{value:g}`` filled in),
    whether its weights start from the trained reference (its training budget then includes the reference's,
    :func:`dht.results.training_budget`), the params.yaml keys of its own that a job of the kind reads (``reads``;
    default: its whole section), and whether its model directory runs on the teacher's (FastBERT's students on its
    backbone)."""

    kind: str
    value: BaselineValue
    section: str
    config: type[BaseModel]
    module: str
    title: str
    inference: str
    starts_from_reference: bool
    reads: tuple[str, ...] = ()
    runs_on_teacher: bool = False

    def __post_init__(self) -> None:
        if not _KIND.fullmatch(self.kind):
            raise ValueError(f"baseline kind {self.kind!r}: lower-case words joined by '-' ({_KIND.pattern})")
        if not _SECTION.fullmatch(self.section):
            raise ValueError(f"baseline {self.kind!r}: section {self.section!r} is not a params.yaml key "
                             f"({_SECTION.pattern})")

    @property
    def pattern(self) -> str:
        """The names of this kind, as a regular expression (no groups)."""
        return f"{self.kind}-{self.value.pattern}"

    @property
    def params(self) -> list[str]:
        """The params.yaml keys a job of this kind reads (workflow/scripts/baseline.py, dht.baselines, the kind's
        module): the device; train.epochs (the reference's training FLOPs, the 1.00x of its training
        FLOP ratio), train.batch_size and train.eval_batch_size (its training and test batches); and its own
        keys. Not the `model:` section (the kind reads the trained reference, an input), nor train.log_model
        (MLflow only). Its training seed is not a key (the job's --training-seed, one of run.training_seeds, in its
        MLflow params as training_seed). Snakemake reruns a job when their values change and DVC tracks them;
        tests/test_pipeline.py checks them against what a job really reads."""
        return ["device", "train.epochs", "train.batch_size", "train.eval_batch_size",
                *(self.reads or (f"baselines.{self.section}",))]


def registry(*kinds: Baseline) -> dict[str, Baseline]:
    """:data:`KINDS` from its entries, each kind once; kinds may share a section only with its model."""
    out: dict[str, Baseline] = {}
    models: dict[str, type[BaseModel]] = {}
    for b in kinds:
        if b.kind in out:
            raise ValueError(f"baseline kind {b.kind!r} registered twice")
        if models.setdefault(b.section, b.config) is not b.config:
            raise ValueError(f"baseline {b.kind!r}: section {b.section!r} has another kind's model, "
                             f"{models[b.section].__name__}")
        out[b.kind] = b
    return out


def baseline_pattern() -> str:
    """Every baseline name of the registry, as one regular expression (the baseline rule's wildcard constraint)."""
    return "|".join(b.pattern for b in KINDS.values())


def parse_baseline(name: str) -> tuple[str, float]:
    """(kind, value) of a baseline's name, ``<kind>-<value>`` (``("distil", 3.0)``, ``("nas-prune", 0.5)``); a
    ValueError naming every kind's form otherwise."""
    kind, _, value = name.rpartition("-")
    if kind in KINDS and re.fullmatch(KINDS[kind].pattern, name):
        return kind, float(value)
    forms = [f"{b.kind}-<{b.value.placeholder}> (e.g. {b.kind}-{b.value.example})" for b in KINDS.values()]
    raise ValueError(f"{name!r} is not a baseline: write {', '.join(forms[:-1])} or {forms[-1]}")


def baselines_model(kinds: dict[str, Baseline]) -> type[BaseModel]:
    """The model of params.yaml's `baselines:` section: each kind's section with its model, required (params.yaml
    states every key: docs/pipeline.md, Validation)."""
    fields: dict[str, Any] = {b.section: (b.config, ...) for b in kinds.values()}
    return create_model("BaselinesConfig", __base__=_Strict, **fields)


# The models of the kinds' `baselines:` sections (a new kind's after the last), then the registry itself.


class DistilConfig(_Strict):
    """DistilBERT (Sanh et al. 2019) students of the trained 12-VaBERT (BL2)."""

    epochs: Annotated[int, Field(ge=1)]
    learning_rate: Annotated[float, Field(gt=0)]
    temperature: Annotated[float, Field(gt=0)]
    alpha_kd: Annotated[float, Field(ge=0)]
    alpha_ce: Annotated[float, Field(ge=0)]
    alpha_cos: Annotated[float, Field(ge=0)]


class FastBERTConfig(_Strict):
    """FastBERT (Liu et al. 2020) self-distillation of student classifiers on the trained 12-VaBERT (BL3)."""

    epochs: Annotated[int, Field(ge=1)]
    learning_rate: Annotated[float, Field(gt=0)]
    classifier_size: Annotated[int, Field(ge=2)] | None  # None: hidden x 128/768 (FastBERT's proportion)
    # Its accuracy-FLOPs curve (dht.curves, issue 28): the speeds the distilled model is also evaluated at on the
    # validation and the test split (metrics.json's `curve`; the students do not depend on the speed), and the one
    # chosen on the validation split with the sequential mode's rule (`chosen_within` of the reference's accuracy,
    # the fewest FLOPs), reported beside the fixed speed of the baseline's name. None: no curve.
    speeds: list[Annotated[float, Field(ge=0, le=1)]] | None
    chosen_within: Annotated[float, Field(ge=0, le=1)]


class NASPruneConfig(_Strict):
    """Differentiable NAS pruning of the trained 12-VaBERT (the NAS-on-BERT report, Sections 5.3-5.5)."""

    search_epochs: Annotated[int, Field(ge=1)]
    finetune_epochs: Annotated[int, Field(ge=1)]
    lambda_cost: Annotated[float, Field(ge=0)]
    tolerance: Annotated[float, Field(ge=0, lt=1)]
    lr_weights: Annotated[float, Field(gt=0)]
    lr_arch: Annotated[float, Field(gt=0)]
    temperature: Annotated[float, Field(gt=0)]
    alpha_kd: Annotated[float, Field(ge=0, le=1)]


FlexiOp = Literal["sdp", "wma", "dft", "dct", "conv5", "conv9", "conv13"]  # dht.baselines.flexibert.space.OPS (tested)


class FlexiBERTConfig(_Strict):
    """FlexiBERT (Tuli et al. 2022): heterogeneous encoders searched by BOSHNAS, one search per dataset, then the
    best architecture within each `flexibert-<ratio>` FLOP budget retrained (docs/baselines-flexibert.md)."""

    # The design space (params.yaml: after the paper's "Tiny" space, with every operation type).
    hidden: list[Annotated[int, Field(ge=1)]]
    layers: list[Annotated[int, Field(ge=1)]]
    heads: list[Annotated[int, Field(ge=1)]]
    ffn_widths: list[Annotated[int, Field(ge=1)]]
    ffn_depths: list[Annotated[int, Field(ge=1)]]
    ops: list[FlexiOp]
    # BOSHNAS
    candidates: Annotated[int, Field(ge=1)]  # sampled when the space is larger (then filtered by budget)
    evaluations: Annotated[int, Field(ge=1)]  # architectures trained by the search, over all budgets
    n_init: Annotated[int, Field(ge=1)]  # random queries per budget before the surrogate steers
    kappa: Annotated[float, Field(ge=0)]  # UCB weight of the surrogate's standard deviation
    search_epochs: Annotated[int, Field(ge=1)]  # brief training of each queried architecture ...
    search_max_steps: Annotated[int, Field(ge=1)] | None  # ... capped at this many steps
    # The chosen architecture, retrained on the training split (the search scores its queries on the validation
    # split of data.val_fraction, which no model trains on)
    epochs: Annotated[int, Field(ge=1)]
    learning_rate: Annotated[float, Field(gt=0)]


# The flexibert-<ratio> baseline retrains the architecture its dataset's search chose
# (dht.baselines.flexibert.search_stage.retrain): for baselines.flexibert.epochs, with the search's learning rate,
# batches and dropout (_train_kwargs). Everything else of baselines.flexibert is the search's
# (dht.baselines.FLEXIBERT_SEARCH_PARAMS), an input of the baseline.
FLEXIBERT_RETRAINING = ("epochs", "learning_rate")
_FLOP_RATIO = BaselineValue("FLOP ratio", "0.5", integer=False, low=0, high=1, low_open=True)
KINDS: dict[str, Baseline] = registry(
    # A student of the reference's layers; FastBERT's students on the reference's backbone; a supernet of it.
    Baseline("distil", BaselineValue("layers", "3", integer=True, low=1, high="model.num_hidden_layers"),
             "distil", DistilConfig, "dht.baselines.distil", "a DistilBERT student of the reference",
             "every text runs its {value:g} layers", starts_from_reference=True),
    Baseline("fastbert", BaselineValue("speed", "0.5", integer=False, low=0, high=1),
             "fastbert", FastBERTConfig, "dht.baselines.fastbert", "FastBERT: the reference with early-exit students",
             "a text leaves at the first layer whose student is surer than speed {value:g}",
             starts_from_reference=True, runs_on_teacher=True),
    Baseline("nas-prune", _FLOP_RATIO, "nas_prune", NASPruneConfig, "dht.baselines.nas_prune",
             "the reference pruned by differentiable NAS", "every text runs the same pruned architecture",
             starts_from_reference=True),
    # Searched and retrained from scratch (the reference only sets the FLOP budget); its search is its own cost.
    Baseline("flexibert", _FLOP_RATIO, "flexibert", FlexiBERTConfig, "dht.baselines.flexibert",
             "the best FlexiBERT architecture within a FLOP budget", "every text runs the same searched architecture",
             starts_from_reference=False,
             reads=(*(f"baselines.flexibert.{k}" for k in FLEXIBERT_RETRAINING), "model.hidden_dropout_prob")),
)
BaselinesConfig = baselines_model(KINDS)


class TrackingConfig(_Strict):
    # MLflow experiment of a dataset: "<prefix><dataset>" (its artifacts' folder too): empty, or a name.
    experiment_prefix: Annotated[
        str, AfterValidator(_check_prefix)
    ]


def with_entry_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """A profile with every dataset entry completed from `dataset_defaults.<its source>` and every mode from
    `dht.mode_defaults`: an entry's own keys win (YAML-level, before validation; anything malformed is left for
    validation to name)."""
    out = dict(data)
    defaults = data.get("dataset_defaults")
    datasets = data.get("datasets")
    if isinstance(defaults, Mapping) and isinstance(datasets, Mapping):
        out["datasets"] = {
            name: {**defaults.get(spec.get("source"), {}), **spec}
            if isinstance(spec, Mapping) and isinstance(defaults.get(spec.get("source")), Mapping) else spec
            for name, spec in datasets.items()}
    dht = data.get("dht")
    if isinstance(dht, Mapping) and isinstance(dht.get("mode_defaults"), Mapping) and isinstance(dht.get("modes"), Mapping):
        out["dht"] = {**dht, "modes": {name: {**dht["mode_defaults"], **mode} if isinstance(mode, Mapping) else mode
                                       for name, mode in dht["modes"].items()}}
    return out


class Config(_Strict):
    """The resolved configuration of one profile.

    The training seed of a run is not a key: a profile lists its training seeds (run.training_seeds) and a training
    runs one of them, :meth:`for_training_seed`, read back as :attr:`training_seed`. `data_seed` draws the data."""

    profile: Name
    # Draws what every training of a dataset shares: the validation split, the training and test subsets, the
    # embedded data, the arm features and the FlexiBERT search (not the trainings: run.training_seeds).
    data_seed: int
    device: str
    dataset_defaults: DatasetDefaults
    datasets: dict[Name, DatasetSpec]
    data: DataConfig
    run: RunConfig
    tokenizer: TokenizerConfig
    model: ModelSection
    dht: DHTSection
    train: TrainConfig
    baselines: BaselinesConfig
    tracking: TrackingConfig
    _training_seed: int | None = PrivateAttr(default=None)  # the run's, set by for_training_seed

    @model_validator(mode="before")
    @classmethod
    def _complete_entries(cls, data: Any) -> Any:
        return with_entry_defaults(data) if isinstance(data, Mapping) else data

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
        """The seeds each model is trained with (run.training_seeds)."""
        return list(self.run.training_seeds)

    def for_training_seed(self, seed: int) -> Config:
        """This profile as one training run of it sees it: :attr:`training_seed` is `seed`, one of
        run.training_seeds (a ValueError naming them otherwise)."""
        if seed not in self.run.training_seeds:
            raise ValueError(f"{seed} is not a training seed of profile '{self.profile}' (run.training_seeds: "
                             f"{self.run.training_seeds}); add it to run.training_seeds in params.yaml")
        run = self.model_copy()
        run._training_seed = seed
        return run

    @property
    def training_seed(self) -> int:
        """The seed of this training run (batch order, dropout, bandit exploration, a new classifier's weights):
        the one :meth:`for_training_seed` chose, else the profile's only training seed. With several and none
        chosen, a ValueError: a training must say which of them it is."""
        if self._training_seed is not None:
            return self._training_seed
        if len(self.run.training_seeds) == 1:
            return self.run.training_seeds[0]
        raise ValueError(f"profile '{self.profile}' trains seeds {self.run.training_seeds}: choose the run's with "
                         "Config.for_training_seed (a stage's --training-seed)")

    def section(self, dotted: str) -> Any:
        """A resolved sub-tree by dotted key (`datasets.embedded-news`), as plain data."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node


def with_warmup_modes(cfg: Config, modes: list[str]) -> list[str]:
    """`modes` followed by the warm-up modes they name (P-DHT's F-DHT), each once: the modes whose settings a
    training of them reads."""
    out = list(dict.fromkeys(modes))
    for name in list(out):
        warmup = cfg.dht.modes[name].warmup_mode
        if warmup and warmup not in out:
            out.append(warmup)
    return out


# The keys of a section a stage reads, from the fields' ReadBy (a key added to a section is tracked by the stages
# that say they read it): train.* every training reads (not train.log_model, MLflow's only), train.* of the
# arm_features stage's warm-up, dht.features.* of the arm_features stage (its poolings, samples, batches and warm-up;
# a training reads every key of dht.features), and a mode's keys that say which arms it can choose
# (dht.arm_features.arm_space).
TRAINING_KEYS = keys_read_by(TrainConfig, TRAIN)
WARMUP_TRAINING_KEYS = keys_read_by(TrainConfig, ARM_FEATURES_WARMUP)
ARM_FEATURE_KEYS = keys_read_by(FeaturesConfig, ARM_FEATURES)
MODE_ARM_KEYS = keys_read_by(ModeSpec, ARM_FEATURES)


def training_seed_keys(cfg: Config) -> list[str]:
    """The key that holds a training run's seed where nothing else does: with one training seed the run's paths
    and its DVC stage have no seed level, so run.training_seeds is tracked and a changed seed reruns the run
    (Snakemake and DVC alike); with several, each seed is its own job, path and DVC stage (its command names it),
    and adding a seed must not rerun the others: none."""
    return ["run.training_seeds"] if len(cfg.run.training_seeds) == 1 else []


def run_param_keys(cfg: Config, mode_name: str) -> list[str]:
    """The params.yaml keys a training run of `mode_name` reads (workflow/scripts/train.py, dht.trainer,
    dht.policy): its own mode and its warm-up mode, the device, dht.fixed_layers and the train keys of
    :data:`TRAINING_KEYS`; its training seed (:attr:`Config.training_seed`: the run's command line names it, one
    of run.training_seeds; :func:`training_seed_keys`, and :func:`dht.trainer.run_params` records it). A mode with a bandit (tree or integrated search, itself or its warm-up mode) also reads the
    bandits, their contexts (dht.features), how they act at test time (dht.inference), the FLOP count of the S1
    pass and the states they decide from; a fixed mode (the reference, the control: one arm) reads none of them.
    P-DHT reads how it freezes after the warm-up. The distributed settings beyond the process count are read under
    torchrun only.

    With ``init: reference`` (docs/training.md T30) also which mode the reference is; ``model.exit_heads`` (T29)
    sets the heads of the model it starts from.

    Not read here, so not tracked: the rest of the `model:` section and dht.group_size (the model is the
    arm_features stage's init_model, an input), train.log_model (MLflow only), tracking (MLflow only), run.* (which jobs exist, not what
    one computes). The one list behind the train rule's tracked params (Snakemake reruns, DVC's `params:`), the
    MLflow run's params and the checkpoint's :func:`fingerprint`; tests/test_pipeline.py checks it against what a
    training really reads."""
    modes = with_warmup_modes(cfg, [mode_name])
    keys = [*training_seed_keys(cfg), "device", "model.exit_heads", "dht.fixed_layers",
            *(f"train.{k}" for k in TRAINING_KEYS),
            "train.distributed.nproc_per_node"]
    if cfg.train.distributed.nproc_per_node > 1:
        keys += ["train.distributed.backend", "train.distributed.queues", "train.distributed.batch"]
    if any(cfg.dht.modes[m].search != "fixed" for m in modes):
        # dht.features whole: besides the contexts' poolings, refresh and exit_confidence, its keys are the
        # arm_features stage's, whose output every training reads, so tracking them costs no extra rerun.
        keys += ["dht.features", "dht.bandits", "dht.inference", "dht.count_s1_flops", "dht.decision_states"]
    if cfg.dht.modes[mode_name].warmup_mode:
        keys.append("dht.p_dht_freeze")
    if cfg.dht.modes[mode_name].init == "reference":  # T30: it starts from the trained reference, whichever mode
        keys += ["run.reference", f"dht.modes.{cfg.run.reference}"]
    return keys + [f"dht.modes.{m}" for m in modes]


def arm_feature_keys(cfg: Config) -> list[str]:
    """The params.yaml keys the arm_features stage reads (workflow/scripts/arm_features.py, dht.arm_features,
    dht.model.model_from_params): the data seed and the device, the `model:` section it builds the initial model from, b and
    c, the pass's poolings and samples (:data:`ARM_FEATURE_KEYS`), which modes the run trains (run.models) and the
    arms of each and of their warm-up modes (:func:`dht.arm_features.arm_space`); with dht.features.warmup_steps,
    the train keys of its warm-up. No bandit, inference or other mode setting: those are the trainings'. The one
    list behind the arm_features rule's tracked params and the stage's MLflow params."""
    keys = ["data_seed", "device", "model", "dht.fixed_layers", "dht.group_size",
            *(f"dht.features.{k}" for k in ARM_FEATURE_KEYS), "run.models",
            *(f"dht.modes.{m}.warmup_mode" for m in cfg.run.models)]
    if cfg.dht.features.warmup_steps:
        keys += [f"train.{k}" for k in WARMUP_TRAINING_KEYS]
    return keys + [f"dht.modes.{m}.{k}" for m in with_warmup_modes(cfg, cfg.run.models) for k in MODE_ARM_KEYS]

