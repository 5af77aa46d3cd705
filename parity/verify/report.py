"""``tsa-verify``'s reports: ``report.json`` (NaN/inf written as null), ``report.md`` and the PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .judging import OPERATING_POINTS, auc


def ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _finite(o: Any) -> Any:
    """JSON has no NaN/inf: they become null (the markdown report says n/a)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_reports(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(render_markdown(report))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def render_markdown(r: dict[str, Any]) -> str:
    m, st = r["model"], r["settings"]
    lines = [f"# tsa-verify: {r['verdict'].upper()}", ""]
    if r["reasons"]:
        lines += ["Why it failed:", ""] + [f"- {x}" for x in r["reasons"]] + [""]
    lines += [
        f"Legacy job `{m['source']}` ({m['source_kind']}): model `{m['model_file']}` ({m['legacy_format']}), "
        f"{m['legacy_class']} -> {m['class']}, {m['parameters']:,} parameters, "
        + ("MoE with coin flips" if m["coin_flips"] else "MoE without coin flips (one expert)" if m["moe"] else "no MoE")
        + f". Hyperparameters: {m['hyperparameters_file']}; legacy outputs: {', '.join(m['legacy_outputs']) or 'none'}.",
        "",
        f"Data `{st['data_dir']}`, splits {', '.join(st['splits'])}; batch size {st['batch_size']} ({st['batch_size_from']})"
        + (f"; world size {st['world_size']}" if st["world_size"] else "")
        + (f"; {st['moe_seeds']} coin-flip draws of the port" if st["moe_seeds"] else "") + ".",
        "",
        "Tolerances: legacy model vs port: atol {atol} + rtol {rtol} ({reason}); legacy file vs port: atol {fatol} "
        "({freason}).".format(atol=st["tolerance_legacy_model"]["atol"], rtol=st["tolerance_legacy_model"]["rtol"],
                              reason=st["tolerance_legacy_model"]["reason"], fatol=st["tolerance_legacy_file"]["atol"],
                              freason=st["tolerance_legacy_file"]["reason"]),
        "",
    ]
    for name, s in r["splits"].items():
        lines += [f"## {name}: {s['rows']} rows", "", f"Order: {s['order']} ({s['batches']} batches, {s['layout']} "
                  "layout).", ""]
        lines += ["| comparison | rows | max abs diff | p99.9 abs diff | beyond tolerance | result |",
                  "|---|---:|---:|---:|---:|---|",
                  f"| legacy model vs port (same batches, same seeds) | {s['rows']} | {_fmt(s['max_abs_diff'])} | "
                  f"{_fmt(s['p999_abs_diff'])} | {s['rows_beyond_tolerance']} | {'pass' if s['passed'] else 'FAIL'} |"]
        lf = s.get("legacy_file")
        if lf:
            beyond = lf.get("rows_beyond_tolerance", lf.get("moe", {}).get("exceedances", 0))
            lines.append(f"| legacy file `{lf['file']}` vs port ({lf['criterion']}) | {lf['rows']} | "
                         f"{_fmt(lf['max_abs_diff'])} | {_fmt(lf['p999_abs_diff'])} | {beyond} | "
                         f"{'pass' if lf['passed'] else 'FAIL'} |")
        lines.append("")
        a = s["auc"]
        lines += [f"AUC: legacy model {_fmt(a['legacy'], '.6f')}, port {_fmt(a['port'], '.6f')}, legacy file "
                  f"{_fmt(a['legacy_file'], '.6f')}.", ""]
        if "tags" in s:
            t = s["tags"]
            lines += [f"Labels: `{t['file']}` matches the data labels in this order"
                      + (" on every line." if not t["mismatches"] else
                         f" EXCEPT {t['mismatches']} line(s) (data rows {t['rows'][:8]})"
                         + (f"; it matches {t['matching_order']}" if t.get("matching_order") else "") + "."), ""]
        if lf and "moe" in lf:
            j = lf["moe"]
            lines += [f"MoE criterion: {j['certified_rows']} rows do not depend on the coin flips (checked row by row: "
                      f"{j['certified_failures']} differ); on the other {j['stochastic_rows']} rows, rows beyond the port's "
                      f"coin-flip envelope by more than tau of its width (p = {_fmt(j['p_value'])}, alpha {j['alpha']}):", "",
                      "| tau | legacy file | each port draw in its place | rate bound | p |", "|---:|---:|---|---:|---:|"]
            lines += [f"| {lv['tau']:g} | {lv['legacy_count']} | {lv['draw_counts']} | {lv['rate_upper']:.3g} | "
                      f"{lv['p_value']:.3g} |" for lv in j["levels"]]
            lines.append("")
        if s.get("coin_boundary_rows"):
            lines += [f"Coin flips at a rounding boundary (differ under one seed only, agree under fresh ones): data rows "
                      f"{s['coin_boundary_rows'][:20]}.", ""]
        lines += ["Operating points (decision flips at the top q % by the legacy percentile table):", "",
                  "| top | threshold | legacy model flagged | port flagged | flips vs legacy model | flips vs legacy file |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for op in s["operating_points"]:
            lines.append(f"| {op['top'] * 100:g} % | {op['threshold']:.6g} | {op['legacy_flagged']} | {op['port_flagged']} | "
                         f"{op['flips']} | {op.get('legacy_file_flips', 'n/a')} |")
        lines += ["", f"Thresholds from {s['operating_points'][0]['threshold_from'].rsplit(' row', 1)[0]}.", ""]
        if "percentile_table" in s:
            p = s["percentile_table"]
            lines += [f"Percentile table (1000 rows) regenerated from the port's cali scores vs {p['legacy_source']}: "
                      f"max |diff| {_fmt(p['max_abs_diff_port_vs_legacy'])}; the legacy model's: "
                      f"{_fmt(p['max_abs_diff_legacy_model_vs_legacy'])}"
                      + (f"; percentile_score.pkl vs the table of cali_score_file.csv: "
                         f"{_fmt(p['max_abs_diff_pkl_vs_cali_score_file'])}" if "max_abs_diff_pkl_vs_cali_score_file" in p
                         else "") + ".", ""]
        if "moe_policies" in s:
            lines += ["Deterministic MoE policies on this data (deviation from the mean of the port's coin-flip draws; "
                      "flips against the legacy model):", "",
                      "| policy | mean abs dev | p99 abs dev | max abs dev | flips top 0.1 / 0.5 / 1 / 5 % |",
                      "|---|---:|---:|---:|---|"]
            for p in s["moe_policies"]:
                f = p["flips_vs_legacy_model"]
                lines.append(f"| {p['policy']} | {p['mean_abs_dev']:.3g} | {p['p99_abs_dev']:.3g} | {p['max_abs_dev']:.3g} | "
                             + " / ".join(str(f[str(q)]) for q in OPERATING_POINTS) + " |")
            lines.append("")
        lines += ["Worst rows, legacy model vs port (row = data row in file order):", "",
                  "| row | legacy | port | diff |", "|---:|---:|---:|---:|"]
        lines += [f"| {w['row']} | {_fmt(w['legacy'], '.8g')} | {_fmt(w['port'], '.8g')} | {_fmt(w['diff'], '.3g')} |"
                  for w in s["worst_rows"][:10]]
        if lf:
            lines += ["", f"Worst rows, legacy file vs port ({'vs the median of the draws' if 'moe' in lf else 'row by row'}):",
                      "", "| row | legacy file | port | diff |", "|---:|---:|---:|---:|"]
            lines += [f"| {w['row']} | {_fmt(w['legacy'], '.8g')} | {_fmt(w['port'], '.8g')} | {_fmt(w['diff'], '.3g')} |"
                      for w in lf["worst_rows"][:10]]
        if s["plots"]:
            lines += ["", " ".join(f"![{p}]({p})" for p in s["plots"])]
        lines.append("")
    if r.get("training"):
        lines += training_markdown(r["training"])
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += [f"{r['seconds']} s, torch {r['torch']}.", ""]
    return "\n".join(lines)


def training_markdown(t: dict[str, Any]) -> list[str]:
    p = t["protocol"]
    lines = [f"## Training: up to {t['epochs_requested']} epoch(s) from the job's weights: "
             f"{'pass' if t['passed'] else 'FAIL'}", "",
             f"The legacy train.py loop (reference/) and Trainer.fit with legacy_selection, both starting from the "
             f"job's converted weights, on {t['data']} ({', '.join(f'{s} {n}' for s, n in t['rows'].items())} rows): "
             f"batch {p['batch_size']}, lr {p['lr']:g}, scheduler_maxlr {p['scheduler_maxlr']:g}, loss {p['loss']}, "
             f"patience {p['patience']}, max_epochs {p['max_epochs']}.", ""]
    lines += ["| comparison | values | worst abs error | worst rel error | tolerance at the last step (rtol / atol) | "
              "result |", "|---|---:|---:|---:|---|---|"]
    for name, c in t["comparisons"].items():
        tol = c["tolerance"]
        lines.append(f"| {name} | {c['values_compared']} | {_fmt(c['max_abs_err'])} | {_fmt(c['max_rel_err'])} | "
                     f"{tol['rtol']:.3g} / {tol['atol']:.3g} | {'pass' if c['passed'] else 'FAIL'} |")
    lines += ["", "| | legacy | port |", "|---|---:|---:|",
              f"| epochs trained | {t['epochs'][0]} | {t['epochs'][1]} |",
              f"| best epoch (0-based) | {_fmt(t['best_epoch'][0])} | {_fmt(t['best_epoch'][1])} |",
              f"| early stop raised after epoch | {_fmt(t['stop_epoch'][0])} | {_fmt(t['stop_epoch'][1])} |",
              f"| seconds per epoch (the side's whole run / epochs) | {t['seconds_per_epoch']['legacy']:.2f} | "
              f"{t['seconds_per_epoch']['port']:.2f} |",
              "", "| epoch | train loss legacy | train loss port | vali loss legacy | vali loss port | AUC legacy | "
              "AUC port |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for e in range(max(t["epochs"])):
        cells = [_fmt(t[key][side][e], ".8g") if e < len(t[key][side]) else "–"
                 for key in ("train_loss", "vali_loss", "auc_raw") for side in ("legacy", "port")]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in t["comparisons"].values():
        lines += [f"- {m}" for m in c["mismatches"][:3]]
    lines += [f"- {n}" for n in t["training_notes"]]
    if t["notes"]:
        lines.append(f"- {t['notes']}")
    lines.append("")
    if t["plot"]:
        lines += [f"![legacy loop vs Trainer.fit, per epoch]({t['plot']})", ""]
    return lines


# ------------------------------------------------------------------------------------------- plots
def plots(out: Path, split: str, labels: np.ndarray, ref: np.ndarray, port: np.ndarray,
          legacy_file: np.ndarray | None) -> list[str]:
    from lightning_port.scoring import _figure, save_figure

    written = []
    rng = np.random.default_rng(0)
    # score-difference histogram
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    d = (port.astype(np.float64) - ref)[np.isfinite(port) & np.isfinite(ref)]
    e = None
    if legacy_file is not None:
        e = (port.astype(np.float64) - legacy_file)[np.isfinite(port) & np.isfinite(legacy_file)]
    lim = max([1e-7] + [float(np.abs(x).max()) for x in (d, e) if x is not None and len(x)])
    bins = np.linspace(-lim * 1.05, lim * 1.05, 81)  # common bins, symmetric; all-zero differences stay visible
    ax.hist(d, bins=bins, alpha=0.7, label=f"port - legacy model (max |d| {np.abs(d).max() if len(d) else 0:.2e})")
    if e is not None:
        ax.hist(e, bins=bins, alpha=0.5, label=f"port - legacy file (max |d| {np.abs(e).max() if len(e) else 0:.2e})")
    ax.set(xlabel="score difference", ylabel="rows", title=f"Score differences ({split}, {len(ref)} rows)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(save_figure(fig, out / f"{split}_score_diff_hist.png").name)
    # scatter (at most 200k points)
    fig = _figure(5.5, 5.5)
    ax = fig.subplots()
    idx = np.arange(len(ref)) if len(ref) <= 200_000 else rng.choice(len(ref), 200_000, replace=False)
    other, name = (legacy_file, "legacy file") if legacy_file is not None else (ref, "legacy model")
    ax.scatter(other[idx], port[idx], s=2, alpha=0.4)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel=f"{name} score", ylabel="port score", title=f"{name} vs port ({split})", xlim=(0, 1), ylim=(0, 1))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(save_figure(fig, out / f"{split}_scatter.png").name)
    # ROC of both
    from sklearn.metrics import roc_curve

    y = (labels == labels.max()).astype(int) if len(labels) else labels
    fig = _figure(5.5, 5.5)
    ax = fig.subplots()
    if len(np.unique(y)) == 2:
        series = [("legacy model", ref, "-"), ("port", port, "--")]
        if legacy_file is not None:
            series.append(("legacy file", legacy_file, ":"))
        for name, s, ls in series:
            keep = np.isfinite(s)
            fpr, tpr, _ = roc_curve(y[keep], s[keep])
            ax.plot(fpr, tpr, ls, lw=2, label=f"{name} (AUC {auc(y[keep], s[keep]):.4f})")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "one class only: no curve", ha="center")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=f"ROC ({split}, n={len(y)})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(save_figure(fig, out / f"{split}_roc.png").name)
    return written
