"""The port's online endpoint: a drop-in for the legacy SageMaker handler ``pytorch_inference_handler.py``.

- :mod:`lightning_port.serving.inference`: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn`` -- the
  SageMaker PyTorch container's handler contract (deploy it where the legacy handler was);
- :mod:`lightning_port.serving.server`: ``tsa-serve MODEL_DIR``, the bring-your-own-container HTTP server
  (``GET /ping``, ``POST /invocations``) with micro-batching (:mod:`lightning_port.serving.batching`);
- :mod:`lightning_port.serving.artifacts` reads and validates the legacy model folder,
  :mod:`lightning_port.serving.preprocess` turns a request into model inputs as the legacy
  ``data_parsing`` did, :mod:`lightning_port.serving.runtime` scores them (ONNX Runtime or eager);
  ``python -m lightning_port.serving.latency`` times it on a request log.

Contract and deployment: docs/serving.md.
"""
