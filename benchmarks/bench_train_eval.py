"""Train step (forward + backward + Adam step) and eval forward, reference vs port.

Same weights (the legacy model's, mapped to the port by ``weight_map``), same generated inputs.
Reference and port of one scenario run back to back (adjacent test ids) so their ratio is taken
under the same machine load. CPU: batch 1 / 64 / 256 / 1024; CUDA: 1024 / 4096 / 16384.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import common, memory
from benchmarks.conftest import elapsed


@dataclass(frozen=True)
class Scenario:
    kind: str
    shape: str
    mode: str
    batch: int
    impl: str
    rounds: int
    warmup: int
    skip: str | None = None
    heavy: bool = False
    memory: bool = False

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.shape}-{self.mode}-b{self.batch}-{self.impl}"

    @property
    def group(self) -> str:
        return f"{self.mode} {self.kind} {self.shape}"


# CPU reference cases that would blow the 30-minute budget on a small machine. The legacy MoE
# dispatch is quadratic in the batch: a default-shape legacy train step at batch 256 takes ~15 s on
# 2 free cores, at 1024 about a minute or more; the dual model runs two such stacks.
CPU_REFERENCE_SKIPS = {
    ("dual", "default", "train", 1024): "legacy dual default-shape train step at batch 1024: several minutes per "
    "step on CPU (two quadratic MoE stacks), beyond the 30-minute budget",
    ("dual", "default", "eval", 1024): "legacy dual default-shape eval at batch 1024: minutes per forward on CPU "
    "(two quadratic MoE stacks), beyond the 30-minute budget",
    ("dual", "production", "train", 1024): "legacy dual production train step at batch 1024 skipped for the "
    "30-minute CPU budget",
}


def _rounds(batch: int, impl: str, shape: str, device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return (5, 2) if batch <= 4096 else (3, 1)
    if batch == 1:
        return 10, 2
    if batch <= 64:
        return 3, 1
    if impl == "reference" and shape in ("default", "small") and batch >= 1024:
        return 1, 0  # one legacy step is minutes long
    if batch <= 256:
        return 2, 1
    return 2, 1 if impl == "port" else 0


def scenarios(quick: bool, device: torch.device) -> list[Scenario]:
    if quick:
        shapes, batches = ("small", "small_plain"), (1, 8, 32)
        mem_batches = {32}
    elif device.type == "cuda":
        shapes, batches = ("default", "production"), (1024, 4096, 16384)
        mem_batches = set(batches)
    else:
        shapes, batches = ("default", "production"), (1, 64, 256, 1024)
        mem_batches = {256, 1024}
    out = []
    # the headline case first, so the time budget never takes it
    order = [("single", shapes[0], "train", batches[-1]), ("single", shapes[0], "eval", batches[-1])]
    for kind in ("single", "dual"):
        for shape in shapes:
            for mode in ("train", "eval"):
                for b in batches:
                    if (kind, shape, mode, b) not in order:
                        order.append((kind, shape, mode, b))
    # compiled variants on CPU: the headline train step only (each compile takes minutes on a small CPU)
    compiled_cpu = ("single", shapes[0], "train", 256)
    for kind, shape, mode, b in order:
        variants = [v.name for v in common.PORT_VARIANTS
                    if not v.compiled or quick or device.type != "cpu" or (kind, shape, mode, b) == compiled_cpu]
        for impl in ("reference", *variants):
            rounds, warmup = _rounds(b, impl, shape, device)
            skip = None
            if device.type == "cpu" and impl == "reference" and not quick:
                skip = CPU_REFERENCE_SKIPS.get((kind, shape, mode, b))
            heavy = impl == "reference" and rounds == 1
            # heavy legacy cases always get the fresh-process run first: if the child is killed for
            # memory, the in-process timing is skipped instead of taking the whole session down
            mem = heavy or (b in mem_batches and (kind == "single" or b <= 256))
            out.append(Scenario(kind, shape, mode, b, impl, rounds, warmup, skip, heavy, mem))
    return out


def _peak_inprocess(runner: common.Runner, count_flops: bool = False) -> tuple[float | None, str, int | None]:
    """Peak memory of one step in this process (:func:`benchmarks.memory.step_peak`); with ``count_flops`` the
    same step also runs under ``FlopCounterMode`` (matmul-family FLOPs; the mode keeps no tensors)."""
    if not count_flops:
        return (*memory.step_peak(runner), None)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        peak, method = memory.step_peak(runner)
    return peak, method, int(counter.get_total_flops())


def test_step(benchmark, scenario: Scenario, models, dev, options):
    s = scenario
    if s.skip:
        pytest.skip(f"{s.id}: {s.skip}")
    if s.impl == "reference" and s.batch >= 256 and elapsed() > options["budget_s"]:
        pytest.skip(f"{s.id}: time budget ({options['budget_s'] / 60:.0f} min) spent before this legacy case")
    cfg = common.SHAPES[s.shape]
    model = models.get(s.kind, s.shape)[s.impl]
    inputs = common.inputs_to(common.make_inputs(s.kind, cfg, s.batch), dev)
    variant = None if s.impl == "reference" else common.port_variant(s.impl)
    runner = common.Runner(model, inputs, s.mode, compiled=bool(variant and variant.compiled))
    info = benchmark.extra_info
    info.update({"scenario": "train_eval", "kind": s.kind, "shape": s.shape, "mode": s.mode, "batch": s.batch,
                 "impl": s.impl, "group": s.group, "device": str(dev), "threads": torch.get_num_threads(),
                 "rounds": s.rounds, "heavy": s.heavy})
    if s.memory and options["memory_subprocess"]:
        res = memory.measure({"kind": s.kind, "shape": s.shape, "impl": s.impl, "mode": s.mode, "batch": s.batch,
                              "device": str(dev), "threads": torch.get_num_threads()})
        if "error" in res:
            info["mem_error"] = res["error"]
            if s.heavy and "child died" in res["error"]:
                pytest.skip(f"{s.id}: one step in a fresh process was killed ({res['error']}): not enough free "
                            "memory on this machine for this legacy case; timing skipped to protect the run")
        else:
            info["mem_peak_mib"] = res["peak_mib"]
            info["mem_method"] = "fresh process: " + res["method"]
    if s.warmup == 0:
        # the single timed round also gives the in-process memory peak (one legacy step is minutes long)
        state = {}

        def first():
            if "mem" not in state:
                state["mem"] = _peak_inprocess(runner)
            else:
                runner.step()

        benchmark.pedantic(first, rounds=s.rounds, iterations=1, warmup_rounds=0)
        peak, method, _ = state["mem"]
        info["mem_inprocess_mib"] = peak
        info["mem_inprocess_method"] = method
    else:
        # the port's matmul FLOPs (its achieved FLOP/s against the run's measured matmul peak): counted on the
        # eager module, during the first warm-up train step (eval, and compiled variants: one extra eager pass)
        flops = None
        # (counted in the step only where it computes every position: the exact path's training; otherwise one
        # extra eager pass of the plain computation, see common.plain_computation)
        in_step = (variant is not None and not variant.compiled and s.mode == "train"
                   and variant.options.get("legacy_rng", True))
        if variant is not None and not in_step:
            flops = runner.count_flops()
        peak, method, counted = _peak_inprocess(runner, count_flops=in_step)
        flops = flops if flops is not None else counted
        if flops is not None:
            info["flops_per_step"] = flops
        info["mem_inprocess_mib"] = peak
        info["mem_inprocess_method"] = method
        benchmark.pedantic(runner.step, rounds=s.rounds, iterations=1, warmup_rounds=max(s.warmup - 1, 0))
    info["samples_per_s"] = s.batch / benchmark.stats.stats.mean
    if info.get("flops_per_step"):
        info["achieved_flops"] = info["flops_per_step"] / benchmark.stats.stats.mean


CHECKPOINTING_SIDECAR = "memory_activation_checkpointing.jsonl"


@pytest.mark.parametrize("batch", [256, 1024])
def test_port_memory_with_activation_checkpointing(batch, dev, options, pytestconfig):
    """Peak memory of one default-shape train step of the port with ``activation_checkpointing=True``
    (opt-in: each attention layer recomputed in backward, dropout and MoE draws replayed), in a fresh
    process; written beside the benchmark JSON for the summary."""
    if options["quick"] or dev.type != "cpu" or not options["memory_subprocess"]:
        pytest.skip("memory-only CPU scenario of the full run")
    res = memory.measure({"kind": "single", "shape": "default", "impl": "port", "mode": "train", "batch": batch,
                          "device": str(dev), "threads": torch.get_num_threads(),
                          "port_options": {"activation_checkpointing": True}})
    out = Path(pytestconfig.getoption("--skip-log")).parent / CHECKPOINTING_SIDECAR
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({"batch": batch, **res}) + "\n")
    assert "error" not in res, res["error"]
