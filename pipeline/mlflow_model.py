"""The MLflow "model from code" of a trained compressor (logged by ``pipeline.tracking.log_compressor``).

MLflow runs this file to load the model: nothing is unpickled. The weights are the model's artifact
``compressor`` (``config.json`` + ``model.safetensors`` as written by ``MetaCompress.save_pretrained``).

``predict(model_input, params)``: ``model_input`` X (n, d) as a numpy array (or a list of such arrays);
``params``: ``{"rate": float in (0, 1)}`` or ``{"num_keep": int > 0}``, optionally ``{"layout": JSON of
Layout.to_dict()}`` (the logged signature defaults them to 0 / 0.0 / "", meaning "not given").
Returns the reduced tokens (m, d) as numpy (a list for a list input).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class CompressorModel(PythonModel):
    def load_context(self, context) -> None:
        from compress.metacompress import MetaCompress

        self.module = MetaCompress.from_pretrained(context.artifacts["compressor"]).eval()

    def predict(self, context, model_input, params=None):
        import json

        import numpy as np
        import torch

        from compress.layout import Layout
        from compress.reduction import num_keep

        params = params or {}
        single = not isinstance(model_input, list)
        xs = [torch.as_tensor(np.asarray(x)) for x in ([model_input] if single else model_input)]
        if int(params.get("num_keep") or 0) > 0:
            keeps = [int(params["num_keep"])] * len(xs)
        elif 0.0 < float(params.get("rate") or 0.0) < 1.0:
            keeps = [num_keep(x.shape[0], float(params["rate"])) for x in xs]
        else:
            raise ValueError("params must give 'rate' (a reduction rate in (0, 1)) or 'num_keep' (> 0)")
        layout = Layout.from_dict(json.loads(params["layout"])) if params.get("layout") else None
        with torch.no_grad():
            out = [r.tokens.numpy() for r in self.module(xs, keeps, [layout] * len(xs))]
        return out[0] if single else out


mlflow.models.set_model(CompressorModel())
