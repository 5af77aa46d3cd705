"""Serving the TSA port.

Offline: ONNX export and its verification (:mod:`.export`, ``tsa-export-onnx``), the ONNX Runtime plumbing
shared by the serving tools (:mod:`.runtime`), the offline graph optimisation and int8 quantization
(:mod:`.optimize`), the legacy endpoint's post-processing of a raw score (:mod:`.calibration`: percentile and
calibrated probability) and batch scoring of a legacy split (:mod:`.score`, ``tsa-score``).

Online, a drop-in for the legacy SageMaker handler ``pytorch_inference_handler.py``:

- :mod:`.inference`: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn`` -- the SageMaker PyTorch
  container's handler contract (deploy it where the legacy handler was);
- :mod:`.server`: ``tsa-serve MODEL_DIR``, the bring-your-own-container HTTP server (``GET /ping``,
  ``POST /invocations``) with micro-batching (:mod:`.batching`);
- :mod:`.artifacts` reads and validates the legacy model folder, :mod:`.preprocess` turns a request into model
  inputs as the legacy ``data_parsing`` did, :mod:`.scorers` picks the weights and scores them (ONNX Runtime or
  eager); ``python -m lightning_port.serving.latency`` times it on a request log.

The old paths ``lightning_port.export``, ``lightning_port.serve`` and ``lightning_port.onnx_optimize``
re-export the offline modules' public names. Contract and deployment: docs/serving.md.
"""
