"""Online scoring: batch-1 latency with one thread (``torch.set_num_threads(1)``, single-threaded ONNX
Runtime sessions), as the legacy inference handler scores, and batch-1024 throughput with two threads
(batch scoring), side by side on the same weights and the same inputs.

Four implementations: the legacy eager model (``reference``), the eager port with default options
(``port``), the port exported by ``tsa-export-onnx`` and run by ONNX Runtime -- fp32, optimised offline
(``port_onnx``) and dynamic int8 (``port_onnx_int8``). Where MoE is on the port uses a deterministic
eval policy (``common.SERVING_POLICY``); the legacy model keeps its coin flips (it has no other mode).

Every scenario records ``flops``: the FLOP count of one eager port forward at that batch
(``torch.utils.flop_counter.FlopCounterMode``), and ``achieved_flops`` = that same count / the
implementation's mean time, so the four engines are compared on the same useful work (the legacy model
does more: its dense MoE dispatch; docs/benchmarks.md).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks.conftest import elapsed

IMPLS = ("reference", "port", "port_onnx", "port_onnx_int8")
ONNX_IMPLS = {"port_onnx": None, "port_onnx_int8": "int8"}
THROUGHPUT_BATCH, THROUGHPUT_THREADS = 1024, 2
QUICK_THROUGHPUT_BATCH = 64
INT8_DEVIATION_ROWS = 2000  # the int8 file's deviation from the fp32 port, recorded next to its speed


@dataclass(frozen=True)
class Scenario:
    kind: str
    shape: str
    impl: str
    batch: int = 1
    threads: int = 1
    rounds: int = 200
    warmup: int = 20

    @property
    def scenario(self) -> str:
        return "latency" if self.batch == 1 else "throughput"

    @property
    def id(self) -> str:
        if self.batch == 1:  # the ids earlier runs stored (benchmark-compare matches on them)
            return f"{self.kind}-{self.shape}-b1-{self.impl}"
        return f"{self.kind}-{self.shape}-b{self.batch}-t{self.threads}-{self.impl}"

    @property
    def group(self) -> str:
        return f"{self.scenario} {self.kind} {self.shape} b{self.batch}"


def scenarios(quick: bool, device: torch.device) -> list[Scenario]:
    out = []
    latency = [("single", "small_plain"), ("single", "small")] if quick else [
        ("single", "production"), ("single", "default"), ("dual", "production")]
    for kind, shape in latency:
        out += [Scenario(kind, shape, impl, rounds=30 if quick else 200) for impl in IMPLS]
    throughput = [("single", "small_plain"), ("single", "small")] if quick else [
        ("single", "production"), ("single", "default")]
    batch = QUICK_THROUGHPUT_BATCH if quick else THROUGHPUT_BATCH
    for kind, shape in throughput:
        for impl in IMPLS:
            heavy = impl == "reference" and shape == "default" and not quick  # legacy: ~30 s per call here
            out.append(Scenario(kind, shape, impl, batch=batch, threads=THROUGHPUT_THREADS,
                                rounds=1 if heavy else (2 if quick else 3), warmup=0 if heavy else 1))
    return out


_SERVING: dict = {}


def serving_models(kind: str, shape: str) -> dict:
    """The legacy model, the port (deterministic MoE policy), and the port's fp32 and int8 ONNX files
    (one plain export, optimised twice); sessions are made per thread count by :func:`session`."""
    key = (kind, shape)
    if key not in _SERVING:
        _SERVING.clear()
        pair = common.build_pair(kind, common.SHAPES[shape], moe_eval_policy=common.SERVING_POLICY)
        pair["reference"].eval()
        pair["port"].eval()
        pair["sessions"] = {}
        tmp = Path(tempfile.mkdtemp(prefix="tsa-bench-onnx-"))
        try:
            from lightning_port.export import export_onnx, optimize_export, read_metadata

            raw, policy = export_onnx(pair["port"], tmp / "plain.onnx", moe_eval_policy=common.SERVING_POLICY,
                                      optimize="none")
            for impl, quant in ONNX_IMPLS.items():
                path = optimize_export(raw, tmp / f"{impl}.onnx", pair["port"], policy=policy, quantize=quant,
                                       deviation_rows=INT8_DEVIATION_ROWS)
                pair[f"{impl}_path"] = path
                pair[f"{impl}_meta"] = read_metadata(path)
        except Exception as exc:  # reported in the summary, the eager scenarios still run
            pair["onnx_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _SERVING[key] = pair
    return _SERVING[key]


def session(models: dict, impl: str, threads: int):
    from lightning_port.export import ort_session

    key = (impl, threads)
    if key not in models["sessions"]:
        models["sessions"][key] = ort_session(models[f"{impl}_path"], threads=threads, metadata=models[f"{impl}_meta"])
    return models["sessions"][key]


_FLOPS: dict = {}


def port_flops(models: dict, kind: str, shape: str, inputs: dict) -> int:
    """FLOPs of one eager port forward (eval) on ``inputs``: the work every implementation is credited with."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (kind, shape, inputs["args"][0].shape[0])
    if key not in _FLOPS:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:  # (inference_mode breaks its hooks)
            models["port"](*inputs["args"], **inputs["kwargs"])
        _FLOPS[key] = counter.get_total_flops()
    return _FLOPS[key]


def common_names(kind: str) -> tuple[str, ...]:
    if kind == "single":
        return ("x_cat", "x_num", "x_engineered", "time_seq", "key_padding_mask")
    return ("x_seq_cat_cid", "x_seq_num_cid", "time_seq_cid", "x_seq_cat_ccid", "x_seq_num_ccid",
            "time_seq_ccid", "x_engineered", "key_padding_mask_cid", "key_padding_mask_ccid")


def _feed(sess, kind: str, inputs: dict) -> dict:
    values = dict(zip(common_names(kind), (*inputs["args"], *inputs["kwargs"].values())))
    return {i.name: values[i.name].numpy() for i in sess.get_inputs()}


def test_latency(benchmark, scenario: Scenario, options):
    s = scenario
    torch.set_num_threads(s.threads)  # restored by conftest
    if s.impl == "reference" and s.batch >= 256 and elapsed() > options["budget_s"]:
        pytest.skip(f"{s.id}: time budget ({options['budget_s'] / 60:.0f} min) spent; legacy batch {s.batch} skipped")
    models = serving_models(s.kind, s.shape)
    inputs = common.make_inputs(s.kind, common.SHAPES[s.shape], s.batch)
    flops = port_flops(models, s.kind, s.shape, inputs)
    benchmark.extra_info.update({"scenario": s.scenario, "kind": s.kind, "shape": s.shape, "mode": "eval",
                                 "batch": s.batch, "impl": s.impl, "group": s.group, "device": "cpu",
                                 "threads": s.threads, "moe_policy_port": common.SERVING_POLICY, "flops": flops})
    if s.impl in ONNX_IMPLS:
        if "onnx_error" in models:
            pytest.skip(f"{s.id}: ONNX export failed: {models['onnx_error']}")
        meta = models[f"{s.impl}_meta"]
        benchmark.extra_info["ort_optimization"] = meta.get("ort_optimization")
        if s.impl == "port_onnx_int8":
            benchmark.extra_info.update({k: meta.get(k) for k in ("int8_quantized_matmuls", "int8_max_abs_dev",
                                                                  "int8_p999_abs_dev", "int8_deviation_rows")})
        sess = session(models, s.impl, s.threads)
        feed = _feed(sess, s.kind, inputs)

        def fn():
            sess.run(None, feed)
    else:
        model = models[s.impl]
        a, kw = inputs["args"], inputs["kwargs"]

        def fn():
            with torch.inference_mode():
                model(*a, **kw)

    benchmark.pedantic(fn, rounds=s.rounds, iterations=1, warmup_rounds=s.warmup)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({"achieved_flops": flops / mean, "samples_per_s": s.batch / mean})
