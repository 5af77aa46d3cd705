"""Quick side-by-side speed/memory check: legacy ``reference/`` vs the port, same weights and inputs.

Timings interleave reference and port steps in one process (these machines are noisy: only the
ratios carry). Peak memory runs each model in a fresh subprocess and reads ru_maxrss.

    .venv/bin/python -m benchmarks.quick_compare                       # default scenarios
    .venv/bin/python -m benchmarks.quick_compare --scenario train:default:256 --reps 5
    .venv/bin/python -m benchmarks.quick_compare --memory 1024         # peak RSS, default shape
    .venv/bin/python -m benchmarks.quick_compare --profile train:default:256   # port op profile
    .venv/bin/python -m benchmarks.quick_compare --memory 1024 --which port --variant ckpt
    .venv/bin/python -m benchmarks.quick_compare --time-variants --scenario train:default:256 --threads 1

Port variants (training memory): ``stored`` keeps every activation (no recomputation), ``recompute``
is the default (the embedding + FeatureAggregation chains are recomputed in backward), ``ckpt`` adds
``activation_checkpointing=True`` (every attention layer recomputed too).

Scenario = ``mode:shape:batch`` with mode train|eval, shape default|production.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import SHAPES, Runner, build_pair, make_inputs

DEFAULT_SCENARIOS = ["train:default:64", "eval:default:64", "train:default:256", "eval:default:256",
                     "eval:production:1"]


VARIANTS = ("stored", "recompute", "ckpt")


def _set_variant(model: torch.nn.Module, variant: str) -> None:
    """Switch a port module to a training-memory variant (same weights, same function)."""
    from lightning_port.nn import stacks

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    stacks.RECOMPUTE_AGGREGATION = variant != "stored"
    for m in model.modules():
        if isinstance(m, (stacks.OrderAttentionModule, stacks.FeatureAttentionModule)):
            m.activation_checkpointing = variant == "ckpt"


class _VariantRunner:
    """A port Runner that sets its variant before every step (variants share one process)."""

    def __init__(self, runner: Runner, variant: str):
        self.runner, self.variant = runner, variant

    def step(self) -> None:
        _set_variant(self.runner.model, self.variant)
        self.runner.step()


def _runners(scenario: str):
    mode, shape, batch = scenario.split(":")
    cfg = SHAPES[shape]
    models = build_pair("single", cfg)
    inputs = make_inputs("single", cfg, int(batch))
    return {name: Runner(m, inputs, mode) for name, m in models.items()}


def time_variants(scenario: str, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median step time of each port variant, interleaved, on one model and one input batch."""
    mode, shape, batch = scenario.split(":")
    cfg = SHAPES[shape]
    model = build_pair("single", cfg, which="port")["port"]
    runner = Runner(model, make_inputs("single", cfg, int(batch)), mode)
    runners = {v: _VariantRunner(runner, v) for v in VARIANTS}
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    times = {v: [] for v in runners}
    for _ in range(reps):
        for v, r in runners.items():
            t0 = time.perf_counter()
            r.step()
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(ts) for v, ts in times.items()}


def time_scenario(scenario: str, reps: int, warmup: int = 1) -> dict[str, float]:
    runners = _runners(scenario)
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    times = {name: [] for name in runners}
    for _ in range(reps):  # interleaved
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.step()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"reference_s": med["reference"], "port_s": med["port"], "speedup": med["reference"] / med["port"]}


def _peak_child(which: str, scenario: str, variant: str = "recompute") -> None:
    mode, shape, batch = scenario.split(":")
    cfg = SHAPES[shape]
    model = build_pair("single", cfg, which=which)[which]
    if which == "port":
        _set_variant(model, variant)
    inputs = make_inputs("single", cfg, int(batch))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Runner(model, inputs, mode).step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{base} {peak}")


def peak_memory(scenario: str, threads: int, which_models: tuple[str, ...] = ("reference", "port"),
                variant: str = "recompute") -> dict[str, float]:
    out = {"reference": (float("nan"), float("nan")), "port": (float("nan"), float("nan"))}
    for which in which_models:
        res = subprocess.run([sys.executable, "-m", "benchmarks.quick_compare", "--threads", str(threads),
                              "--variant", variant, "--_child", which, scenario],
                             capture_output=True, text=True)
        if res.returncode != 0:  # e.g. SIGKILL by the OOM killer
            print(f"{which}: child exited with {res.returncode}", file=sys.stderr)
            continue
        base, peak = map(int, res.stdout.split()[-2:])
        out[which] = (base / 1024, peak / 1024)  # MiB
    ratio = out["port"][1] / out["reference"][1]
    return {"variant": variant, "reference_peak_mib": out["reference"][1], "port_peak_mib": out["port"][1],
            "port_over_reference": ratio,
            "port_step_mib": out["port"][1] - out["port"][0],
            "reference_step_mib": out["reference"][1] - out["reference"][0]}


def profile(scenario: str, which: str = "port") -> None:
    runner = _runners(scenario)[which]
    runner.step()
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        runner.step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", action="append")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", type=int, help="peak RSS of a default-shape train step at this batch")
    ap.add_argument("--which", choices=("both", "reference", "port"), default="both",
                    help="models measured by --memory (the reference needs > 23 GiB at batch 1024)")
    ap.add_argument("--variant", choices=VARIANTS, default="recompute",
                    help="port training-memory variant for --memory / --profile")
    ap.add_argument("--time-variants", action="store_true",
                    help="time the port variants against each other (interleaved) on --scenario")
    ap.add_argument("--profile", help="profile one scenario")
    ap.add_argument("--profile-which", default="port")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a._child:
        _peak_child(*a._child, variant=a.variant)
        return
    if a.profile:
        profile(a.profile, a.profile_which)
        return
    if a.memory:
        which = ("reference", "port") if a.which == "both" else (a.which,)
        print(f"peak memory train:default:{a.memory}",
              peak_memory(f"train:default:{a.memory}", a.threads, which, a.variant), flush=True)
        return
    if a.time_variants:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        for s in a.scenario or ["train:default:256"]:
            r = time_variants(s, a.reps)
            print(f"{s:22s} " + "  ".join(f"{v} {t * 1e3:9.1f} ms" for v, t in r.items())
                  + f"  recompute/stored x{r['recompute'] / r['stored']:.2f}"
                  + f"  ckpt/stored x{r['ckpt'] / r['stored']:.2f}", flush=True)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for s in a.scenario or DEFAULT_SCENARIOS:
        r = time_scenario(s, a.reps)
        print(f"{s:22s} reference {r['reference_s'] * 1e3:9.1f} ms  port {r['port_s'] * 1e3:9.1f} ms  "
              f"speedup x{r['speedup']:.2f}", flush=True)


if __name__ == "__main__":
    main()
