"""The ``flexibert-<ratio>`` baseline: the architecture the dataset's FlexiBERT search (``flexibert_search`` stage,
:mod:`dht.flexibert.search_stage`) found most accurate on the validation split within ``ratio`` of the teacher's
FLOPs, retrained on the training split (docs/baselines-flexibert.md)."""

from __future__ import annotations

import json

import numpy as np

from dht.baselines import BaselineError, BaselineJob, BaselineRun
from dht.evaluation import SplitData
from dht.flexibert.search_stage import choose, predictions, retrain, search_train_flops


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
