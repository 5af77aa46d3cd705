"""``python -m benchmarks [--quick] [--out DIR] [--budget-minutes M] [--no-profile] [pytest args...]``

Runs the pytest-benchmark scenarios in this folder (reference vs port, same weights, same inputs),
saves the pytest-benchmark JSON under ``reports/benchmark/`` (also autosaved to
``reports/benchmark/storage`` so later runs can ``--benchmark-compare``), and writes
``reports/benchmark/summary.md``. Unknown arguments go to pytest, e.g. an opt-in regression gate:

    python -m benchmarks --benchmark-compare --benchmark-compare-fail=mean:10%
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("bench_train_eval.py", "bench_latency.py", "bench_gpu.py")


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
    args, extra = p.parse_known_args(argv)

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
