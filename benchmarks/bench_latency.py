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
        with torch.no_grad(), FlopCounterMode(display=False) as counter, common.plain_computation():
            # (inference_mode breaks the counter's hooks)
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


# --- interleaved side-by-side timing (python -m benchmarks.bench_latency) -----------------------------------
def interleaved(kind: str, shape: str, batch: int, threads: int, rounds: int, calls: int,
                plain: bool = True) -> dict[str, list[float]]:
    """Per-call times of every engine, interleaved: each round runs ``calls`` calls of each engine in turn,
    so a load change on a shared machine hits all of them; returns each engine's per-round medians (and,
    under ``max_dprob_vs_legacy``, each engine's largest |Δprob| from the legacy model on the batch; the
    legacy model flips its MoE coins, the port uses ``common.SERVING_POLICY``).
    ``plain`` adds the unoptimised export run with ONNX Runtime's default optimisation at load (what the
    export wrote before issue 13)."""
    import statistics
    import time

    from lightning_port.export import ort_session

    torch.set_num_threads(threads)
    models = serving_models(kind, shape)
    if "onnx_error" in models:
        raise RuntimeError(models["onnx_error"])
    inputs = common.make_inputs(kind, common.SHAPES[shape], batch)
    a, kw = inputs["args"], inputs["kwargs"]
    fns = {}
    for impl in ("reference", "port"):
        model = models[impl]
        fns[impl] = lambda m=model: m(*a, **kw)
    engines = dict(ONNX_IMPLS)
    if plain:
        models["port_onnx_plain_path"] = models["port_onnx_path"].parent / "plain.onnx"
        models["port_onnx_plain_meta"] = {}
        engines = {"port_onnx_plain": None, **engines}
    for impl in engines:
        sess = (ort_session(models[f"{impl}_path"], threads=threads, metadata=models[f"{impl}_meta"])
                if impl != "port_onnx_plain" else ort_session(models["port_onnx_plain_path"], threads=threads))
        feed = _feed(sess, kind, inputs)
        fns[impl] = lambda s=sess, f=feed: s.run(None, f)
    out: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        legacy = torch.softmax(fns["reference"]()[0], dim=1).numpy()
        for name, f in fns.items():  # warm-up, and each engine's largest |Δprob| from the legacy model
            res = f()
            probs = torch.softmax(res[0], dim=1).numpy() if isinstance(res, tuple) else res[1]
            out.setdefault("max_dprob_vs_legacy", []).append((name, float(abs(probs - legacy).max())))
        for _ in range(rounds):
            for name, f in fns.items():
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
                out[name].append(statistics.median(ts))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import statistics

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_latency",
                                description="Interleaved side-by-side timing of the serving engines (same weights, "
                                            "same inputs, one process).")
    p.add_argument("--kind", default="single", choices=("single", "dual"))
    p.add_argument("--shape", default="production", choices=sorted(common.SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="default: 1 at batch 1, else 2")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=None, help="calls per engine per round (default 50 at batch 1, else 1)")
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.batch == 1 else THROUGHPUT_THREADS)
    calls = args.calls or (50 if args.batch == 1 else 1)
    times = interleaved(args.kind, args.shape, args.batch, threads, args.rounds, calls)
    dprob = dict(times.pop("max_dprob_vs_legacy"))
    models = serving_models(args.kind, args.shape)
    inputs = common.make_inputs(args.kind, common.SHAPES[args.shape], args.batch)
    flops = port_flops(models, args.kind, args.shape, inputs)
    best_ref, med_ref = min(times["reference"]), statistics.median(times["reference"])
    print(f"{args.kind} {args.shape}, batch {args.batch}, {threads} thread(s), {args.rounds} interleaved rounds of "
          f"{calls} call(s); eager port FLOPs per call {flops / 1e9:.4f} G")
    print(f"{'engine':<18} {'best round':>11} {'median round':>13} {'best/legacy':>12} {'median/legacy':>14} "
          f"{'GFLOP/s':>8} {'max|Δprob| vs legacy':>21}")
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        print(f"{name:<18} {best * 1e3:>9.3f}ms {med * 1e3:>11.3f}ms {best / best_ref:>12.3f} {med / med_ref:>14.3f} "
              f"{flops / best / 1e9:>8.1f} {dprob[name]:>21.2e}")
    meta = models["port_onnx_int8_meta"]
    print(f"int8: {meta.get('int8_quantized_matmuls')} matmuls quantized; deviation from the fp32 port over "
          f"{meta.get('int8_deviation_rows')} probe rows: max {float(meta['int8_max_abs_dev']):.2e}, "
          f"p99.9 {float(meta['int8_p999_abs_dev']):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
