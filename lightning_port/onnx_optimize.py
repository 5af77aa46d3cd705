"""``lightning_port.onnx_optimize`` moved to :mod:`lightning_port.serving.optimize`; this path re-exports its
public names."""

from .serving.optimize import *  # noqa: F403
