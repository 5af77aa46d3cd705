"""The `fast_path` category (issue 12 item 2): the opt-in fast path (``legacy_rng=False``) computes the legacy
function with random draws from another source.

- ``fast_path.eval_outputs``: eval outputs vs the legacy model's, same seed (the fast path keeps the legacy
  coin stream in eval), over drawn configurations.
- ``fast_path.grads_vs_legacy``: where the legacy training step is deterministic (dropout 0, and no MoE or one
  expert, whose coin never keeps a second expert), the fast path's training loss and every gradient vs the
  legacy's.
- ``fast_path.grads_vs_exact``: with MoE (2+ experts) the legacy model has no deterministic training policy;
  on the drawn configuration with MoE switched on, dropout 0 and the test hook
  ``MixtureOfExperts.training_policy = "threshold"`` on both sides, the fast path vs the exact port -- which the
  ``gradient`` category proves equal to the legacy -- both in the fast path's operation order (lean last layer,
  feature-first aggregation; ``stacks.EXACT_TRAINING_IN_LEGACY_ORDER`` off: the exact path trains in the
  legacy's order, the same function rounded like the legacy, see ``stacks.rows_first``).
- ``fast_path.dropout_keep_rate`` / ``fast_path.coin_keep_rate``: the fast path's dropout masks (every
  dropout of a training forward, observed inside the network) and its MoE coin decisions, tested against the
  legacy rates: dropout ``1 - p`` by an exact two-sided binomial test; the second-expert keep count against
  the legacy law ``P(keep) = min(1, g2 / 0.2)``, with ``g2`` recomputed from the layer input by the legacy
  gate (``reference.mixture_of_experts.Top2Gating``'s arithmetic), by a two-sided Bernstein bound (valid for
  any mix of probabilities). Each test's false-alarm rate is at most ``ALPHA`` = 1e-6.
- ``fast_path.training_loss`` / ``fast_path.training_auroc``: a short ``Trainer.fit`` on ``tsa-synth`` data
  (tiny MoE model, dropout on), several seeds per path: the mean over fast-path seeds lies within the
  seed-to-seed spread (max - min) of the exact path's seeds around their mean.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from ..cases import ParityCase
from ..compare import compare
from ..pairs import make_pair, port_grads_as_legacy, run_eval, run_train
from ..report import CheckRecord
from ..tolerances import FAST_PATH_ALPHA, SPREAD_TOL, STAT_TOL
from .base import RunContext, _init_seed, run_property

ALPHA = FAST_PATH_ALPHA  # false-alarm rate of each statistical test (1e-6)
SECOND_THRESHOLD = 0.2  # legacy second_threshold (reference.mixture_of_experts.Top2Gating)
RATE_BATCH = 256  # rows of the keep-rate forward (enough trials for a sensitive test)
TRAIN_SEEDS = (0, 1, 2, 3)  # seeds per path of the short training runs
TRAIN_ROWS, TRAIN_EPOCHS, TRAIN_BATCH = 1024, 3, 64
TRAIN_MODEL = {  # configs/single_synthetic.yaml's model, with the legacy MoE on
    "n_cat_features": 6, "n_num_features": 5, "n_classes": 2, "n_embedding": 40, "seq_len": 8,
    "n_engineered_num_features": 3, "dim_embedding_table": 16, "dim_attn_feedforward": 32, "num_heads": 1,
    "dropout": 0.1, "n_layers_order": 2, "n_layers_feature": 1, "emb_tbl_use_bias": 1, "use_moe": True,
    "num_experts": 3, "use_time_seq": True, "lr": 1e-3, "scheduler_maxlr": 3e-3,
}


def _deterministic_config(config, one_expert: bool):
    from .. import strategies as S

    kw = dict(config.kwargs, dropout=0.0)
    if one_expert and kw["use_moe"]:
        kw["num_experts"] = 1
    return S.ModelConfig(kw, config.config_id)


@contextmanager
def _training_policy(model, policy: str):
    from lightning_port.nn.moe import MixtureOfExperts

    moes = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    for m in moes:
        m.training_policy = policy
    try:
        yield
    finally:
        for m in moes:
            del m.training_policy  # back to the class default (legacy "random")


def check_fast_path(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Eval outputs vs the legacy; deterministic training gradients vs the legacy and the exact port."""
    names = ("fast_path.eval_outputs", "fast_path.grads_vs_legacy", "fast_path.grads_vs_exact")
    tols = {"fast_path.eval_outputs": case.tolerance("forward.eval_outputs"),
            "fast_path.grads_vs_legacy": case.tolerance("gradient.grads"),
            "fast_path.grads_vs_exact": case.tolerance("gradient.grads")}
    notes = {"fast_path.grads_vs_exact": "the drawn configuration with MoE on (2+ experts), dropout 0, "
                                         "training_policy 'threshold' on both sides, both in the fast path's "
                                         "operation order"}
    rec = {n: CheckRecord.new(n, "fast_path", case.model, tols[n], notes=notes.get(n, "")) for n in names}

    def grads(pair, batch, tseed, model):
        params = dict(model.named_parameters()) if model is pair.legacy else dict(model.network.named_parameters())
        return run_train(model, batch, case.kind, tseed, params)

    def body(data):
        from .. import strategies as S

        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        batch = data.draw(case.inputs(config), label="batch")
        fseed = data.draw(st.integers(0, 2**16), label="seed")
        pair = make_pair(case, config, seed, mutate=ctx.mutate, legacy_rng=False)
        context = pair.context(seed=fseed, batch=batch.recipe, legacy_rng=False)
        comps = {"fast_path.eval_outputs": compare(
            run_eval(pair.port, batch, case.kind, fseed), run_eval(pair.legacy, batch, case.kind, fseed),
            tols["fast_path.eval_outputs"], context=context)}
        # legacy-deterministic training: dropout 0, no coin that can keep a second expert
        det = make_pair(case, _deterministic_config(config, one_expert=True), seed, mutate=ctx.mutate,
                        legacy_rng=False)
        out_l, g_l = grads(det, batch, fseed, det.legacy)
        out_p, g_p = grads(det, batch, fseed, det.port)
        got = port_grads_as_legacy(det, g_p)
        comp = compare(out_p, out_l, tols["fast_path.grads_vs_legacy"], context=context)
        comp.merge(compare({k: got[k] for k, g in g_l.items() if g is not None},
                           {k: g for k, g in g_l.items() if g is not None}, tols["fast_path.grads_vs_legacy"],
                           path="grad", context=context))
        comps["fast_path.grads_vs_legacy"] = comp
        # MoE (the drawn configuration with 2+ experts): fast vs exact port under a deterministic policy
        kw = config.kwargs
        moe_kw = dict(kw, dropout=0.0, use_moe=True, num_experts=max(2, kw["num_experts"] if kw["use_moe"] else 3))
        cfg0 = S.ModelConfig(moe_kw, config.config_id)
        fast = make_pair(case, cfg0, seed, mutate=ctx.mutate, legacy_rng=False).port
        exact = make_pair(case, cfg0, seed, mutate=ctx.mutate).port
        from lightning_port.nn import stacks

        # both paths in one operation order (lean last layer, feature-first aggregation): the exact path's own
        # training order (the legacy's) rounds cancelling sums differently (stacks.rows_first)
        stacks.EXACT_TRAINING_IN_LEGACY_ORDER = False
        try:
            with _training_policy(fast, "threshold"), _training_policy(exact, "threshold"):
                out_f, g_f = run_train(fast, batch, case.kind, fseed, dict(fast.network.named_parameters()))
                out_e, g_e = run_train(exact, batch, case.kind, fseed, dict(exact.network.named_parameters()))
        finally:
            stacks.EXACT_TRAINING_IN_LEGACY_ORDER = True
        comp = compare(out_f, out_e, tols["fast_path.grads_vs_exact"], context=context)
        comp.merge(compare({k: g for k, g in g_f.items() if g is not None},
                           {k: g for k, g in g_e.items() if g is not None}, tols["fast_path.grads_vs_exact"],
                           path="grad", context=context))
        comps["fast_path.grads_vs_exact"] = comp
        return comps

    return run_property(rec, ctx, case, 0.3, body)


# --- keep rates -------------------------------------------------------------------------------------------
def binomial_pvalue(k: int, n: int, p: float) -> float:
    """Exact two-sided binomial test (scipy's, minlike)."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, p).pvalue)


def bernstein_pvalue(k: float, probs: torch.Tensor) -> float:
    """Two-sided bound on P(|K - E K| >= |k - E K|) for K a sum of independent Bernoulli(probs): Bernstein's
    inequality ``2 exp(-t^2 / (2 var + 2t/3))`` (each term bounded by 1). Valid for any probabilities, so a
    check rejecting below ``ALPHA`` has a false-alarm rate of at most ``ALPHA``."""
    probs = probs.double()
    mean, var = float(probs.sum()), float((probs * (1 - probs)).sum())
    t = abs(k - mean)
    if t == 0:
        return 1.0
    return min(1.0, 2 * math.exp(-t * t / (2 * var + 2 * t / 3)))


def legacy_keep_probability(x: torch.Tensor, w_gate: torch.Tensor) -> torch.Tensor:
    """The legacy second-expert keep probability ``min(1, g2 / 0.2)`` for each token of ``x`` (T, B, d),
    computed as ``reference.mixture_of_experts.Top2Gating`` computes ``gate_2`` (einsum, softmax, top-1,
    the top-1 masked out, top-1 again, both divided by ``g1 + g2 + 1e-9``)."""
    raw = torch.einsum("...bnd,...de->...bne", x.double(), w_gate.detach().double()).softmax(dim=-1)
    g1, i1 = raw.topk(1, dim=-1)
    without = raw * (1.0 - F.one_hot(i1[..., 0], raw.shape[-1]).double())
    g2, _ = without.topk(1, dim=-1)
    g2 = g2[..., 0] / (g1[..., 0] + g2[..., 0] + 1e-9)
    return torch.clamp(g2 / SECOND_THRESHOLD, max=1.0)


def check_fast_path_rates(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Dropout and coin-flip keep rates of the fast path's training forward vs the legacy rates."""
    from lightning_port.nn import draws
    from lightning_port.nn.moe import MixtureOfExperts

    from .. import strategies as S
    from ..cases import TINY, TINY_DUAL

    kw = dict(TINY if case.kind == "single" else {k: v for k, v in TINY_DUAL.items() if k != "use_mlp"})
    kw.update(dropout=0.37, num_experts=4)  # an uneven rate; 4 experts: coin probabilities spread over (0, 1]
    config = S.ModelConfig(kw, "rates")
    rec = {n: CheckRecord.new(n, "fast_path", f"{case.kind}:rates", STAT_TOL, notes=note) for n, note in (
        ("fast_path.dropout_keep_rate", f"every dropout of a training forward, batch {RATE_BATCH}, p = 0.37: "
                                        "exact binomial test vs 1 - p"),
        ("fast_path.coin_keep_rate", "second-expert coin decisions of every MoE call vs the legacy "
                                     "min(1, g2/0.2) from the legacy gate arithmetic: Bernstein bound"))}
    try:
        pair = make_pair(case, config, 7, mutate=ctx.mutate, legacy_rng=False)
        L = kw["seq_len"]
        lengths = [(i * 7) % (L + 1) for i in range(RATE_BATCH)]
        card = [1 if i % 4 == 0 else (i * 5) % (L + 1) for i in range(RATE_BATCH)] if case.kind == "dual" else None
        batch = S.make_batch(config, case.kind, lengths, seed=9, time_scale=1e6, card_lengths=card)
        counts = {"kept": 0, "trials": 0}
        original = draws.fast_dropout

        def observed(x, p):  # every fast-path dropout of the network goes through draws.fast_dropout
            y = original(x, p)
            assert abs(p - kw["dropout"]) < 1e-12, p
            live = x.detach() != 0  # a zero input stays zero whatever its mask
            counts["kept"] += int(((y.detach() != 0) & live).sum())
            counts["trials"] += int(live.sum())
            return y

        moes = [m for m in pair.port.network.modules() if isinstance(m, MixtureOfExperts)]
        for m in moes:
            m.trace = []
        draws.fast_dropout = observed
        try:
            run_train(pair.port, batch, case.kind, 11, dict(pair.port.network.named_parameters()))
        finally:
            draws.fast_dropout = original
            traces = [(m, m.trace) for m in moes]
            for m in moes:
                del m.trace
        p_keep = 1 - kw["dropout"]
        rate = counts["kept"] / counts["trials"]
        pv = binomial_pvalue(counts["kept"], counts["trials"], p_keep)
        r = rec["fast_path.dropout_keep_rate"]
        r.add_value(abs(rate - p_keep))
        r.notes += f"; observed {counts['kept']}/{counts['trials']} = {rate:.5f} (expected {p_keep:.5f}), p = {pv:.3g}"
        if pv < ALPHA:
            r.fail(f"dropout keep rate {rate:.6f} over {counts['trials']} draws vs 1 - p = {p_keep}: p = {pv:.3g}")
        kept, probs = 0, []
        for m, calls in traces:
            for x, keep2 in calls:
                kept += int(keep2.sum())
                probs.append(legacy_keep_probability(x, m.w_gate).reshape(-1))
        probs_t = torch.cat(probs)
        pv = bernstein_pvalue(kept, probs_t)
        r = rec["fast_path.coin_keep_rate"]
        expected = float(probs_t.double().sum())
        r.add_value(abs(kept - expected) / probs_t.numel())
        r.notes += (f"; observed {kept} second experts kept over {probs_t.numel()} coin flips, expected "
                    f"{expected:.1f} (sd {math.sqrt(float((probs_t * (1 - probs_t)).sum())):.1f}), p <= {pv:.3g}")
        if pv < ALPHA:
            r.fail(f"coin keep count {kept} vs expected {expected:.1f} over {probs_t.numel()} flips: p <= {pv:.3g}")
    except Exception as e:  # a crash is a failed check, with its message
        import traceback

        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        for r in rec.values():
            r.error(tb)
    return list(rec.values())


# --- short training runs ----------------------------------------------------------------------------------
def _fit(kind: str, data_dir: str, seed: int, legacy_rng: bool, precision: str = "32-true") -> tuple[float, float]:
    import lightning.pytorch as pl

    from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification
    from lightning_port.data import TSADataModule

    from ..rng import preserved_rng

    with preserved_rng():
        pl.seed_everything(seed, verbose=False)
        cls = TemporalSelfAttentionClassification if kind == "single" else DualSequenceTSA
        model = cls(**TRAIN_MODEL, max_epochs=TRAIN_EPOCHS, legacy_rng=legacy_rng)
        dm = TSADataModule(data_dir, kind=kind, batch_size=TRAIN_BATCH, seed=seed)
        trainer = pl.Trainer(max_epochs=TRAIN_EPOCHS, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, precision=precision)
        trainer.fit(model, datamodule=dm)
        m = trainer.callback_metrics
        return float(m["val/loss"]), float(m["val/auroc"])


def short_fits(kind: str, path: str, ctx: RunContext, precision: str = "32-true") -> list[tuple[float, float]]:
    """(validation loss, AUROC) after the short fit of every seed in :data:`TRAIN_SEEDS`, ``path`` ``"exact"`` or
    ``"fast"``, under Lightning's ``precision``; once per run (the precision category reuses the fp32 fits)."""
    from lightning_port.synth import SynthConfig, write_dataset

    cache = ctx.extra.setdefault("short_fits", {})
    key = (kind, path, precision)
    if key not in cache:
        with tempfile.TemporaryDirectory() as tmp:
            write_dataset(tmp, SynthConfig(kind=kind, rows=TRAIN_ROWS, seed=0))
            cache[key] = [_fit(kind, tmp, s, path == "exact", precision) for s in TRAIN_SEEDS]
    return cache[key]


SHORT_FIT_NOTE = (f"tsa-synth {TRAIN_ROWS} rows, {TRAIN_EPOCHS} epochs, batch {TRAIN_BATCH}, MoE 3 experts, dropout "
                  f"0.1, seeds {list(TRAIN_SEEDS)} per path")


def check_fast_path_training(kind: str, ctx: RunContext) -> list[CheckRecord]:
    """Validation loss and AUROC after a short fit: fast path vs the exact path's seed-to-seed spread."""
    model = f"{kind}:synth"
    rec = {n: CheckRecord.new(n, "fast_path", model, SPREAD_TOL, notes=SHORT_FIT_NOTE)
           for n in ("fast_path.training_loss", "fast_path.training_auroc")}
    try:
        runs = {path: short_fits(kind, path, ctx) for path in ("exact", "fast")}
        for i, name in enumerate(("fast_path.training_loss", "fast_path.training_auroc")):
            exact = [r[i] for r in runs["exact"]]
            fast = [r[i] for r in runs["fast"]]
            spread = max(exact) - min(exact)
            diff = abs(statistics.mean(fast) - statistics.mean(exact))
            r = rec[name]
            r.add_value(diff, diff / spread if spread > 0 else math.inf)
            r.notes += (f"; exact {[round(v, 4) for v in exact]} (spread {spread:.4f}), fast "
                        f"{[round(v, 4) for v in fast]}, |mean difference| {diff:.4f}")
            if not diff <= spread:
                r.fail(f"{name}: fast mean {statistics.mean(fast):.4f} vs exact mean {statistics.mean(exact):.4f} "
                       f"(exact seed-to-seed spread {spread:.4f})")
    except Exception as e:  # a crash is a failed check, with its message
        import traceback

        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        for r in rec.values():
            r.error(tb)
    return list(rec.values())
