"""The MLflow pyfunc model of a collection, logged as models-from-code: MLflow copies this file into
the model and runs it at load time, so nothing is pickled. Artifacts: the LoRA (safetensors),
collection.json, the model card and, for the embedded base, the base folder; `model_config` holds the
`base` and `sampling` params (override `base.device` at load time to serve on a GPU)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class CollectionEditModel(PythonModel):
    def load_context(self, context) -> None:
        from collectionlora.config import BaseConfig, SamplingConfig
        from collectionlora.edit import CollectionEditor

        config = context.model_config
        lora = Path(context.artifacts["lora"])
        base = context.artifacts.get("base")
        self.editor = CollectionEditor(
            Path(context.artifacts["collection"]).parent,
            BaseConfig.model_validate(config["base"]),
            SamplingConfig.model_validate(config["sampling"]),
            Path(base) if base else None,
            lora,
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from collectionlora.registry.serving import predict_frame

        return predict_frame(self.editor, model_input)


mlflow.models.set_model(CollectionEditModel())
