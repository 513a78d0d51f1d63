"""Differentiable NAS pruning of a trained BERT: the ``nas-prune-<r>`` baseline.

After "Neural Architecture Search on BERT for Network Compression" (the report), Sections 5.3-5.5, which builds on
DARTS (Liu et al. 2019; report Section 4.1) and TAS (Dong & Yang 2019; report Section 4.2). Starting from a
trained teacher :class:`dht.model.DHTForSequenceClassification` (our 12-VaBERT):

1. **Search space** (Section 5.4), on a supernet that runs the teacher's weights (:class:`Supernet`):

   * dimension masks ``m = sigmoid(alpha)``, ``alpha`` initialised at 5 (Section 5.5.1), on the input embedding
     dimension (5.4.1: one mask over the hidden size), on the query/key and on the value hidden size of every
     layer (5.4.2: h_q = h_k, so one mask shared by Q and K and one for V), and on the FFN intermediate size of
     every layer (5.4.3); the gradient arriving at alpha is rescaled (:class:`_RescaledSigmoid`);
   * DARTS-style softmax weights over the heads of every layer, equation (5), ``alpha ~ Normal(0, 0.01)``
     (Section 5.5.2), multiplied by N_H so that the supernet starts as the teacher.

2. **Search objective** (Section 5.3, equations (3)-(4) = TAS's (7)-(8)): ``L_arch = CE + lambda_cost * L_cost``,
   ``L_cost = log E_cost`` when the sampled architecture's cost ``F_cost > (1 + t) R``, ``0`` inside the band,
   ``-log E_cost`` when ``F_cost < (1 - t) R``; ``E_cost`` is the expected FLOPs under the masks, ``R = r x`` the
   teacher's FLOPs (:func:`tas_cost_loss`). Every step runs a 0/1 architecture sampled from the masks with a
   straight-through gradient (TAS's sampling, Section 4.2): the report's deterministic soft masks let a uniform
   down-scaling through the LayerNorms cost nothing in CE, so the masks shrink together, never reach 0/1, and the
   0.01 threshold keeps every dimension (see docs/baselines-nas.md).

3. **Search method** (Sections 4.1, 5.5): first-order DARTS, alternating an architecture step (``L_arch`` on one
   half of the training data, weights fixed) and a weight step (CE on the other half, architecture fixed).

4. **Extraction** (Section 5.5): units whose gate exceeds the threshold, 0.01 for the dimensions ("sigmoid(alpha)
   > 0.01") and the same threshold on the head weights (which keeps the top-n_l heads of each layer, "top-n
   alpha"); when that architecture misses the cost band, the threshold moves to the nearest value that enters it
   (:func:`fit_threshold`). The result is a physically smaller :class:`PrunedBert` whose weights are the kept
   rows/columns of the *teacher* (the report re-initialises the extracted architecture from the un-searched
   model, Section 5.2 step 3), fine-tuned by distillation from the teacher (:func:`finetune`; Section 4.2: "TAS
   performs knowledge distillation from the unpruned network to the searched architecture").

Residual stream: the embedding mask prunes the hidden size everywhere the residual stream carries it
(embedding output, both residual adds and LayerNorms of every layer, the pooler or classifier input), so the
extracted model has one reduced hidden width ``d_e``. In the supernet every LayerNorm takes its mean and
variance over the dimensions weighted by ``m_e`` and multiplies its output by ``m_e``; with 0/1 masks this is
exactly a LayerNorm over the kept dimensions, so the supernet with an architecture's 0/1 gates computes the
extracted model's logits (tested). The pooler keeps its output width d (it is not part of the residual stream)
and the classifier is copied whole.

The teacher's ``config.classifier_pooling`` is followed too. ``"cls"`` (BERT, the paper): the pooler (dense +
tanh) on [CLS], as above. ``"mean"``: the classifier reads the mean of the last stream over the non-padding
tokens (no pooler); the stream is zero outside the kept dimensions, so the extracted classifier takes the
teacher's classifier columns of the kept embedding dimensions (``weight[:, e]``) and runs on d_e inputs.

The teacher's ``config.layer_norm`` is followed. Post-LN (BERT, ``LayerNorm(x + f(x))``): the masked LayerNorm
after each residual add is what zeroes the pruned dimensions of the stream. Pre-LN (``x + f(LayerNorm(x))``, a
final LayerNorm before the pooler): the masked LayerNorms normalise the sub-layer inputs, and each branch output
(attention output projection, FFN down-projection) is multiplied by ``m_e`` before the add, so the stream stays
exactly zero outside the kept dimensions; the final LayerNorm is masked too. Either way the supernet with 0/1
gates computes the extracted model and with all-ones gates the teacher (tested for both).

Readings and adaptations are listed in ``docs/baselines-nas.md``.

The package, one module per step, in reading order (each imports only the ones above it):

- ``arch``: what a pruned BERT keeps (:class:`PrunedArch`);
- ``cost``: its FLOPs, and the cost loss of equation (4);
- ``masks``: the masks ``sigmoid(alpha)`` and head weights, and the masked operations;
- ``supernet``: the teacher's weights with the architecture variables (:class:`Supernet`);
- ``pruned``: the architecture the masks keep, and the smaller model that runs it, extracted from the teacher;
- ``darts``: the search, first-order DARTS (:func:`search`);
- ``distillation``: the extracted model's fine-tuning by distillation (:func:`finetune`), and its predictions.
"""

from __future__ import annotations

from dht.baselines import BaselineJob, BaselineRun, Loaded, LoadJob
from dht.baselines.nas_prune.arch import LayerArch, PrunedArch, teacher_fields
from dht.baselines.nas_prune.cost import Convention, pruned_flops, tas_cost_loss
from dht.baselines.nas_prune.darts import ALPHAS_FILE, SEARCH_FILE, SearchResult, search
from dht.baselines.nas_prune.distillation import finetune, predict_pruned
from dht.baselines.nas_prune.masks import rescaled_sigmoid, unit_gates
from dht.baselines.nas_prune.pruned import (
    ARCH_FILE,
    KEEP_THRESHOLD,
    WEIGHTS_FILE,
    PrunedBert,
    derive_arch,
    extract,
    fit_threshold,
)
from dht.baselines.nas_prune.supernet import Supernet

__all__ = [
    "ALPHAS_FILE",
    "ARCH_FILE",
    "KEEP_THRESHOLD",
    "SEARCH_FILE",
    "WEIGHTS_FILE",
    "Convention",
    "LayerArch",
    "PrunedArch",
    "PrunedBert",
    "SearchResult",
    "Supernet",
    "derive_arch",
    "extract",
    "finetune",
    "fit_threshold",
    "load",
    "predict_pruned",
    "pruned_flops",
    "rescaled_sigmoid",
    "run",
    "search",
    "tas_cost_loss",
    "teacher_fields",
    "unit_gates",
]


def run(ratio: float, job: BaselineJob) -> BaselineRun:
    """The ``nas-prune-<ratio>`` baseline (:func:`dht.baselines.run_baseline`): the search for ``ratio`` of the
    teacher's FLOPs, the extracted model fine-tuned, both written to ``job.out_model`` (the search in ``search/``);
    it predicts with the pruned model. Its training FLOPs are the search's and the fine-tuning's. Its curves, on one
    step axis: ``search_loss`` (the weight steps' CE, steps 1..S of the search), then ``train_loss`` (the
    fine-tuning, steps S+1...)."""
    c, batch = job.cfg.baselines.nas_prune, job.cfg.train.batch_size
    found = search(job.teacher, job.train, ratio, c.lambda_cost, c.tolerance, c.search_epochs, c.lr_weights,
                   c.lr_arch, batch, job.device, job.cfg.training_seed, job.seq_len)
    model = extract(job.teacher, found.arch)
    tuned = finetune(model, job.teacher, job.train, c.finetune_epochs, c.lr_weights, c.temperature, c.alpha_kd,
                     batch, job.device, job.cfg.training_seed, seq_len=job.seq_len)
    model.save(job.out_model)
    found.save(job.out_model / "search")
    return BaselineRun(lambda data: predict_pruned(model, data, job.device, job.cfg.train.eval_batch_size, job.seq_len),
                       found.train_flops + tuned["train_flops"], c.search_epochs + c.finetune_epochs,
                       tuned["loss_per_epoch"],
                       {"search_loss": list(enumerate(found.step_losses, start=1)),
                        "train_loss": [(len(found.step_losses) + step, loss) for step, loss in tuned["step_losses"]]})


def load(job: LoadJob) -> Loaded:
    """A ``nas-prune-<ratio>`` model directory read back (:func:`dht.baselines.saved.load_baseline`): the pruned
    model, its state dict read weights-only."""
    pruned = PrunedBert.load(job.directory, job.device)
    a = pruned.arch
    return Loaded(pruned, lambda data, batch_size, seq_len: predict_pruned(pruned, data, job.device, batch_size,
                                                                           seq_len),
                  a.vocab_size, a.max_position_embeddings, a.num_labels)
