"""Measured findings for the migration team (not pass/fail, except the batch-invariance claim,
which is also a check).

1. MoE capacity coupling in the legacy model: a row's score alone vs the same row inside batches of
   other sizes and compositions. Measured three ways to separate the causes: the legacy model
   under one fixed seed (coin flips and capacity together); the port with the deterministic
   ``threshold`` policy (capacity only, same function otherwise); the legacy model on the same
   batch under different seeds (coin flips only).
2. Distance of every deterministic port MoE policy from the legacy's average output: the legacy
   ``random`` policy averaged over many seeds (Monte Carlo, with its standard error) vs each policy.
3. The port's batch-invariant mode: row alone vs in batch, max abs diff (a check as well).
Scores are the production score ``softmax(logits)[:, -1]``.
"""

from __future__ import annotations

import torch

from . import strategies as S
from .cases import DEFAULT, TINY_DUAL, case
from .pairs import make_pair, run_eval
from .report import CheckRecord, Finding
from .tolerances import tolerance_for

POLICIES = ("threshold", "expected", "all", "none")


def _p(out) -> torch.Tensor:
    return torch.softmax(out["scores"], dim=1)[:, -1]


def _score(model, batch, kind, seed):
    return _p(run_eval(model, batch, kind, seed))


def findings(profile: str = "parity") -> tuple[list[Finding], list[CheckRecord]]:
    deep = profile == "deep"
    c = case("single:default")
    config = S.ModelConfig(dict(DEFAULT), "default")
    pair = make_pair(c, config, 1234, perturb=False)
    det = make_pair(c, config, 1234, perturb=False, moe_eval_policy="threshold")
    n_probe = 4
    sizes = (1, 8, 32, 128) if deep else (1, 8, 32, 64)
    L = config.seq_len
    base = S.make_batch(config, "single", [L, 10, 1, 30, 0, L, 25, 5][:n_probe], seed=7)
    rows = []
    for B in sizes[1:]:
        for comp in ("random rows", "copies of the probe"):
            if comp == "random rows":
                other = S.make_batch(config, "single", [(7 * i) % (L + 1) for i in range(B - n_probe)], seed=B)
                big = {k: torch.cat([base.batch[k], other.batch[k]]) for k in base.batch}
            else:
                reps = -(-B // n_probe)
                big = {k: torch.cat([base.batch[k]] * reps)[:B] for k in base.batch}
            bigb = S.InputBatch(big)
            both = (_score(pair.legacy, base, "single", 0), _score(pair.legacy, bigb, "single", 0)[:n_probe])
            cap = (_score(det.port, base, "single", 0), _score(det.port, bigb, "single", 0)[:n_probe])
            rows.append({"batch": B, "others": comp,
                         "legacy, seed 0 (coins+capacity)": float((both[0] - both[1]).abs().max()),
                         "port threshold (capacity only)": float((cap[0] - cap[1]).abs().max())})
    coin = torch.stack([_score(pair.legacy, base, "single", s) for s in range(16)])
    coin_only = float((coin - coin[0]).abs().max())
    f1 = Finding("MoE capacity coupling (legacy default config)",
                 f"Max |score alone − score in batch| over {n_probe} probe rows (histories of lengths "
                 f"{base.recipe['lengths']}). Coin flips alone (same batch, 16 seeds) move a score by up to "
                 f"{coin_only:.3g}.",
                 {"table": rows, "coin_flips_only_max_abs": coin_only})

    # 2: deterministic policies vs the legacy average
    n_mc = 400 if deep else 64
    batch = S.make_batch(config, "single", [L, 40, 20, 10, 5, 1, 0, L], seed=11)
    mc = torch.stack([_score(pair.legacy, batch, "single", s) for s in range(n_mc)])
    mean, se = mc.mean(0), mc.std(0) / n_mc ** 0.5
    prow = []
    for pol in ("random",) + POLICIES:
        if pol == "random":
            port_mc = torch.stack([_score(pair.port, batch, "single", s) for s in range(n_mc)]).mean(0)
            d = (port_mc - mean).abs()
            label = "random (port, averaged over the same seeds)"
        else:
            d = (_score(make_pair(c, config, 1234, perturb=False, moe_eval_policy=pol).port, batch, "single", 0)
                 - mean).abs()
            label = pol
        prow.append({"policy": label, "max abs diff": float(d.max()), "mean abs diff": float(d.mean())})
    f2 = Finding("Deterministic MoE policies vs the legacy average output (legacy default config)",
                 f"Legacy 'random' policy averaged over {n_mc} seeds on a batch of {batch.size} rows; "
                 f"Monte-Carlo standard error of that average: max {float(se.max()):.2g}. "
                 f"Per-seed spread of a legacy score: max std {float(mc.std(0).max()):.3g}.",
                 {"table": prow, "mc_seeds": n_mc, "mc_stderr_max": float(se.max())})

    # 3: batch invariance of the port's batch-invariant mode, both models
    tol = tolerance_for("findings.batch_invariant")
    checks, brows = [], []
    dual_tiny = {k: v for k, v in TINY_DUAL.items() if k != "use_mlp"}
    for model_name, cfgd in (("single:default", DEFAULT), ("dual:tiny", dual_tiny)):
        cc = case(model_name)
        cfg = S.ModelConfig(dict(cfgd), model_name.split(":")[1])
        for pol in POLICIES:
            rec = CheckRecord.new(f"batch_invariant[{pol}]", "forward", model_name, tol,
                                  notes="port batch_invariant=True: row alone vs in a batch of 32")
            p = make_pair(cc, cfg, 1234, perturb=False, moe_eval_policy=pol, batch_invariant=True).port
            Lc = cfg.seq_len
            lens = [(5 * i) % (Lc + 1) for i in range(32)]
            bb = S.make_batch(cfg, cc.kind, lens, seed=3, card_lengths=[1 if i % 3 else Lc for i in range(32)]
                              if cc.kind == "dual" else None)
            full = _score(p, bb, cc.kind, 0)
            alone = torch.cat([_score(p, bb.rows(slice(i, i + 1)), cc.kind, 0) for i in range(8)])
            from .compare import compare

            comp = compare(full[:8], alone, tol, path="score_in_batch_vs_alone", context={"policy": pol})
            rec.add(comp)
            checks.append(rec)
            brows.append({"model": model_name, "policy": pol, "max abs diff": comp.max_abs_err})
    f3 = Finding("Port batch-invariant mode", "Score of a row inside a batch of 32 vs alone "
                 "(batch_invariant=True, 8 rows).", {"table": brows})
    return [f1, f2, f3], checks
