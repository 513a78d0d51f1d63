"""Trained models as MLflow models: ``mlflow.pyfunc.load_model(uri).predict(texts)`` and ``mlflow models serve``.

Every stage that trains a model (a DHT mode, a fixed model, a baseline) logs its model directory to its MLflow run
as a ``pyfunc`` model named ``model`` when ``train.log_model`` is on (:func:`dht.tracking.log_model`). Nothing in
it is a pickle: it is one of MLflow's "models from code", whose code is the file ``dht/mlflow_model_code.py``
(copied into the MLflow model, read as source and run at load time: it names :class:`TextClassifier` of this
module), and whose artifacts are the model directory as the stage wrote it (and, for a FastBERT baseline, its
teacher's: the reference its students run on). At load, :class:`TextClassifier` reads them with the project's
checked loaders (:func:`load_classifier`: :func:`dht.trainer.load_trained`, :func:`dht.baselines.saved
.load_baseline`): every file against the directory's checksums first, weights as safetensors, bandits and state
dicts weights-only. The project (the ``dht`` package, torch, transformers) must be installed where the model is
loaded or served: ``mlflow models serve --env-manager local`` in the project's environment. This module reads
what the stages wrote and is none of their code (``dht_workflow.stage_code``): changing it retrains nothing.

``predict`` takes texts (a list of strings; the signature comes from :meth:`TextClassifier.predict`'s type hint)
and answers a DataFrame, one row per text: ``label`` (the class's name), ``probability`` (of that label),
``probabilities`` (one per class, in the order of the model's classes), ``layers`` (the layers the text ran) and
``heads`` (heads per layer it ran), as ``dht predict`` does; a text longer than the model's ``max_length`` tokens
is cut to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc

PREDICT_BATCH = 64


@dataclass
class Classifier:
    """A trained model directory loaded to classify texts: its predict function (``(data, batch size, length) ->
    Predictions``, the pipeline's), tokenizer, classes and length."""

    run: Callable[[Any, int, int], Any]
    tokenizer: Any
    classes: list[str]
    max_length: int

    def predict(self, texts: Sequence[str], batch_size: int = PREDICT_BATCH) -> list[dict[str, Any]]:
        """One row per text: label, probability, probabilities (per class), layers, heads (per layer run)."""
        import torch

        from dht.evaluation import SplitData

        if not texts:
            return []
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")
        data = SplitData(enc["input_ids"], enc["attention_mask"], torch.zeros(len(texts), dtype=torch.long))
        pred = self.run(data, batch_size, self.max_length)
        rows = []
        for i in range(len(texts)):
            layers = int(pred.layers[i])
            probs = [round(float(p), 6) for p in pred.probs[i]]
            label = int(pred.labels[i])
            rows.append({"label": self.classes[label], "probability": probs[label], "probabilities": probs,
                         "layers": layers, "heads": [int(h) for h in pred.heads[i, :layers]]})
        return rows


def load_classifier(model_dir: str | Path, device: Any = None, teacher_dir: str | Path | None = None) -> Classifier:
    """The model directory of a trained DHT model or a baseline, read by the project's checked loaders (checksums
    first; a directory without them is refused). A DHT model's bandits act as it was evaluated (its saved
    ``dht.inference``); a FastBERT baseline's students run on the teacher in ``teacher_dir`` (default: where its
    baseline.json says). Raises FileNotFoundError for a directory that is neither, IntegrityError for a damaged
    one."""
    from transformers import AutoTokenizer

    from dht.baselines import BASELINE_FILE
    from dht.baselines.saved import load_baseline
    from dht.config import Config
    from dht.policy import predict
    from dht.results import POLICY_FILE
    from dht.runtime import resolve_device
    from dht.trainer import load_trained

    model_dir = Path(model_dir)
    device = resolve_device("auto") if device is None else device
    if (model_dir / POLICY_FILE).is_file():
        model, policy, info = load_trained(model_dir, device)  # checksums first
        greedy = Config.model_validate(info["config"]).dht.inference == "greedy"

        def run(data: Any, batch_size: int, max_length: int) -> Any:
            return predict(model, policy, data, device, batch_size, max_length, greedy=greedy)
    elif (model_dir / BASELINE_FILE).is_file():
        saved = load_baseline(model_dir, device, teacher_dir=teacher_dir)  # checksums first
        run, info = saved.predict, saved.info
    else:
        raise FileNotFoundError(f"{model_dir}: not a model directory of the pipeline (no {POLICY_FILE} of a trained "
                                f"DHT model, no {BASELINE_FILE} of a baseline)")
    # local_files_only: a model directory never sends transformers to the hub; its files were checked above
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    max_length = int(info.get("max_length", tokenizer.model_max_length))
    classes = info.get("classes") or [str(i) for i in range(int(info.get("num_labels", 0)))]
    return Classifier(run, tokenizer, [str(c) for c in classes], max_length)


def _texts(model_input: Any) -> list[str]:
    """The texts of a pyfunc input: a list of strings, a DataFrame with a ``text`` column (or a single column), or
    a dict ``{"text": [...]}``."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column]]
    if isinstance(model_input, dict):
        return [str(t) for t in model_input["text"]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class TextClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc model: its artifacts are the model directory (``model``) and, for a FastBERT baseline, its
    teacher (``teacher``); ``predict(texts)`` answers a DataFrame, one row per text (the module's docstring)."""

    def load_context(self, context):  # noqa: ANN001, ANN201 (MLflow reads type hints here as a signature)
        self.classifier = load_classifier(context.artifacts["model"], teacher_dir=context.artifacts.get("teacher"))

    # `list[str]`: MLflow takes the input schema from this hint (texts in) and hands predict a list of strings.
    def predict(self, context, model_input: list[str], params=None):  # noqa: ANN001, ANN201 (as load_context)
        import pandas as pd

        rows = self.classifier.predict(_texts(model_input))
        return pd.DataFrame(rows, columns=["label", "probability", "probabilities", "layers", "heads"])
