"""The CPU in bf16 (issue 21): the fp32 reference against the port in fp32 and under
``torch.autocast("cpu", torch.bfloat16)``, side by side in one run, on the same weights and inputs.

Measured, each round visiting every engine in turn (so a load change on the shared machine hits them alike);
medians over the rounds after one warm-up step each:

- the in-run matmul peak: fp32 and bf16 (:func:`benchmarks.common.matmul_peak`, 2048² products);
- train step (``train``), default shape with MoE (legacy-tsa.md §8), batch 256: ``reference`` fp32; ``port``
  (exact path) fp32 and bf16; ``port_fast`` (``legacy_rng=False``) fp32 and bf16 -- the legacy loop's step
  (Adam, CrossEntropyLoss(sum), :class:`benchmarks.common.Runner`), autocast over forward and loss;
- eval (``eval``), production shape (§12), batch 1024: ``reference`` fp32; ``port`` fp32 and bf16;
- the bf16 eval's deviation from the port's fp32 eval on the same batch (max |score difference|): what scoring
  in bf16 would cost a served score;
- where the time of the fast path's bf16 step goes (``torch.profiler``, self CPU time by operator group):
  what bounds it once the matmuls run in bf16.

Every figure's FLOP/s is the exact path's matmul-family FLOP count (:meth:`benchmarks.common.Runner.count_flops`,
the plain computation) over the engine's median time, read against the in-run bf16 peak.

Targets (issue 21, same run, medians): fast path bf16 train step >= 6x the fp32 reference; exact path fp32 >= 2x;
production-shape eval batch 1024 in bf16 >= 6x.

``python -m benchmarks.bench_cpu_bf16 [--quick] [--rounds R] [--no-profile] [--json PATH]`` prints the tables;
``python -m benchmarks -k cpu_bf16`` records the same run in the benchmark JSON and the summary. ``--quick``: tiny
shapes, batch 16 / 64, 2 rounds (a harness check, seconds).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

TARGETS = {"train:port_fast:bf16": 6.0, "train:port:fp32": 2.0, "eval:port:bf16": 6.0}
FULL = {"train_shape": "default", "train_batch": 256, "eval_shape": "production", "eval_batch": 1024, "rounds": 5}
QUICK = {"train_shape": "small", "train_batch": 16, "eval_shape": "small_plain", "eval_batch": 64, "rounds": 2}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# (mode, engine, precision): the engines of each mode, reference first
ENGINES = {
    "train": (("reference", "fp32"), ("port", "fp32"), ("port", "bf16"), ("port_fast", "fp32"), ("port_fast", "bf16")),
    "eval": (("reference", "fp32"), ("port", "fp32"), ("port", "bf16")),
}
PROFILE_GROUPS = (  # operator name fragments -> the group the profile table reports
    ("matmul", ("mm", "bmm", "addmm", "baddbmm", "linear", "matmul")),
    ("casts and copies", ("copy_", "_to_copy", "contiguous", "clone", "cat")),
    ("gathers (embedding rows)", ("index_select", "embedding", "index_add", "gather")),
    ("dropout masks (random numbers)", ("random_", "bernoulli", "uniform_", "ge")),
    ("LayerNorm", ("layer_norm",)),
    ("softmax", ("softmax",)),
)


def _group(name: str) -> str:
    op = name.removeprefix("aten::")
    for group, frags in PROFILE_GROUPS:
        if any((op in (f, f + "_")) if len(f) <= 3 else (f in op) for f in frags):
            return group
    return "everything else (elementwise, reductions, autograd)"


def _runner(model, inputs, mode: str, precision: str) -> common.Runner:
    return common.Runner(model, inputs, mode, autocast=PRECISIONS[precision])


def _models(mode: str, cfg: dict) -> dict[str, torch.nn.Module]:
    kind = "single"
    shape = common.SHAPES[cfg[f"{mode}_shape"]]
    policy = "random" if mode == "train" else common.SERVING_POLICY
    return common.build_pair(kind, shape, which="all", moe_eval_policy=policy)


def profile_step(runner: common.Runner) -> dict[str, Any]:
    """Self CPU time of one step by operator group (the profiler's own overhead included, so shares are read,
    not the total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step()
    groups: dict[str, float] = {}
    top: list[tuple[str, float, int]] = []
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + e.self_cpu_time_total / 1e6
        top.append((e.key, e.self_cpu_time_total / 1e6, e.count))
    total = sum(groups.values())
    top.sort(key=lambda r: -r[1])
    return {"total_s": total, "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top": [{"op": k, "seconds": s, "calls": n} for k, s, n in top[:12]]}


def run(quick: bool = False, rounds: int | None = None, profile: bool = True) -> dict[str, Any]:
    cfg = dict(QUICK if quick else FULL)
    if rounds:
        cfg["rounds"] = int(rounds)
    torch.manual_seed(0)
    out: dict[str, Any] = {"config": cfg, "threads": torch.get_num_threads(), "modes": {}}
    n = 1024 if quick else None
    out["peaks"] = {name: common.matmul_peak("cpu", torch.float32 if name == "fp32" else torch.bfloat16, n=n,
                                             reps=3 if quick else 5) for name in ("fp32", "bf16")}
    for mode in ("train", "eval"):
        models = _models(mode, cfg)
        inputs = common.make_inputs("single", common.SHAPES[cfg[f"{mode}_shape"]], cfg[f"{mode}_batch"])
        runners = {f"{e}:{p}": _runner(models[e], inputs, mode, p) for e, p in ENGINES[mode]}
        flops = runners["port:fp32"].count_flops()
        for r in runners.values():  # warm-up (and the optimizer's state) once each
            r.step()
        times: dict[str, list[float]] = {k: [] for k in runners}
        names = list(runners)
        for i in range(cfg["rounds"]):
            for k in names[i % len(names):] + names[: i % len(names)]:  # the order rotates
                t0 = time.perf_counter()
                runners[k].step()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med["reference:fp32"]
        res = {"shape": cfg[f"{mode}_shape"], "batch": cfg[f"{mode}_batch"], "flops": flops,
               "engines": {k: {"median_s": med[k], "times_s": times[k], "speedup": ref / med[k],
                               "flops_per_s": flops / med[k]} for k in runners}}
        if mode == "eval":
            with torch.inference_mode():
                m = models["port"].eval()
                fp32 = torch.softmax(m(*inputs["args"], **inputs["kwargs"])[0].float(), -1)[:, 1]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    bf16 = torch.softmax(m(*inputs["args"], **inputs["kwargs"])[0].float(), -1)[:, 1]
            d = (fp32 - bf16).abs()
            res["bf16_score_deviation"] = {"max_abs": float(d.max()), "median_abs": float(d.median()),
                                           "rows": int(d.numel())}
        if mode == "train" and profile:
            res["profile_port_fast_bf16"] = profile_step(runners["port_fast:bf16"])
        out["modes"][mode] = res
        del runners, models
    out["targets"] = targets(out)
    out["machine"] = common.machine_info()
    out["machine"]["cpu_flags_bf16"] = _cpu_flags()
    return out


def _cpu_flags() -> dict[str, bool]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return {}
    return {f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")}


def targets(res: dict) -> list[dict]:
    rows = []
    for key, needed in TARGETS.items():
        mode, engine, precision = key.split(":")
        e = res["modes"][mode]["engines"].get(f"{engine}:{precision}")
        rows.append({"target": f"{mode} {engine} {precision} vs fp32 reference", "needed": needed,
                     "measured": e["speedup"] if e else None, "met": (e["speedup"] >= needed) if e else None})
    return rows


def render(res: dict) -> list[str]:
    cfg, peaks = res["config"], res["peaks"]
    bf16_peak = peaks["bf16"]["flops_per_s"]
    flags = res["machine"].get("cpu_flags_bf16", {})
    L = [f"CPU: {res['machine']['cpu_model']}, {res['threads']} torch threads; "
         + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) + f"; {cfg['rounds']} interleaved rounds, "
         "medians.", "",
         f"In-run matmul peak ({peaks['fp32']['n']}² products): fp32 {peaks['fp32']['flops_per_s'] / 1e9:.0f} GFLOP/s, "
         f"bf16 {bf16_peak / 1e9:.0f} GFLOP/s ({bf16_peak / peaks['fp32']['flops_per_s']:.2f}x).", ""]
    for mode, r in res["modes"].items():
        L += [f"{mode}: single, {r['shape']} shape, batch {r['batch']} ({r['flops'] / 1e9:.3g} GFLOP of matmuls "
              "per step, the exact path's count)", "",
              "| engine | precision | median | vs fp32 reference | GFLOP/s | share of the bf16 peak |",
              "|---|---|---:|---:|---:|---:|"]
        for k, e in r["engines"].items():
            engine, precision = k.split(":")
            L.append(f"| {engine} | {precision} | {e['median_s'] * 1e3:.0f} ms | {e['speedup']:.2f}x | "
                     f"{e['flops_per_s'] / 1e9:.0f} | {e['flops_per_s'] / bf16_peak * 100:.0f}% |")
        if "bf16_score_deviation" in r:
            d = r["bf16_score_deviation"]
            L += ["", f"bf16 eval vs the port's fp32 eval, same batch: max |score difference| {d['max_abs']:.2e}, "
                      f"median {d['median_abs']:.2e} over {d['rows']} rows."]
        if "profile_port_fast_bf16" in r:
            p = r["profile_port_fast_bf16"]
            L += ["", "Where the fast path's bf16 train step goes (self CPU time under torch.profiler, by operator "
                      "group):", "", "| group | share |", "|---|---:|"]
            L += [f"| {g} | {s / p['total_s'] * 100:.0f}% |" for g, s in p["groups"].items()]
        L.append("")
    L += ["| target (issue 21) | measured | needed | status |", "|---|---:|---:|---|"]
    for t in res["targets"]:
        status = "—" if t["met"] is None else ("met" if t["met"] else "NOT met")
        m = "—" if t["measured"] is None else f"{t['measured']:.2f}x"
        L.append(f"| {t['target']} | {m} | >= {t['needed']:g}x | {status} |")
    return L


# --- pytest-benchmark scenario (python -m benchmarks -k cpu_bf16) -------------------------------------------------
Scenario = common.WholeRunScenario


def scenarios(quick: bool, device) -> list[Scenario]:
    return [Scenario("cpu_bf16", "cpu_bf16")] if torch.device(device).type == "cpu" else []


def test_cpu_bf16(benchmark, scenario: Scenario, options):
    """The whole side-by-side run (in ``extra_info["cpu_bf16"]``); pytest-benchmark's own rounds time the in-run
    bf16 matmul (a cross-check of the peak)."""
    res = run(quick=options["quick"], profile=not options["quick"])
    benchmark.extra_info.update({"scenario": "cpu_bf16", "kind": "single", "shape": res["config"]["train_shape"],
                                 "mode": "train", "batch": res["config"]["train_batch"], "impl": "matmul_bf16",
                                 "threads": res["threads"], "device": "cpu", "cpu_bf16": res})
    a = torch.randn(512, 512).bfloat16()
    benchmark.pedantic(lambda: a @ a, rounds=5, warmup_rounds=1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_bf16", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    p.add_argument("--no-profile", action="store_true", help="skip the profile of the fast path's bf16 step")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    res = run(quick=args.quick, rounds=args.rounds, profile=not args.no_profile)
    print("\n".join(render(res)))
    print(f"\nload average {res['machine'].get('load_average_1m', '?')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
