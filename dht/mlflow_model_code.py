"""The code of every pipeline model logged to MLflow (:mod:`dht.mlflow_model`): MLflow's "model from code" runs
this file when the model is loaded, in place of unpickling a model object."""

import mlflow.models

from dht.mlflow_model import TextClassifier

mlflow.models.set_model(TextClassifier())
