"""``python -m benchmarks [--device cpu|cuda|auto] [--quick] [--out DIR] [--budget-minutes M]
[--compile-backend B] [--no-profile] [pytest args...]``

Runs the pytest-benchmark scenarios in this folder (reference vs port, same weights, same inputs),
saves the pytest-benchmark JSON under ``reports/benchmark/`` (also autosaved to
``reports/benchmark/storage`` so later runs can ``--benchmark-compare``), and writes
``reports/benchmark/summary.md``. Unknown arguments go to pytest, e.g. an opt-in regression gate:

    python -m benchmarks --benchmark-compare --benchmark-compare-fail=mean:10%

``--device cuda`` runs everything on the GPU (the GPU scenarios of ``bench_gpu.py`` at batch 1024-16384);
``--device cpu --quick`` runs the same GPU scenarios on CPU with a tiny shape (a harness check that
``nox -s tests`` exercises). The run measures the device's matmul peak first; the summary reads every FLOP/s
figure against it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("bench_train_eval.py", "bench_latency.py", "bench_gpu.py", "bench_endpoint.py", "bench_cpu_bf16.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes: check the harness in a minute or two")
    p.add_argument("--out", default="reports/benchmark", help="output folder (default reports/benchmark)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="skip remaining large legacy cases after this many minutes (default 26; quick 10)")
    p.add_argument("--no-memory-subprocess", action="store_true", help="in-process memory peaks only")
    p.add_argument("--no-profile", action="store_true", help="no profiler hint for scenarios where the port is slower")
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression (subset of scenarios)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the models run (default: cuda when present, else cpu)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compiled scenarios (default inductor; e.g. aot_eager for a "
                        "fast harness check)")
    args, extra = p.parse_known_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"python -m benchmarks: --device cuda, but torch {torch.__version__} sees no CUDA device "
              f"(torch.version.cuda = {torch.version.cuda}); install a CUDA build of torch on a GPU machine",
              file=sys.stderr)
        return 2
    if args.device != "auto":
        os.environ["TSA_BENCH_DEVICE"] = args.device  # read by benchmarks.common.device() (and memory children)
    if args.compile_backend:
        os.environ["TSA_BENCH_COMPILE_BACKEND"] = args.compile_backend

    import pytest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_activation_checkpointing.jsonl").unlink(missing_ok=True)  # appended to by this run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out / ("benchmark-quick.json" if args.quick else "benchmark.json")
    budget = args.budget_minutes if args.budget_minutes is not None else (10.0 if args.quick else 26.0)
    pytest_args = [
        *(str(HERE / f) for f in FILES),
        "-o", "python_files=bench_*.py", "-o", "testpaths=benchmarks", "-p", "no:cacheprovider",
        "-q", "-rs",
        f"--benchmark-json={json_path}",
        f"--benchmark-storage=file://{(out / 'storage').resolve()}",
        "--benchmark-autosave", "--benchmark-sort=name", "--benchmark-columns=mean,stddev,min,max,rounds",
        f"--budget-minutes={budget}", f"--skip-log={out / 'skips.jsonl'}",
        f"--memory-subprocess={0 if args.no_memory_subprocess else 1}",
    ]
    if args.quick:
        pytest_args.append("--quick")
    if args.select:
        pytest_args += ["-k", args.select]
    pytest_args += extra
    t0 = time.monotonic()
    rc = pytest.main(pytest_args)
    wall = time.monotonic() - t0

    from benchmarks import summary

    if json_path.exists():
        data = json.loads(json_path.read_text())
        skips = summary.read_skips(out / "skips.jsonl")
        profiles = {} if args.no_profile else summary.profile_slower(data, quick=args.quick)
        ckpt = summary.read_skips(out / "memory_activation_checkpointing.jsonl")  # JSON lines, like the skips
        text = summary.render(data, skips, wall, quick=args.quick, profiles=profiles, stamp=stamp,
                              argv=argv if argv is not None else sys.argv[1:], checkpointing=ckpt)
        (out / "summary.md").write_text(text)
        print(f"\nwrote {out / 'summary.md'} and {json_path} ({wall / 60:.1f} min)")
    else:
        print(f"no benchmark JSON written ({json_path}); pytest exit code {rc}", file=sys.stderr)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
