"""GPU scenarios: the reference in fp32 eager (the baseline) and fp16 eager (the legacy AMP recipe) vs every
port variant (:data:`benchmarks.common.PORT_VARIANTS`) in fp32, bf16 and fp16 (``torch.autocast``; fp16
training through a GradScaler), eager and ``torch.compile``d; train step and eval forward; samples/s, FLOP/s
against the device's matmul peak of the same dtype measured in the same run (and the datasheet figure), peak
memory of one step.

``python -m benchmarks --device cuda``: single and dual, default and production shapes, batch 1024 / 4096 /
16384 eager; compiled at batch 4096 (:data:`COMPILED_BATCHES`: a compile costs about a minute per model, mode
and precision). ``python -m benchmarks --device cpu --quick`` runs the same code on CPU with the tiny shape
at batch 8 (compiled: the single model in bf16 only), so the CUDA path is exercised by ``nox -s tests``
(tests/test_benchmarks_quick.py); without ``--quick`` the CPU run skips this file (minutes per step).

FLOPs: ``torch.utils.flop_counter`` on the eager module, once per (model, mode, batch): matmul-family work
(mm, bmm, addmm, baddbmm, attention); elementwise work is not counted. The reference's own count includes its
dense one-hot MoE dispatch einsums, work the port does not do: "useful" FLOP/s divide the exact port's count
(``port``) by each implementation's time; MFU = useful FLOP/s / measured peak. A batch that runs out of memory
is recorded as skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from benchmarks import common, memory

# dense peak FLOP/s from datasheets, by device-name fragment: (fp32 without TF32, bf16/fp16 tensor core). Shown
# beside the measured peak; MFU uses the measured one.
DEVICE_PEAKS = {
    "H200": (67e12, 989e12),
    "H100": (67e12, 989e12),  # SXM; PCIe is ~51 / 756
    "A100": (19.5e12, 312e12),
    "L40S": (91.6e12, 362e12),
    "A10": (31.2e12, 125e12),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_RUNS = (("fp32", False), ("fp16", False))  # the fp32 eager baseline; the legacy AMP recipe
CUDA_BATCHES = (1024, 4096, 16384)
COMPILED_BATCHES = (4096,)
QUICK_BATCH = 8
NOT_ON_CPU = ("GPU scenarios run with --device cuda (on CPU only with --quick, as a harness check: a default-"
              "shape step at these batches takes minutes on CPU)")
_FLOPS: dict = {}


def datasheet_peak(precision: str) -> tuple[float | None, str]:
    """The datasheet dense peak of this CUDA device for ``precision`` (fp32: no TF32), or None."""
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    for frag, (fp32, half) in DEVICE_PEAKS.items():
        if frag in name:
            if "PCIe" in name and frag == "H100":
                fp32, half = 51e12, 756e12
            return (fp32 if precision == "fp32" else half), name
    return None, name


@dataclass(frozen=True)
class Scenario:
    kind: str
    shape: str
    mode: str
    batch: int
    impl: str
    precision: str  # fp32 | bf16 | fp16
    compiled: bool
    rounds: int = 5
    skip: str | None = None

    @property
    def id(self) -> str:
        return (f"{self.kind}-{self.shape}-{self.mode}-b{self.batch}-{self.precision}-"
                f"{'compile' if self.compiled else 'eager'}-{self.impl}")

    @property
    def group(self) -> str:
        return f"gpu {self.mode} {self.kind} {self.shape} b{self.batch}"


def scenarios(quick: bool, device: torch.device) -> list[Scenario]:
    if device.type != "cuda" and not quick:
        return [Scenario("single", "default", "train", 0, "port", "fp32", False, skip=NOT_ON_CPU)]
    if quick:
        kinds, shapes, batches, compiled_batches = ("single", "dual"), ("small",), (QUICK_BATCH,), (QUICK_BATCH,)
    else:
        kinds, shapes, batches, compiled_batches = ("single", "dual"), ("default", "production"), CUDA_BATCHES, \
            COMPILED_BATCHES
    out = []
    for kind in kinds:
        for shape in shapes:
            for mode in ("train", "eval"):
                for b in batches:
                    rounds = 1 if quick else 5 if b <= 4096 else 3
                    for precision, compiled in REFERENCE_RUNS:
                        out.append(Scenario(kind, shape, mode, b, "reference", precision, compiled, rounds))
                    for v in common.PORT_VARIANTS:
                        for precision in PRECISIONS:
                            for compiled in (False, True):
                                if v.compiled and not compiled:
                                    continue  # a compiled variant has no eager run
                                if compiled and not v.compiled:
                                    if b not in compiled_batches:
                                        continue
                                    if quick and (kind != "single" or precision != "bf16"):
                                        continue  # quick: one compiled configuration per mode (harness check)
                                out.append(Scenario(kind, shape, mode, b, v.name, precision, compiled, rounds))
    return out


def test_gpu(benchmark, scenario: Scenario, models, dev):
    s = scenario
    if s.skip:
        pytest.skip(f"{s.id}: {s.skip}")
    cfg = common.SHAPES[s.shape]
    model = models.get(s.kind, s.shape)[s.impl]
    info = benchmark.extra_info
    info.update({"scenario": "gpu", "kind": s.kind, "shape": s.shape, "mode": s.mode, "batch": s.batch,
                 "impl": s.impl, "precision": s.precision, "compiled": s.compiled, "group": s.group,
                 "device": str(dev), "threads": torch.get_num_threads(),
                 "compile_backend": common.compile_backend() if s.compiled else None})
    try:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        inputs = common.inputs_to(common.make_inputs(s.kind, cfg, s.batch), dev)
        runner = common.Runner(model, inputs, s.mode, autocast=PRECISIONS[s.precision], compiled=s.compiled)
        key = (s.kind, s.shape, s.mode, s.batch, s.impl)
        if key not in _FLOPS:
            _FLOPS[key] = runner.count_flops()  # one eager step: also a warm-up of eager runners
        # warm-up: compile (forward and backward on the first train step), then one settled step on CUDA
        for _ in range(2 if s.compiled and dev.type == "cuda" else 1):
            runner.step()
        peak, method = memory.step_peak(runner)  # one more step, measured
        info["mem_peak_mib"], info["mem_method"] = peak, method
        benchmark.pedantic(runner.step, rounds=s.rounds, iterations=1, warmup_rounds=0)
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
    sheet, name = datasheet_peak(s.precision)
    info.update({"samples_per_s": s.batch / mean, "flops_per_step": flops, "achieved_flops": flops / mean,
                 "device_name": name, "datasheet_peak_flops": sheet})
