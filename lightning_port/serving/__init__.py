"""Serving the TSA port: ONNX export and its verification (:mod:`.export`, ``tsa-export-onnx``), the ONNX
Runtime plumbing shared by the serving tools (:mod:`.runtime`), the offline graph optimisation and int8
quantization (:mod:`.optimize`), the legacy endpoint's post-processing of a raw score (:mod:`.calibration`:
percentile and calibrated probability) and batch scoring of a legacy split (:mod:`.score`, ``tsa-score``).

The old paths ``lightning_port.export``, ``lightning_port.serve`` and ``lightning_port.onnx_optimize``
re-export these modules' public names."""
