"""Online scoring latency: batch 1, one thread (``torch.set_num_threads(1)``, a single-threaded
ONNX Runtime session), as the legacy inference handler scores.

Three implementations on the same weights and the same transaction: the legacy eager model
(``reference``), the eager port (``port``) and the port exported to ONNX and run by ONNX Runtime
(``port_onnx``). Where MoE is on the port uses a deterministic eval policy
(``common.SERVING_POLICY``); the legacy model keeps its coin flips (it has no other mode).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import common

IMPLS = ("reference", "port", "port_onnx")


@dataclass(frozen=True)
class Scenario:
    kind: str
    shape: str
    impl: str
    rounds: int = 200
    warmup: int = 20

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.shape}-b1-{self.impl}"

    @property
    def group(self) -> str:
        return f"latency {self.kind} {self.shape}"


def scenarios(quick: bool, device: torch.device) -> list[Scenario]:
    cases = [("single", "small_plain"), ("single", "small")] if quick else [
        ("single", "production"), ("single", "default"), ("dual", "production")]
    rounds = 30 if quick else 200
    return [Scenario(k, s, impl, rounds=rounds) for k, s in cases for impl in IMPLS]


_SERVING: dict = {}


def serving_models(kind: str, shape: str) -> dict:
    """The legacy model, the port with a deterministic MoE policy, and the exported ONNX session."""
    key = (kind, shape)
    if key not in _SERVING:
        _SERVING.clear()
        pair = common.build_pair(kind, common.SHAPES[shape], moe_eval_policy=common.SERVING_POLICY)
        pair["reference"].eval()
        pair["port"].eval()
        tmp = Path(tempfile.mkdtemp(prefix="tsa-bench-onnx-"))
        try:
            pair["port_onnx"] = _onnx_session(pair["port"], tmp / f"{kind}-{shape}.onnx")
        except Exception as exc:  # reported in the summary, the eager scenarios still run
            pair["port_onnx_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _SERVING[key] = pair
    return _SERVING[key]


def _onnx_session(module, path: Path):
    try:
        from lightning_port.export import export_onnx, ort_session
    except ImportError:  # the project's exporter not there: plain torch.onnx + a 1-thread session
        export_onnx = ort_session = None
    if export_onnx is not None:
        export_onnx(module, path, moe_eval_policy=common.SERVING_POLICY)
        return ort_session(path, threads=1)
    import onnxruntime as ort

    names = ["x_cat", "x_num", "time_seq", "key_padding_mask"]
    ex = common.make_inputs("single", dict(module.hparams), 4)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x_cat, x_num, time_seq, kpm):
            return self.m(x_cat, x_num, None, time_seq, None, kpm)[0]

    a = ex["args"]
    torch.onnx.export(Wrap(module), (a[0], a[1], a[3], ex["kwargs"]["key_padding_mask"]), str(path),
                      input_names=names, output_names=["scores"],
                      dynamic_axes={n: {0: "batch"} for n in [*names, "scores"]}, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _feed(session, kind: str, inputs: dict) -> dict:
    names = common_names(kind)
    values = dict(zip(names, (*inputs["args"], *inputs["kwargs"].values())))
    return {i.name: values[i.name].numpy() for i in session.get_inputs()}


def common_names(kind: str) -> tuple[str, ...]:
    if kind == "single":
        return ("x_cat", "x_num", "x_engineered", "time_seq", "key_padding_mask")
    return ("x_seq_cat_cid", "x_seq_num_cid", "time_seq_cid", "x_seq_cat_ccid", "x_seq_num_ccid",
            "time_seq_ccid", "x_engineered", "key_padding_mask_cid", "key_padding_mask_ccid")


def test_latency(benchmark, scenario: Scenario):
    s = scenario
    torch.set_num_threads(1)  # restored by conftest
    models = serving_models(s.kind, s.shape)
    inputs = common.make_inputs(s.kind, common.SHAPES[s.shape], 1)
    benchmark.extra_info.update({"scenario": "latency", "kind": s.kind, "shape": s.shape, "mode": "eval",
                                 "batch": 1, "impl": s.impl, "group": s.group, "device": "cpu", "threads": 1,
                                 "moe_policy_port": common.SERVING_POLICY})
    if s.impl == "port_onnx":
        if "port_onnx" not in models:
            pytest.skip(f"{s.id}: ONNX export failed: {models.get('port_onnx_error')}")
        session = models["port_onnx"]
        feed = _feed(session, s.kind, inputs)

        def fn():
            session.run(None, feed)
    else:
        model = models[s.impl]
        a, kw = inputs["args"], inputs["kwargs"]

        def fn():
            with torch.inference_mode():
                model(*a, **kw)

    benchmark.pedantic(fn, rounds=s.rounds, iterations=1, warmup_rounds=s.warmup)
