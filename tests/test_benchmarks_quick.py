"""The benchmark harness end to end on CPU: ``python -m benchmarks --device cpu --quick`` runs the GPU scenarios
(fp32 / bf16 / fp16, eager / compiled, reference / port, train / eval) with a tiny shape, measures the matmul
peak and writes the summary, so the CUDA code path is not dead code. Timings here mean nothing (shared CPU):
only that every scenario ran and reported what the summary needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package
pytest.importorskip("pytest_benchmark", reason="the bench extra (pytest-benchmark) is not installed")

from benchmarks import common, summary  # noqa: E402


def _run(args, tmp_path, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_scenarios_run_end_to_end_on_cpu_in_quick_mode(tmp_path):
    # single model only (dual runs the same code); aot_eager: dynamo + AOT autograd without inductor's codegen
    r = _run(["--device", "cpu", "--quick", "-k", "gpu and single", "--no-profile", "--no-memory-subprocess",
              "--compile-backend", "aot_eager"], tmp_path)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    data = json.loads((tmp_path / "benchmark-quick.json").read_text())
    rows = [b["extra_info"] for b in data["benchmarks"]]
    seen = {(x["impl"], x["precision"], x["compiled"], x["mode"]) for x in rows}
    for mode in ("train", "eval"):
        for precision in ("fp32", "bf16", "fp16"):
            assert ("port", precision, False, mode) in seen
        assert ("reference", "fp32", False, mode) in seen  # the baseline
        assert ("reference", "fp16", False, mode) in seen  # the legacy AMP recipe
        assert ("port", "bf16", True, mode) in seen  # torch.compile'd
    assert all(x["device"] == "cpu" and x["samples_per_s"] > 0 and x["flops_per_step"] > 0 for x in rows)
    assert all("mem_peak_mib" in x and x["mem_method"] for x in rows)
    assert {x["compile_backend"] for x in rows if x["compiled"]} == {"aot_eager"}
    peak = data["machine_info"]["tsa_matmul_peaks"]["float32"]
    assert peak["flops_per_s"] > 0 and peak["device"] == "cpu"
    text = (tmp_path / "summary.md").read_text()
    assert "Matmul peak measured in this run" in text
    assert "## GPU scenarios: fp32 / bf16 / fp16, eager / torch.compile" in text
    assert "| single small train b8 | port | bf16 | yes |" in text
    assert "## Targets (issue 12)" in text
    assert not [s for s in (tmp_path / "skips.jsonl").read_text().splitlines() if s.strip()]


def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = _run(["--device", "cuda", "--quick"], tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA device" in lines[0]


def _bench(name, impl, mean, flops=None, batch=256, scenario="train_eval", **extra):
    info = {"scenario": scenario, "kind": "single", "shape": "default", "mode": "train", "batch": batch,
            "impl": impl, "samples_per_s": batch / mean, **extra}
    if flops:
        info["flops_per_step"] = flops
    return {"name": f"test_step[{name}]", "extra_info": info,
            "stats": {"mean": mean, "stddev": 0.0, "min": mean, "median": mean, "rounds": 2}}


def test_summary_reads_flops_against_the_measured_peak_and_one_line_adds_a_variant(monkeypatch):
    """A port variant added to ``PORT_VARIANTS`` gets its own column and the issue-12 target rows; FLOP/s are
    read against the run's measured peak (figures here are made up, the arithmetic is checked)."""
    monkeypatch.setattr(common, "PORT_VARIANTS", (common.PortVariant("port"),
                                                  common.PortVariant("port_fast", {"legacy_rng": False})))
    peak = {"device": "cpu", "dtype": "float32", "n": 2048, "reps": 5, "threads": 2, "seconds": 0.1,
            "flops_per_s": 100e9, "method": "best of 5 2048x2048 @ 2048x2048 products"}
    data = {"machine_info": {"tsa_matmul_peaks": {"float32": peak}}, "benchmarks": [
        _bench("single-default-train-b256-reference", "reference", 10.0),
        _bench("single-default-train-b256-port", "port", 4.0, flops=300e9),
        _bench("single-default-train-b256-port_fast", "port_fast", 2.5, flops=150e9)]}
    text = summary.render(data, [], 60.0, quick=False, profiles={}, stamp="now", argv=[])
    assert "float32 100.0 GFLOP/s" in text
    assert "| default-shape train step, batch 256, 2 threads: exact path (`port`) | 2.50x" in text
    assert "| default-shape train step, batch 256: fast path (`port_fast`) | 4.00x" in text
    assert "| `port_fast` matmul FLOP/s at batch 256 / measured fp32 peak | 60.0% (60.0 GFLOP/s (60.0%))" in text
    assert "port_fast (speedup; FLOP/s)" in text
    # reference FLOP/s = the port's (useful) count / the reference's time: 300e9 / 10 s = 30 GFLOP/s (30%)
    assert "30.0 GFLOP/s (30.0%)" in text


def test_flop_counts_credit_the_plain_computation():
    """Eval (every path) and the fast path's training aggregate empty history positions once; the FLOP/s figures
    credit every implementation with the plain computation's FLOPs (``common.plain_computation``), not with what
    the port happens to skip."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = common.SHAPES["small"]
    inputs = common.make_inputs("single", cfg, 32)
    runner = common.Runner(common.build_pair("single", cfg, which="port")["port"], inputs, "eval")
    credited = runner.count_flops()
    with FlopCounterMode(display=False) as counter:
        runner._forward()  # the deduplicated computation (the inputs hold left-padded histories)
    assert counter.get_total_flops() < credited
    with common.plain_computation(), FlopCounterMode(display=False) as counter:
        runner._forward()
    assert counter.get_total_flops() == credited


def _endpoint_quick(tmp_path, *extra):
    out = tmp_path / "endpoint.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_endpoint", "--quick", "--json", str(out), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return json.loads(out.read_text()), r.stdout


def test_endpoint_benchmark_quick_on_the_legacy_side(tmp_path):
    """bench_endpoint --quick --no-port: the reproduced handler in-process and behind the stdlib HTTP wrapper (started,
    ready line awaited, sequential and concurrent requests), the tables and the issue-19 target rows."""
    res, stdout = _endpoint_quick(tmp_path, "--no-port")
    assert res["engines"] == ["reference"] and res["requests"] == 3
    assert res["inprocess"]["reference"]["n"] == 3 * 2 and res["inprocess"]["reference"]["p50"] > 0
    assert res["agreement"]["reference"].startswith("3/3 answers identical")
    assert res["http_sequential"]["legacy-http"]["n"] == 3 * 2 and res["http_errors"]["legacy-http"] == 0
    assert res["http_agreement"]["legacy-http"].startswith("3/3")
    load = res["http_concurrent"]["legacy-http"]
    assert load["clients"] == 2 and load["requests"] == 8 and load["errors"] == 0 and load["rps"] > 0
    assert "legacy-http" in res["http_overhead_p50"] and res["http_inprocess_same_rounds"]["reference"]["n"] == 3 * 2
    assert [t["target"] for t in res["targets"]] == [
        "port:onnx in-process p99 / legacy handler in-process p99",
        "port:eager in-process p99 / legacy handler in-process p99",
        "tsa-serve p50 over HTTP - port:onnx p50 in-process (HTTP overhead)"]
    assert "| legacy-http |" in stdout and "| target (issue 19) |" in stdout
    text = "\n".join(summary.render_endpoint([{"scenario": "endpoint", "endpoint": res, "mean": 0.05}]))
    assert text.startswith("## Endpoint (issue 19)") and "| reference |" in text and "| legacy-http |" in text


def test_endpoint_benchmark_quick_with_the_port(tmp_path):
    """The same with the port's engines and tsa-serve."""
    res, _ = _endpoint_quick(tmp_path)
    assert {"reference", "port:onnx", "port:eager"} <= set(res["engines"]), res["not_run"]
    for name in ("port:onnx", "port:eager"):
        assert res["inprocess"][name]["n"] == 6 and "3 legacy-scores within 1e-5" in res["agreement"][name]
    assert "tsa-serve" in res["http_sequential"], res["not_run"]
    assert res["http_errors"]["tsa-serve"] == 0 and res["http_concurrent"]["tsa-serve"]["errors"] == 0
    assert all(t["measured"] is not None for t in res["targets"])


def test_cpu_bf16_benchmark_quick(tmp_path):
    """bench_cpu_bf16 in quick mode through python -m benchmarks: the fp32 and bf16 matmul peaks, every engine of
    both modes side by side (reference fp32; port and port_fast in fp32 and bf16), the bf16 eval deviation, the
    issue-21 target rows and the summary section."""
    r = _run(["--device", "cpu", "--quick", "-k", "cpu_bf16", "--no-profile", "--no-memory-subprocess"], tmp_path)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    data = json.loads((tmp_path / "benchmark-quick.json").read_text())
    res = next(b["extra_info"]["cpu_bf16"] for b in data["benchmarks"] if b["extra_info"].get("scenario") == "cpu_bf16")
    assert res["peaks"]["fp32"]["flops_per_s"] > 0 and res["peaks"]["bf16"]["dtype"] == "bfloat16"
    assert set(res["modes"]["train"]["engines"]) == {"reference:fp32", "port:fp32", "port:bf16", "port_fast:fp32",
                                                     "port_fast:bf16"}
    assert set(res["modes"]["eval"]["engines"]) == {"reference:fp32", "port:fp32", "port:bf16"}
    for mode in res["modes"].values():
        assert mode["flops"] > 0
        assert all(len(e["times_s"]) == res["config"]["rounds"] and e["median_s"] > 0 for e in mode["engines"].values())
    dev = res["modes"]["eval"]["bf16_score_deviation"]
    assert 0 < dev["max_abs"] < 0.1  # bf16 really ran, and is close
    assert [t["target"] for t in res["targets"]] == ["train port_fast bf16 vs fp32 reference",
                                                     "train port fp32 vs fp32 reference",
                                                     "eval port bf16 vs fp32 reference"]
    text = (tmp_path / "summary.md").read_text()
    assert "## CPU bf16 (issue 21)" in text and "| target (issue 21) |" in text and "| port_fast | bf16 |" in text
