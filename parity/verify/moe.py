"""The MoE criterion: a legacy score file of an MoE model whose eval scores depend on unrecorded coin flips,
judged against K port draws with fresh seeds (:func:`judge_moe`; docs/verify.md derives it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..tolerances import Tolerance, tolerance_for
from .options import VerifyError

MOE_TAUS = (0.5, 1.0, 2.0, 4.0)  # MoE criterion: levels (excess beyond the envelope, in envelope widths)
MOE_ALPHA = 1e-2  # MoE criterion: nominal false-alarm bound of the count tests together (Bonferroni), per split
MOE_LAMBDA_CONF = 0.95  # upper confidence bound on the null exceedance rate estimated from the draws
FILE_TOL = tolerance_for("verify.legacy_file")  # the default: the legacy files' tolerance


@dataclass
class MoEJudgement:
    """The legacy file of an MoE model with coin flips, judged against K port draws (see :func:`judge_moe`)."""

    passed: bool
    rows: int
    draws: int
    certified_rows: int  # rows whose score does not depend on the coin flips (checked row by row)
    certified_failures: np.ndarray  # row positions: certified rows where the legacy file deviates
    exceed_rows: np.ndarray  # row positions: uncertified rows beyond the envelope at the lowest level, worst first
    levels: list[dict[str, Any]]  # per level tau: legacy count, the draws' counts, rate bound, p-value
    p_value: float  # the smallest level p-value times the number of levels (Bonferroni)
    pooled: bool  # certified rows joined the count test (a port draw deviated on a certified row)
    alpha: float
    score: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # (rows,) excess / width

    @property
    def exceed_count(self) -> int:
        return int(self.levels[0]["legacy_count"]) if self.levels else 0

    @property
    def null_counts(self) -> list[int]:
        return list(self.levels[0]["draw_counts"]) if self.levels else []

    @property
    def deciding_level(self) -> dict[str, Any]:
        return min(self.levels, key=lambda lv: lv["p_value"])

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rows": self.rows, "draws": self.draws,
                "certified_rows": self.certified_rows, "certified_failures": int(len(self.certified_failures)),
                "stochastic_rows": self.rows - self.certified_rows, "exceedances": self.exceed_count,
                "levels": self.levels, "p_value": self.p_value, "pooled": self.pooled, "alpha": self.alpha}


def _poisson_sf(count: float, lam: float) -> float:
    """P(X >= count) for X ~ Poisson(lam), continued to non-integer counts (regularised incomplete gamma)."""
    from scipy.special import gammainc

    if count <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    return float(gammainc(count, lam))


def judge_moe(legacy: np.ndarray, draws: np.ndarray, anchors: np.ndarray, tol: Tolerance = FILE_TOL, *,
              taus: Sequence[float] = MOE_TAUS, alpha: float = MOE_ALPHA, chunk: int = 1 << 18) -> MoEJudgement:
    """Judge a legacy score file of an MoE model whose eval scores depend on unrecorded coin flips.

    ``legacy`` (n,) the file; ``draws`` (K, n) the port with K fresh seeds, batched as the job;
    ``anchors`` (m, n) the port under the deterministic policies ``all`` and ``threshold`` — the two
    extremes of the legacy coin (u -> 0 keeps every second expert, u -> 1 keeps those with gate > 0.2).

    For each of the K + 1 exchangeable vectors V_j (j = 0 the legacy file, j >= 1 a port draw) and each
    row, the envelope is [min, max] of the other K vectors and the anchors, of width w; V_j's
    *excess* is its distance outside the envelope less the tolerance, and its ratio r = excess / w.

    - Rows whose envelope is no wider than the tolerance (every draw and both extremes agree: the
      score does not depend on the coin flips) are *certified* and checked row by row: one legacy
      excess fails, as for a model without MoE.
    - On the other rows, for each level tau in ``taus``, the legacy file's count of rows with
      r > tau is compared with the draws' own counts (each draw playing the legacy file against the
      others: under the null, the file from the same model on the same batches with unknown coin
      flips, it is exchangeable with them). The count is taken as Poisson, rate bounded above by the
      ``MOE_LAMBDA_CONF`` upper limit of the draws' mean (scaled by the draws' overdispersion when
      their mean is >= 1); the file fails when some level's P(count >= observed) < alpha / len(taus).
      Low levels see many small moves, high levels a few large ones relative to their rows' spread.
    - If a draw itself deviates on a certified row (the certificate missed a rare flip), certified
      rows join the counts instead (``pooled``).
    """
    from scipy.stats import chi2

    legacy = np.asarray(legacy, dtype=np.float32)
    n = legacy.shape[0]
    K = int(draws.shape[0])
    if K < 2:
        raise VerifyError("--moe-seeds must be at least 2 for an MoE model with coin flips")
    taus = sorted(float(t) for t in taus)
    cert0 = np.zeros(n, dtype=bool)
    score0 = np.zeros(n, dtype=np.float64)
    counts = np.zeros((len(taus), K + 1), dtype=np.int64)  # uncertified exceedances per level and vector
    cert_dev = np.zeros(K + 1, dtype=np.int64)  # exceedances on certified rows per vector
    cert_counts = np.zeros((len(taus), K + 1), dtype=np.int64)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        V = np.concatenate([legacy[None, sl], np.asarray(draws[:, sl], dtype=np.float32)]).astype(np.float64)
        A = np.asarray(anchors[:, sl], dtype=np.float64)
        finite = np.isfinite(V).all(0) & np.isfinite(A).all(0)
        Vf = np.where(np.isfinite(V), V, 0.0)
        Af = np.where(np.isfinite(A), A, 0.0)
        part = np.partition(Vf, (0, 1, K - 1, K), axis=0)
        amin, amax = Vf.argmin(0), Vf.argmax(0)
        a_lo, a_hi = Af.min(0), Af.max(0)
        for j in range(K + 1):
            d_lo = np.where(amin == j, part[1], part[0])
            d_hi = np.where(amax == j, part[K - 1], part[K])
            lo, hi = np.minimum(d_lo, a_lo), np.maximum(d_hi, a_hi)  # the anchors bound the support (measured:
            tol_i = tol.atol + tol.rtol * np.abs((lo + hi) / 2)      # the draws alone give heavier null tails)
            cert = hi - lo <= tol_i
            width = hi - lo
            v = Vf[j]
            excess = np.maximum(np.maximum(lo - v, v - hi), 0.0) - tol_i
            ratio = np.where(~finite, np.inf, np.where(excess > 0, excess / np.maximum(width, tol_i), 0.0))
            cert_dev[j] += int((cert & (ratio > 0)).sum())
            for li, t in enumerate(taus):
                hit = ratio > t
                counts[li, j] += int((hit & ~cert).sum())
                cert_counts[li, j] += int((hit & cert).sum())
            if j == 0:
                cert0[sl] = cert
                score0[sl] = ratio
    pooled = bool(cert_dev[1:].sum() > 0)
    if pooled:
        counts = counts + cert_counts
    levels = []
    for li, t in enumerate(taus):
        null = counts[li, 1:].astype(np.float64)
        m = float(null.mean())
        phi = max(1.0, float(null.var(ddof=1)) / m) if m >= 1 and K > 2 else 1.0
        lam_u = float(chi2.ppf(MOE_LAMBDA_CONF, 2 * int(null.sum()) + 2) / (2 * K))
        observed = int(counts[li, 0])
        p = _poisson_sf(observed / phi, lam_u / phi)
        levels.append({"tau": t, "legacy_count": observed, "draw_counts": null.astype(int).tolist(),
                       "rate_upper": lam_u, "overdispersion": phi, "p_value": p})
    p_min = min(lv["p_value"] for lv in levels) * len(levels)
    cert_fail = np.flatnonzero(cert0 & (score0 > 0)) if not pooled else np.zeros(0, np.int64)
    flagged = np.flatnonzero((score0 > taus[0]) & (~cert0 if not pooled else np.ones(n, dtype=bool)))
    flagged = flagged[np.argsort(-score0[flagged], kind="stable")]
    passed = len(cert_fail) == 0 and p_min >= alpha
    return MoEJudgement(passed, n, K, int(cert0.sum()), cert_fail, flagged, levels, min(1.0, p_min), pooled, alpha,
                        score0)
