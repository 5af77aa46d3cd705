"""``python -m parity [--profile parity|deep] [--out reports/parity]``: run every parity check over
the case registry, measure the findings, write ``report.json`` and ``report.md``; exit 1 on any
failed check or category not yet covered.

``python -m parity verify SOURCE --data-dir DATA ...`` is ``tsa-verify`` (so ``nox -s parity -- verify ...``
runs it on a team's own legacy job); see :mod:`parity.verify`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from . import profiles  # noqa: F401  (registers the hypothesis profiles)
from .checks import RunContext, groups
from .report import CATEGORIES, run_meta, write_reports


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:  # the same command as tsa-verify; the default run is unchanged
        from .verify.cli import main as verify_main

        return verify_main(argv[1:], prog="python -m parity verify")
    ap = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    ap.add_argument("--profile", default=os.environ.get("HYPOTHESIS_PROFILE", "parity"),
                    choices=sorted(profiles.BASE_EXAMPLES))
    ap.add_argument("--out", default="reports/parity", type=Path)
    ap.add_argument("--only", nargs="*", default=None, help="categories to run (default: all)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TSA_TEST_THREADS", "1")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # exporter and Lightning chatter; failures are in the report
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_port.serving"):  # + the endpoint's per-request log
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.time()
    ctx = RunContext(profile=args.profile)
    want = set(args.only or [*CATEGORIES, "findings", "fixtures"])
    records = []

    def run(label, fn, *a):
        t = time.time()
        out = fn(*a)
        for r in out:
            r.seconds = round(time.time() - t, 1)
        bad = [r for r in out if not r.passed]
        skip = sum(r.status == "skipped" for r in out)
        print(f"[{time.time() - started:6.0f}s] {label}: {len(out) - len(bad)}/{len(out)} passed"
              + (f", {skip} skipped (no GPU)" if skip else ""), flush=True)
        records.extend(out)

    for g in groups():
        if g.category in want:
            run(g.label, g.run, ctx)
    found = []
    if "findings" in want:
        from .findings import findings

        t = time.time()
        found, inv_checks = findings(args.profile)
        records += inv_checks
        print(f"[{time.time() - started:6.0f}s] findings ({time.time() - t:.0f}s)", flush=True)
    meta = run_meta(args.profile, started)
    meta["categories_run"] = sorted(want)
    jpath, mpath = write_reports(args.out, records, found, meta, ctx.extra.get("convergence"))
    failed = [r for r in records if r.failing]
    skip = sum(r.status == "skipped" for r in records)
    print(f"wrote {jpath} and {mpath}: {sum(r.passed for r in records)}/{len(records)} checks passed"
          + (f", {skip} skipped (hardware not present: not covered)" if skip else ""))
    for r in failed:
        print(f"  {r.status.upper()}: {r.category} {r.name} {r.model}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
