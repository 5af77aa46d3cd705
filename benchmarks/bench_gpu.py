"""GPU only: train step and eval forward in fp32 and bf16-mixed (``torch.autocast``), eager and
``torch.compile``; samples/s and achieved FLOP/s against the device peak.

FLOPs are counted once per (model, batch, mode) with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; elementwise work not counted). The legacy model's count includes
its dense one-hot MoE dispatch einsums, which are work the port does not do: "useful" FLOP/s use the
port's count for both. Batches that run out of memory are recorded as such and skipped.

Set ``TSA_BENCH_GPU_ON_CPU=1`` to run this matrix on CPU with tiny shapes (harness check only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from benchmarks import common

# dense peak FLOP/s by device name fragment: (fp32 without TF32, bf16 tensor core)
DEVICE_PEAKS = {
    "H200": (67e12, 989e12),
    "H100": (67e12, 989e12),  # SXM; PCIe is ~51 / 756
    "A100": (19.5e12, 312e12),
    "L40S": (91.6e12, 362e12),
    "A10": (31.2e12, 125e12),
}
_FLOPS: dict = {}


def device_peak(dtype: str) -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "unknown (CPU)"
    name = torch.cuda.get_device_name(0)
    for frag, (fp32, bf16) in DEVICE_PEAKS.items():
        if frag in name:
            if "PCIe" in name and frag == "H100":
                fp32, bf16 = 51e12, 756e12
            return (bf16 if dtype == "bf16" else fp32), name
    return None, name


@dataclass(frozen=True)
class Scenario:
    kind: str
    shape: str
    mode: str
    batch: int
    impl: str
    precision: str  # fp32 | bf16
    compiled: bool

    @property
    def id(self) -> str:
        return (f"{self.kind}-{self.shape}-{self.mode}-b{self.batch}-{self.precision}-"
                f"{'compile' if self.compiled else 'eager'}-{self.impl}")

    @property
    def group(self) -> str:
        return f"gpu {self.mode} {self.kind} {self.shape} {self.precision} {'compile' if self.compiled else 'eager'}"


def _on() -> bool:
    return torch.cuda.is_available() or os.environ.get("TSA_BENCH_GPU_ON_CPU") == "1"


def scenarios(quick: bool, device: torch.device) -> list[Scenario]:
    if not _on():
        return [Scenario("single", "default", "train", 0, "port", "fp32", False)]  # skipped
    small = quick or not torch.cuda.is_available()
    shapes = ("small",) if small else ("default", "production")
    batches = (8, 32) if small else (1024, 4096, 16384)
    out = []
    for kind in ("single", "dual"):
        for shape in shapes:
            for mode in ("train", "eval"):
                for precision in ("fp32", "bf16"):
                    for compiled in (False, True):
                        for b in batches:
                            for impl in ("reference", "port"):
                                out.append(Scenario(kind, shape, mode, b, impl, precision, compiled))
    return out


def _count_flops(runner: common.Runner) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    fn = runner.fn
    runner.fn = runner.model  # count on the eager module
    try:
        with FlopCounterMode(display=False) as counter:
            runner.step()
        return counter.get_total_flops()
    finally:
        runner.fn = fn


def test_gpu(benchmark, scenario: Scenario, models, dev):
    s = scenario
    if not _on() or s.batch == 0:
        pytest.skip("no CUDA device: GPU scenarios (fp32/bf16, eager/compile, FLOP/s) not run")
    cfg = common.SHAPES[s.shape]
    model = models.get(s.kind, s.shape)[s.impl]
    info = benchmark.extra_info
    info.update({"scenario": "gpu", "kind": s.kind, "shape": s.shape, "mode": s.mode, "batch": s.batch,
                 "impl": s.impl, "precision": s.precision, "compiled": s.compiled, "group": s.group,
                 "device": str(dev)})
    try:
        inputs = common.inputs_to(common.make_inputs(s.kind, cfg, s.batch), dev)
        runner = common.Runner(model, inputs, s.mode, autocast=torch.bfloat16 if s.precision == "bf16" else None,
                               compiled=s.compiled)
        key = (s.kind, s.shape, s.mode, s.batch, s.impl, s.precision)
        if key not in _FLOPS:
            _FLOPS[key] = _count_flops(runner)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        runner.step()  # warm-up (and compilation)
        if dev.type == "cuda":
            info["mem_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            info["mem_method"] = "cuda.max_memory_allocated (first step, in-process)"
        benchmark.pedantic(runner.step, rounds=5 if s.batch <= 4096 else 3, iterations=1, warmup_rounds=1)
    except torch.OutOfMemoryError:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"{s.id}: out of GPU memory")
    except Exception as exc:  # e.g. torch.compile failing on the legacy code: reported, not fatal
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"{s.id}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    mean = benchmark.stats.stats.mean
    flops = _FLOPS[key]
    port_flops = _FLOPS.get((s.kind, s.shape, s.mode, s.batch, "port", s.precision))
    peak, name = device_peak(s.precision)
    info.update({"samples_per_s": s.batch / mean, "flops_per_step": flops, "achieved_flops": flops / mean,
                 "useful_flops": (port_flops / mean) if port_flops else None, "device_name": name,
                 "device_peak_flops": peak, "mfu": (port_flops / mean / peak) if (peak and port_flops) else None})
