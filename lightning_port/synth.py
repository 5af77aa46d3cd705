"""``tsa-synth``: synthetic data in the legacy numpy layout, with a planted, learnable signal.

The embedded default for demos and tests. ``tsa-synth --kind single --out DIR --rows 4000`` writes
``train`` (``--rows`` rows), ``vali`` and ``cali`` (``--eval-rows`` each, default ``rows // 4``) in
the layout of legacy-tsa.md §13, plus ``meta.json`` with the feature counts: flat
(``DIR/vali_X_seq_cat_v0.npy``) or, with ``--layout channels``, in SageMaker channel folders
(``DIR/vali/vali_X_seq_cat_v0.npy``) as the legacy job read them.

Default shape (matches ``configs/single_synthetic.yaml`` / ``configs/dual_synthetic.yaml``):
seq_len 8, n_cat 6, n_num 5, n_eng 3, n_embedding 40 (codes in 1..35; 0 is padding), 2 classes.

What each row looks like:
- a history of 1..seq_len transactions, left-padded (padding: codes 0, values 0, time 0,
  ``not_padded`` 0); the current transaction is the last position;
- ``time_to_last``: seconds-like gaps before the current transaction, 0 at the last position,
  increasing into the past, capped at 1e7 (the legacy attention overflows above ~8.8e7);
- dual: a customer (``cid``) and a card (``ccid``) history sharing the current transaction; about
  ``--empty-card-rate`` of the card histories hold only the current order.

The planted signal (label 1 with probability ``--positive-rate``): positives' current transaction
uses a "risky" code (1..5) in categorical feature 0 far more often, has a larger numerical
feature 0 and engineered feature 0, and their histories hold more risky codes and shorter time
gaps. A model that reads either the current transaction or the history separates the classes;
3 epochs of the synthetic configs reach a validation AUROC well above 0.7.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["SynthConfig", "generate_split", "main", "write_dataset"]

RISKY_CODES = 5  # codes 1..5 are "risky"
TIME_CAP = 1.0e7


@dataclass(frozen=True)
class SynthConfig:
    kind: str = "single"
    rows: int = 4000
    eval_rows: int | None = None  # vali and cali rows each; default rows // 4 (at least 64)
    seq_len: int = 8
    n_cat: int = 6
    n_num: int = 5
    n_eng: int = 3
    n_embedding: int = 40
    positive_rate: float = 0.3
    empty_card_rate: float = 0.25
    signal: float = 1.0  # scales every planted effect; 0 gives pure noise
    seed: int = 0
    version: str = "v0"

    def __post_init__(self) -> None:
        if self.kind not in ("single", "dual"):
            raise ValueError(f"kind must be 'single' or 'dual', got {self.kind!r}")
        if self.seq_len < 1 or self.n_cat < 1 or self.n_num < 1 or self.n_eng < 0:
            raise ValueError("seq_len, n_cat and n_num must be >= 1 and n_eng >= 0")
        if self.n_embedding - self.n_num < RISKY_CODES + 2:
            raise ValueError(
                f"n_embedding {self.n_embedding} leaves only {self.n_embedding - self.n_num} categorical codes "
                f"(n_embedding - n_num); need at least {RISKY_CODES + 2}"
            )
        if self.rows < 1:
            raise ValueError("rows must be >= 1")

    @property
    def max_code(self) -> int:
        """Largest categorical code: codes live in 1..n_embedding - n_num (legacy-tsa §1)."""
        return self.n_embedding - self.n_num

    @property
    def n_eval(self) -> int:
        return self.eval_rows if self.eval_rows is not None else max(64, self.rows // 4)


def _sequence(
    rng: np.random.Generator, cfg: SynthConfig, y: np.ndarray, lengths: np.ndarray, current: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """One left-padded history per row: (N, L, n_cat) codes and (N, L, n_num + 2) values."""
    n, L, s = len(y), cfg.seq_len, cfg.signal
    pos = y.astype(bool)
    cat = rng.integers(RISKY_CODES + 1, cfg.max_code + 1, size=(n, L, cfg.n_cat)).astype(np.float32)
    # history: risky codes in feature 0 more often for positives
    p_risky = np.where(pos, 0.05 + 0.35 * s, 0.05)[:, None]
    risky = rng.random((n, L)) < p_risky
    cat[:, :, 0] = np.where(risky, rng.integers(1, RISKY_CODES + 1, size=(n, L)), cat[:, :, 0])
    num = np.zeros((n, L, cfg.n_num + 2), dtype=np.float32)
    num[:, :, : cfg.n_num] = rng.normal(0.0, 1.0, size=(n, L, cfg.n_num))
    num[:, :, 0] += np.where(pos, 0.5 * s, 0.0)[:, None]
    # time gaps between consecutive transactions: bursts (short gaps) for positives
    mean_gap = np.where(pos, 1.0e6 / (1.0 + 9.0 * s), 1.0e6)[:, None]
    gaps = rng.exponential(1.0, size=(n, L)) * mean_gap
    gaps[:, -1] = 0.0
    # gaps[j] separates position j from j + 1; time_to_last[j] = sum of gaps[j:], 0 at the last position
    t = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1]
    num[:, :, -2] = np.minimum(t, TIME_CAP)
    # the current transaction is the last position
    cat[:, -1, :] = current["cat"]
    num[:, -1, : cfg.n_num] = current["num"]
    num[:, -1, -2] = 0.0
    # left padding: position j is real iff j >= L - length
    real = np.arange(L)[None, :] >= (L - lengths)[:, None]  # (N, L)
    cat *= real[:, :, None]
    num *= real[:, :, None]
    num[:, :, -1] = real
    return cat.astype(np.float32), num.astype(np.float32)


def generate_split(cfg: SynthConfig, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Arrays of one split keyed like ``lightning_port.data.layout_files``."""
    s = cfg.signal
    y = (rng.random(n) < cfg.positive_rate).astype(np.int64)
    pos = y.astype(bool)
    # the current transaction, shared by both sequences of the dual layout
    cur_cat = rng.integers(RISKY_CODES + 1, cfg.max_code + 1, size=(n, cfg.n_cat))
    p_risky = np.where(pos, 0.1 + 0.6 * s, 0.1)
    risky = rng.random(n) < p_risky
    cur_cat[:, 0] = np.where(risky, rng.integers(1, RISKY_CODES + 1, size=n), cur_cat[:, 0])
    cur_num = rng.normal(0.0, 1.0, size=(n, cfg.n_num))
    cur_num[:, 0] += np.where(pos, 1.0 * s, 0.0)
    current = {"cat": cur_cat.astype(np.float32), "num": cur_num.astype(np.float32)}

    eng = rng.normal(0.0, 1.0, size=(n, cfg.n_eng)).astype(np.float32)
    if cfg.n_eng:
        eng[:, 0] += np.where(pos, 0.8 * s, 0.0)

    out: dict[str, np.ndarray] = {}
    lengths = rng.integers(1, cfg.seq_len + 1, size=n)
    if cfg.kind == "single":
        out["seq_cat"], out["seq_num"] = _sequence(rng, cfg, y, lengths, current)
    else:
        out["seq_cat_cid"], out["seq_num_cid"] = _sequence(rng, cfg, y, lengths, current)
        card_lengths = rng.integers(1, cfg.seq_len + 1, size=n)
        card_lengths[rng.random(n) < cfg.empty_card_rate] = 1  # empty card history: only the current order
        out["seq_cat_ccid"], out["seq_num_ccid"] = _sequence(rng, cfg, y, card_lengths, current)
    out["num"] = eng
    out["y"] = y
    return out


def write_dataset(out_dir: str | Path, cfg: SynthConfig, layout: str = "flat") -> dict:
    """Write train / vali / cali and ``meta.json``; returns the metadata. ``layout="channels"``
    writes the SageMaker channel form ``out_dir/{split}/{split}_..._v0.npy`` (``meta.json`` stays at
    the top)."""
    from lightning_port.data import LAYOUTS, layout_files  # the one place that knows the file names

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    rows = {"train": cfg.rows, "vali": cfg.n_eval, "cali": cfg.n_eval}
    positives = {}
    for split, n in rows.items():
        arrays = generate_split(cfg, n, rng)
        files = layout_files(out, split, cfg.kind, cfg.version, layout)
        files["y"].parent.mkdir(parents=True, exist_ok=True)
        for key, arr in arrays.items():
            np.save(files[key], arr)
        positives[split] = int(arrays["y"].sum())
    meta = {
        "kind": cfg.kind,
        "version": cfg.version,
        "layout": layout,
        "n_cat_features": cfg.n_cat,
        "n_num_features": cfg.n_num,
        "n_engineered_num_features": cfg.n_eng,
        "n_embedding": cfg.n_embedding,
        "seq_len": cfg.seq_len,
        "n_classes": 2,
        "max_code": cfg.max_code,
        "rows": rows,
        "positives": positives,
        "generator": "lightning_port.synth",
        "config": asdict(cfg),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_parser() -> argparse.ArgumentParser:
    d = SynthConfig()
    p = argparse.ArgumentParser(
        prog="tsa-synth",
        description="Write synthetic TSA data in the legacy numpy layout (train/vali/cali) with a learnable signal.",
    )
    p.add_argument("--kind", choices=("single", "dual"), default=d.kind)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--rows", type=int, default=d.rows, help=f"training rows (default {d.rows})")
    p.add_argument("--eval-rows", type=int, default=None, help="rows of vali and of cali (default rows // 4, >= 64)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--n-cat", type=int, default=d.n_cat, help="categorical features")
    p.add_argument("--n-num", type=int, default=d.n_num, help="numerical features (time_to_last, not_padded are extra)")
    p.add_argument("--n-eng", type=int, default=d.n_eng, help="engineered features (0 allowed)")
    p.add_argument("--n-embedding", type=int, default=d.n_embedding, help="codes live in 1..n_embedding - n_num")
    p.add_argument("--positive-rate", type=float, default=d.positive_rate)
    p.add_argument("--empty-card-rate", type=float, default=d.empty_card_rate, help="dual: share of card histories holding only the current order")
    p.add_argument("--signal", type=float, default=d.signal, help="strength of the planted signal (0 = none)")
    p.add_argument("--version", default=d.version, help="version tag in the file names")
    p.add_argument("--layout", choices=("flat", "channels"), default="flat",
                   help="flat: OUT/{split}_..._v0.npy (default); channels: SageMaker input channels "
                        "OUT/{split}/{split}_..._v0.npy, as the legacy train.py read them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = SynthConfig(
            kind=args.kind,
            rows=args.rows,
            eval_rows=args.eval_rows,
            seq_len=args.seq_len,
            n_cat=args.n_cat,
            n_num=args.n_num,
            n_eng=args.n_eng,
            n_embedding=args.n_embedding,
            positive_rate=args.positive_rate,
            empty_card_rate=args.empty_card_rate,
            signal=args.signal,
            seed=args.seed,
            version=args.version,
        )
    except ValueError as e:
        print(f"tsa-synth: error: {e}", file=sys.stderr)
        return 2
    meta = write_dataset(args.out, cfg, args.layout)
    r, p = meta["rows"], meta["positives"]
    where = f"{args.out} (channels {args.out}/{{train,vali,cali}}/)" if args.layout == "channels" else args.out
    print(
        f"tsa-synth: wrote {cfg.kind} data to {where}: "
        + ", ".join(f"{s} {r[s]} rows ({p[s]} positive)" for s in r)
        + f"; seq_len {cfg.seq_len}, n_cat {cfg.n_cat}, n_num {cfg.n_num}, n_eng {cfg.n_eng}, n_embedding {cfg.n_embedding}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
