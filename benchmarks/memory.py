"""Peak memory of one step, measured in a fresh process (multiprocessing spawn).

CPU: the resident-set high-water mark. The child builds the model and inputs, resets the kernel's
high-water mark (``/proc/self/clear_refs`` <- 5, Linux) and reads ``VmHWM - VmRSS(before)`` after
one step; without ``clear_refs`` it falls back to ``ru_maxrss`` minus the RSS before the step.
CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import resource
from typing import Any

MiB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_peak(runner) -> tuple[float | None, str]:
    """Peak memory of one ``runner.step()`` in this process, in MiB above what was allocated before it.
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (synchronised); CPU: the
    resident-set high-water mark after a ``clear_refs`` reset (``VmHWM`` - ``VmRSS`` before)."""
    import torch

    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.step()
        return (torch.cuda.max_memory_allocated() - before) / MiB, "cuda.max_memory_allocated (reset), in-process"
    if not _reset_hwm():
        runner.step()
        return None, "unavailable"
    before = (_status_kib("VmRSS") or 0) * 1024
    runner.step()
    hwm = _status_kib("VmHWM")
    return (max(hwm * 1024 - before, 0) / MiB if hwm else None), "VmHWM (reset) - VmRSS before, in-process"


def _child(spec: dict[str, Any], queue) -> None:
    try:
        import torch

        from benchmarks import common

        torch.set_num_threads(spec["threads"])
        dev = torch.device(spec["device"])
        cfg = common.SHAPES[spec["shape"]]
        models = common.build_pair(spec["kind"], cfg, which=spec["impl"], moe_eval_policy=spec.get("policy", "random"),
                                   **spec.get("port_options", {}))
        model = models[spec["impl"]].to(dev)
        inputs = common.inputs_to(common.make_inputs(spec["kind"], cfg, spec["batch"]), dev)
        variant = common.port_variant(spec["impl"]) if spec["impl"] != "reference" else None
        runner = common.Runner(model, inputs, spec["mode"], compiled=bool(variant and variant.compiled))
        del models
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            runner.step()
            peak = torch.cuda.max_memory_allocated() - before
            method = "cuda.max_memory_allocated"
        else:
            reset = _reset_hwm()
            before = (_status_kib("VmRSS") or 0) * 1024
            with common.Stopwatch() as sw:
                runner.step()
            if reset and _status_kib("VmHWM") is not None:
                peak = _status_kib("VmHWM") * 1024 - before
                method = "VmHWM (reset) - VmRSS before"
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
                method = "ru_maxrss - VmRSS before"
        queue.put({"peak_mib": max(peak, 0) / MiB, "method": method, "step_s": getattr(locals().get("sw"), "seconds", None)})
    except BaseException as exc:  # report, never hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one step of ``spec`` (kind, shape, impl, mode, batch, device, threads) in a spawned child."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, queue), daemon=True)
    proc.start()
    import queue as _queue
    import time

    deadline = time.monotonic() + timeout
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except _queue.Empty:
            if not proc.is_alive():
                result = {"error": f"child died (exit code {proc.exitcode}; killed for memory?)"}
            elif time.monotonic() > deadline:
                result = {"error": f"no result within {timeout:.0f} s"}
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if "error" not in result and proc.exitcode not in (0, None):
        result["warning"] = f"child exit code {proc.exitcode}"
    return result
