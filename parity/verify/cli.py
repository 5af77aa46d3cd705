"""``tsa-verify`` (and ``python -m parity verify``): the command line of :func:`parity.verify.job.run`.

Exit 0 pass, 1 beyond tolerance, 2 refused (one line on stderr; ``TSA_VERIFY_DEBUG=1`` shows the
traceback of an internal error)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .job import run
from .judging import FILE_TOL
from .options import DEFAULT_MOE_SEEDS, EXIT_FAIL, EXIT_PASS, EXIT_REFUSED, PROG, Options, VerifyError

__all__ = ["build_parser", "main"]


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Prove the port equal to a legacy SageMaker job: its model, its data, its score files.",
        epilog="Exit codes: 0 pass, 1 beyond tolerance (see report.md), 2 refused (one line on stderr).")
    p.add_argument("source", help="model.tar.gz, the job's model folder, or a legacy model file")
    p.add_argument("--data-dir", required=True, help="the data the job read: SageMaker channels DATA/vali/, DATA/cali/ "
                                                     "or a flat folder of {split}_..._v0.npy files")
    p.add_argument("--hparams", help="the job's hyperparameters.json (default: inside or beside SOURCE)")
    p.add_argument("--split", default="all", choices=("vali", "cali", "all"), help="splits to verify (default all)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the job's batch_size, 1024 if absent)")
    p.add_argument("--world-size", type=int, help="the job's GPU count: its score files are in DistributedSampler order")
    p.add_argument("--epoch", type=int, help="with --world-size: the evaluation epoch (default: found from tag_file.csv)")
    p.add_argument("--moe-seeds", type=int, default=DEFAULT_MOE_SEEDS,
                   help=f"MoE models with coin flips: port draws with fresh seeds (default {DEFAULT_MOE_SEEDS})")
    p.add_argument("--rows", type=int, help="verify only the first N lines of each split (in the legacy order); with "
                                            "--train-epochs also train on the first N rows of train / vali / cali "
                                            "(a laptop-sized run)")
    p.add_argument("--train-epochs", type=int, default=0, metavar="N",
                   help="after the scoring proof, fine-tune the job's model for up to N epochs with the legacy train.py "
                        "loop (reference/) and with Trainer.fit (legacy_selection), same data order and seeds, the "
                        "job's batch_size / lr / scheduler_maxlr / loss / patience (OneCycleLR over N epochs), and "
                        "compare them epoch by epoch (default 0: off)")
    p.add_argument("--out", default="reports/verify", help="folder for report.md, report.json and PNGs")
    p.add_argument("--test-name", help="picks {test_name}.pt in SOURCE (default: test_name from the hyperparameters)")
    p.add_argument("--seed", type=int, default=0, help="base seed of verify's coin flips (default 0)")
    p.add_argument("--version", default="v0", help="version tag in the data file names (default v0)")
    p.add_argument("--file-atol", type=float,
                   help=f"tolerance for the legacy files (default {FILE_TOL.atol}; widen only with a reason, e.g. a job "
                        "that scored under autocast; the report records it)")
    p.add_argument("--trust-pickle", action="store_true", help="load the model with weights_only=False (runs code: "
                                                              "trusted files only)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNGs (report.md and report.json only)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--requests" or a.startswith("--requests=") for a in argv):  # the shadow comparison of an endpoint
        from .shadow import main as shadow_main

        return shadow_main(argv, prog=prog)
    args = build_parser(prog).parse_args(argv)
    opts = Options(source=args.source, data_dir=args.data_dir, hparams=args.hparams, split=args.split,
                   batch_size=args.batch_size, world_size=args.world_size, epoch=args.epoch, moe_seeds=args.moe_seeds,
                   rows=args.rows, out=args.out, test_name=args.test_name, seed=args.seed, version=args.version,
                   trust_pickle=args.trust_pickle, file_atol=args.file_atol,
                   progress=False if args.no_progress else None, plots=not args.no_plots,
                   train_epochs=args.train_epochs)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        report = run(opts)
    except VerifyError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # never a traceback for a user; TSA_VERIFY_DEBUG=1 re-raises
        if os.environ.get("TSA_VERIFY_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{PROG}: error: internal error ({type(e).__name__}: {msg}); rerun with TSA_VERIFY_DEBUG=1 for details",
              file=sys.stderr)
        return EXIT_REFUSED
    out = Path(opts.out)
    for name, s in report["splits"].items():
        lf = s.get("legacy_file")
        extra = ""
        if lf and "moe" in lf:
            j = lf["moe"]
            extra = (f"; legacy file (coin flips): {j['certified_failures']} of {j['certified_rows']} flip-free rows "
                     f"differ, {j['exceedances']} rows beyond the draws' envelope, p = {j['p_value']:.2g} "
                     f"({'pass' if lf['passed'] else 'FAIL'})")
        elif lf:
            extra = f"; legacy file: max |diff| {lf['max_abs_diff']:.3g} ({'pass' if lf['passed'] else 'FAIL'})"
        print(f"{name}: {s['rows']} rows; legacy model vs port: max |diff| {s['max_abs_diff']:.3g}, "
              f"{s['rows_beyond_tolerance']} beyond tolerance{extra}")
    t = report.get("training")
    if t:
        stops = " / ".join("none" if e is None else str(e) for e in t["stop_epoch"])
        print(f"training: {t['epochs'][0]} epoch(s) legacy / {t['epochs'][1]} port, best epoch {t['best_epoch'][0]} / "
              f"{t['best_epoch'][1]}, early stop raised after epoch {stops}, max |score diff| "
              f"{t['max_port_score_diff']:.3g}, {len(t['comparisons']) - len(t['failed'])} of {len(t['comparisons'])} "
              f"comparisons within tolerance ({'pass' if t['passed'] else 'FAIL'})")
    for reason in report["reasons"]:
        print(f"FAIL: {reason}")
    print(f"{PROG}: {report['verdict'].upper()}: wrote {out / 'report.md'}, {out / 'report.json'}")
    return EXIT_PASS if report["verdict"] == "pass" else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
