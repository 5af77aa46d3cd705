"""``reports/benchmark/summary.md`` from the pytest-benchmark JSON: a table per scenario with
reference, port (and every other port variant) and their ratio, achieved FLOP/s against the matmul peak
measured in the same run, the targets of issues 8 and 12, the GPU table, the machine, torch version and
threads."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from benchmarks import common

TARGET_TRAIN_SPEEDUP = 10.0
TARGET_MEM_RATIO = 0.25
TARGET_ONNX_LATENCY_RATIO = 1 / 3
# issue 12
TARGET_EXACT_SPEEDUP_256 = 2.0
TARGET_FAST_SPEEDUP_256 = 3.0
TARGET_FAST_SPEEDUP_1024 = 3.5
TARGET_FAST_PEAK_SHARE = 0.60
TARGET_GPU_SPEEDUP = 10.0
FAST_VARIANT = "port_fast"  # the fast path's name in common.PORT_VARIANTS
FAST_COMPILED_VARIANT = "port_fast_compiled"
GPU_TARGET_BATCH = 4096


def peaks(data: dict) -> dict[str, dict]:
    """The matmul peaks measured in the run (``machine_info.tsa_matmul_peaks``), by dtype name."""
    return dict((data.get("machine_info") or {}).get("tsa_matmul_peaks") or {})


def _peak_share(row: dict | None, peak: dict | None, flops: float | None = None) -> float | None:
    """FLOP/s of ``row`` (its own count, or ``flops`` per step) over the measured peak."""
    if not row or not peak:
        return None
    f = flops if flops is not None else row.get("flops_per_step")
    return (f / row["mean"]) / peak["flops_per_s"] if f else None


def _fmt_flops(row: dict | None, peak: dict | None, flops: float | None = None) -> str:
    if not row:
        return "—"
    f = flops if flops is not None else row.get("flops_per_step")
    if not f:
        return "—"
    rate = f / row["mean"]
    share = _peak_share(row, peak, f)
    unit, div = ("TFLOP/s", 1e12) if rate >= 1e12 else ("GFLOP/s", 1e9) if rate >= 1e9 else ("MFLOP/s", 1e6)
    return f"{rate / div:.1f} {unit}" + (f" ({share:.1%})" if share is not None else "")


def read_skips(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rows(data: dict) -> list[dict]:
    out = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        st = b["stats"]
        info.update(mean=st["mean"], stddev=st["stddev"], min=st["min"], median=st["median"], rounds=st["rounds"],
                    name=b["name"])
        out.append(info)
    return out


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _mem_pair(ref: dict | None, port: dict | None) -> tuple[float | None, float | None, str]:
    """Peaks compared by the same method: fresh-process for both when both have it, else in-process."""
    if ref and port and ref.get("mem_peak_mib") is not None and port.get("mem_peak_mib") is not None:
        return ref["mem_peak_mib"], port["mem_peak_mib"], "fresh process"
    r = ref.get("mem_inprocess_mib") if ref else None
    p = port.get("mem_inprocess_mib") if port else None
    if r is None and ref:
        r = ref.get("mem_peak_mib")
    if p is None and port:
        p = port.get("mem_peak_mib")
    return r, p, "in-process" if (r is not None or p is not None) else ""


def _key(r: dict) -> tuple:
    return (r.get("scenario"), r.get("kind"), r.get("shape"), r.get("mode"), r.get("batch"), r.get("precision"),
            r.get("compiled"))


def index(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    idx: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        idx[_key(r)][r["impl"]] = r
    return idx


def _skip_reason(skips: list[dict], kind, shape, mode, batch, impl) -> str | None:
    frag = f"{kind}-{shape}-{mode}-b{batch}-{impl}"
    for s in skips:
        if frag in s["nodeid"] or s["reason"].startswith(frag):
            return s["reason"].split(": ", 1)[-1]
    return None


def slower(rows: list[dict]) -> list[tuple[tuple, float, dict]]:
    """(key, ratio ref/port, port row) for every scenario where the port's mean is above the reference's."""
    out = []
    for key, impls in index(rows).items():
        ref, port = impls.get("reference"), impls.get("port")
        if ref and port and port["mean"] > ref["mean"]:
            out.append((key, ref["mean"] / port["mean"], port))
        onnx = impls.get("port_onnx")
        if ref and onnx and onnx["mean"] > ref["mean"]:
            out.append((key, ref["mean"] / onnx["mean"], onnx))
    return out


def profile_slower(data: dict, quick: bool = False, limit: int = 4) -> dict[str, str]:
    """torch.profiler top ops (self CPU time) of one port step, for scenarios where the port is slower."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    found = sorted(slower(_rows(data)), key=lambda t: (t[2].get("batch") or 0))
    out: dict[str, str] = {}
    for _key, _ratio, row in found:
        if len(out) >= limit or row.get("impl") != "port" or row.get("scenario") not in ("train_eval", "latency"):
            continue
        kind, shape, mode, batch = row["kind"], row["shape"], row["mode"], row["batch"]
        threads = torch.get_num_threads()
        try:
            if row["scenario"] == "latency":
                torch.set_num_threads(1)
            policy = common.SERVING_POLICY if row["scenario"] == "latency" else "random"
            pair = common.build_pair(kind, common.SHAPES[shape], moe_eval_policy=policy)
            tables = []
            for impl in ("port", "reference"):
                runner = common.Runner(pair[impl], common.make_inputs(kind, common.SHAPES[shape], batch), mode)
                runner.step()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    runner.step()
                tables.append(f"{impl}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8,
                                                                        max_name_column_width=36))
            out[row["name"]] = "\n".join(tables)
        except Exception as exc:  # a hint only
            out[row["name"]] = f"profiling failed: {type(exc).__name__}: {exc}"
        finally:
            torch.set_num_threads(threads)
    return out


def render(data: dict, skips: list[dict], wall_s: float, quick: bool = False, profiles: dict | None = None,
           stamp: str = "", argv: list[str] | None = None, checkpointing: list[dict] | None = None) -> str:
    rows = _rows(data)
    idx = index(rows)
    m = common.machine_info()
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    L: list[str] = []
    L.append("# Benchmarks: reference (legacy) vs port" + (" — QUICK (tiny shapes, harness check only)" if quick else ""))
    L.append("")
    L.append(f"Run {stamp}, `python -m benchmarks {' '.join(argv or [])}`, wall time {wall_s / 60:.1f} min.")
    L.append("")
    L.append(f"- Machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
             f"load average at the end {m.get('load_average_1m', '?')}; GPU: {m['cuda'] or 'none'}")
    L.append(f"- torch {m['torch']}, onnxruntime {m['onnxruntime']}, Python {m['python']}; torch threads: "
             f"{', '.join(str(t) for t in threads) or m['torch_threads']} (latency scenarios: 1)")
    L.append("- Same weights (the legacy model built with seed "
             f"{common.WEIGHT_SEED}, mapped to the port by `weight_map.legacy_to_port`) and the same generated inputs "
             "(codes in range, left padding, times within ~1e7). Reference and port of a scenario run back to back; "
             "only ratios carry from run to run on a shared machine.")
    L.append("- Ratio columns: speedup = reference time / port time (> 1: port faster); memory = port peak / "
             "reference peak (< 1: port smaller).")
    pk = peaks(data)
    if pk:
        L.append("- Matmul peak measured in this run (dense n x n products at the run's thread count; every \"% of "
                 "peak\" below is against it): " + "; ".join(
                     f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s ({v['method']}, {v['threads']} threads, {v['device']})"
                     for k, v in pk.items()))
    L.append("- FLOP/s: matmul-family FLOPs of one step (`torch.utils.flop_counter`: mm, bmm, addmm, baddbmm, "
             "attention; elementwise work not counted) / mean step time. The port's count is the useful work; "
             "the reference's FLOP/s column divides that same count by the reference's time (its own count adds "
             "the dense one-hot MoE dispatch).")
    variants = [v.name for v in common.PORT_VARIANTS if v.name != "port"]
    if variants:
        L.append("- Port variants beside the exact path (`benchmarks.common.PORT_VARIANTS`): " + ", ".join(
            f"`{v.name}` {v.options or ''}{' compiled' if v.compiled else ''}" for v in common.PORT_VARIANTS
            if v.name != "port"))
    L.append("")

    # ---- targets
    L.append("## Targets (issue 8)")
    L.append("")
    L.append("| target | measured | needed | status |")
    L.append("|---|---|---|---|")
    big = "small" if quick else "default"
    bmax = max([r["batch"] for r in rows if r.get("scenario") == "train_eval"] or [0])
    t = idx.get(("train_eval", "single", big, "train", bmax, None, None), {})
    if "reference" in t and "port" in t:
        sp = t["reference"]["mean"] / t["port"]["mean"]
        L.append(f"| {big}-shape train step, batch {bmax}: speedup | {sp:.1f}x ({_fmt_s(t['reference']['mean'])} → "
                 f"{_fmt_s(t['port']['mean'])}) | ≥ {TARGET_TRAIN_SPEEDUP:.0f}x | "
                 f"{'met' if sp >= TARGET_TRAIN_SPEEDUP else 'NOT met'} |")
    else:
        L.append(f"| {big}-shape train step, batch {bmax}: speedup | not measured | ≥ 10x | — |")
    for mode in ("train", "eval"):
        t = idx.get(("train_eval", "single", big, mode, bmax, None, None), {})
        r, p, how = _mem_pair(t.get("reference"), t.get("port"))
        if r and p is not None:
            ratio = p / r
            L.append(f"| {big}-shape {mode}, batch {bmax}: port peak / reference peak ({how}) | {ratio:.3f} "
                     f"({p:.0f} / {r:.0f} MiB) | ≤ 0.25 | {'met' if ratio <= TARGET_MEM_RATIO else 'NOT met'} |")
        else:
            L.append(f"| {big}-shape {mode}, batch {bmax}: memory ratio | not measured | ≤ 0.25 | — |")
    for rec in checkpointing or []:
        t = idx.get(("train_eval", "single", big, "train", rec["batch"], None, None), {})
        r, _, how = _mem_pair(t.get("reference"), t.get("port"))
        if "peak_mib" not in rec:
            L.append(f"| {big}-shape train, batch {rec['batch']}, port with `activation_checkpointing=True` | "
                     f"not measured ({rec.get('error', '?')}) | ≤ 0.25 | — |")
        elif r:
            ratio = rec["peak_mib"] / r
            L.append(f"| {big}-shape train, batch {rec['batch']}: port with `activation_checkpointing=True` / reference "
                     f"| {ratio:.3f} ({rec['peak_mib']:.0f} / {r:.0f} MiB) | ≤ 0.25 | "
                     f"{'met' if ratio <= TARGET_MEM_RATIO else 'NOT met'} |")
        else:
            L.append(f"| {big}-shape train, batch {rec['batch']}: port with `activation_checkpointing=True` | "
                     f"{rec['peak_mib']:.0f} MiB; reference not measured (see skips) | ≤ 0.25 | — |")
    prod = "small_plain" if quick else "production"
    t = idx.get(("latency", "single", prod, "eval", 1, None, None), {})
    if "reference" in t and "port_onnx" in t:
        ratio = t["port_onnx"]["mean"] / t["reference"]["mean"]
        L.append(f"| {prod}-shape batch-1 latency, 1 thread: ONNX Runtime / legacy eager | {ratio:.3f} "
                 f"({_fmt_s(t['port_onnx']['mean'])} / {_fmt_s(t['reference']['mean'])}) | ≤ 0.333 | "
                 f"{'met' if ratio <= TARGET_ONNX_LATENCY_RATIO else 'NOT met'} |")
    else:
        L.append(f"| {prod}-shape batch-1 latency: ONNX / legacy | not measured | ≤ 0.333 | — |")
    sl = slower(rows)
    if sl:
        worst = min(sl, key=lambda x: x[1])
        L.append(f"| port no slower in any scenario | slower in {len(sl)} scenario(s); worst "
                 f"{worst[2]['name'].split('[')[-1].rstrip(']')} at {1 / worst[1]:.2f}x the reference's time | "
                 "none slower | NOT met |")
    else:
        L.append("| port no slower in any scenario | none slower | none slower | met |")
    L.append("")

    L += _issue12_targets(idx, pk, big, quick)

    # ---- train / eval tables
    groups: dict[str, list] = defaultdict(list)
    for key, impls in idx.items():
        if key[0] == "train_eval":
            groups[f"{key[3]} step, {key[1]}, {key[2]} shape" if key[3] == "train" else
                   f"eval forward, {key[1]}, {key[2]} shape"].append((key, impls))
    if groups:
        L.append("## Train step (forward + backward + Adam) and eval forward")
        L.append("")
    for g in sorted(groups):
        L.append(f"### {g}")
        L.append("")
        fp32 = pk.get("float32")
        extra = [v for v in variants if any(v in impls for _, impls in groups[g])]
        L.append("| batch | reference | port | speedup | ref samples/s | port samples/s | ref FLOP/s (% peak) | "
                 "port FLOP/s (% peak) | ref peak MiB | port peak MiB | memory port/ref | "
                 + "".join(f"{v} (speedup; FLOP/s) | " for v in extra) + "note |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra) + "---|")
        for key, impls in sorted(groups[g], key=lambda kv: kv[0][4]):
            ref, port = impls.get("reference"), impls.get("port")
            useful = port.get("flops_per_step") if port else None
            kind, shape, mode, batch = key[1], key[2], key[3], key[4]
            sp = ref["mean"] / port["mean"] if ref and port else None
            r, p, how = _mem_pair(ref, port)
            note = []
            if ref is None:
                note.append("reference skipped: " + (_skip_reason(skips, kind, shape, mode, batch, "reference") or "?"))
            if ref and ref.get("rounds") == 1:
                note.append("reference: 1 round")
            if how == "in-process" and (r or p):
                note.append("memory in-process")
            cells = []
            for v in extra:
                row = impls.get(v)
                cells.append("—" if row is None else
                             f"{_fmt_s(row['mean'])} ({_fmt(ref['mean'] / row['mean'] if ref else None, '.2f', 'x')}; "
                             f"{_fmt_flops(row, fp32)}) | ")
            L.append(f"| {batch} | {_fmt_s(ref and ref['mean'])} | {_fmt_s(port and port['mean'])} | "
                     f"{_fmt(sp, '.2f', 'x')} | {_fmt(ref and ref.get('samples_per_s'), '.0f')} | "
                     f"{_fmt(port and port.get('samples_per_s'), '.0f')} | {_fmt_flops(ref, fp32, useful)} | "
                     f"{_fmt_flops(port, fp32)} | {_fmt(r, '.0f')} | {_fmt(p, '.0f')} | "
                     f"{_fmt(p / r if (r and p is not None) else None, '.3f')} | {''.join(cells)}{'; '.join(note)} |")
        L.append("")

    # ---- latency
    lat = [(k, v) for k, v in idx.items() if k[0] == "latency"]
    if lat:
        L.append("## Online scoring latency: batch 1, one thread")
        L.append("")
        L.append(f"Port with MoE eval policy `{common.SERVING_POLICY}` (deterministic; the legacy model flips coins). "
                 "Mean (median) per call.")
        L.append("")
        L.append("| model | legacy eager | port eager | port ONNX Runtime | port/legacy | ONNX/legacy |")
        L.append("|---|---|---|---|---|---|")
        for key, impls in sorted(lat):
            ref, port, onnx = impls.get("reference"), impls.get("port"), impls.get("port_onnx")
            cell = lambda r: "—" if r is None else f"{_fmt_s(r['mean'])} ({_fmt_s(r['median'])})"  # noqa: E731
            L.append(f"| {key[1]} {key[2]} | {cell(ref)} | {cell(port)} | {cell(onnx)} | "
                     f"{_fmt(port['mean'] / ref['mean'] if ref and port else None, '.3f')} | "
                     f"{_fmt(onnx['mean'] / ref['mean'] if ref and onnx else None, '.3f')} |")
        L.append("")

    L += render_serving(rows)  # issue 13 (bench_latency.py): all four engines, FLOP/s
    L += render_endpoint(rows)  # issue 19 (bench_endpoint.py): the legacy handler vs the port's endpoint
    L += render_cpu_bf16(rows)  # issue 21 (bench_cpu_bf16.py): fp32 reference vs the port in fp32 and bf16 on the CPU

    # ---- GPU
    L += _gpu_section(rows, idx, pk)

    # ---- slower / skipped / profiles
    L.append("## Where the port is slower")
    L.append("")
    if not sl:
        L.append("Nowhere: the port's mean time is at or below the reference's in every measured scenario.")
    else:
        L.append("Mean-time ratio, and the ratio of the fastest rounds (min), which is less sensitive to other "
                 "load on a shared machine; a port slower by mean but not by min is likely noise.")
        L.append("")
        for key, ratio, row in sorted(sl, key=lambda x: x[1]):
            ref = idx[key].get("reference")
            by_min = row["min"] / ref["min"] if ref else None
            L.append(f"- `{row['name'].split('[')[-1].rstrip(']')}`: {1 / ratio:.2f}x the reference's mean time "
                     f"({_fmt_s(row['mean'])} vs {_fmt_s(row['mean'] * ratio)}); by min {_fmt(by_min, '.2f', 'x')}"
                     + (" (likely noise)" if by_min is not None and by_min <= 1 else ""))
    L.append("")
    for name, table in (profiles or {}).items():
        L.append(f"Profile (one step, torch.profiler, top ops by self CPU time) for `{name}`:")
        L.append("")
        L.append("```")
        L.append(table.rstrip())
        L.append("```")
        L.append("")
    L.append("## Skipped scenarios")
    L.append("")
    if not skips:
        L.append("None.")
    for s in skips:
        L.append(f"- `{s['nodeid'].split('[')[-1].rstrip(']')}`: {s['reason']}")
    L.append("")
    L.append("Raw numbers: the pytest-benchmark JSON next to this file (also autosaved under `storage/` for "
             "`--benchmark-compare`).")
    return "\n".join(L) + "\n"


def _issue12_targets(idx: dict, pk: dict, big: str, quick: bool) -> list[str]:
    """The targets of issue 12 (side by side in one run), measured where the run has the needed rows."""
    L = ["## Targets (issue 12)", "", "| target | measured | needed | status |", "|---|---|---|---|"]
    b256, b1024 = (8, 32) if quick else (256, 1024)

    def speedup_row(label, batch, impl, need):
        t = idx.get(("train_eval", "single", big, "train", batch, None, None), {})
        ref, row = t.get("reference"), t.get(impl)
        if row is None:
            return f"| {label} | not measured (`{impl}` not in this run) | ≥ {need:g}x | — |"
        if ref is None:
            return f"| {label} | reference not measured (skipped: see below) | ≥ {need:g}x | — |"
        sp = ref["mean"] / row["mean"]
        return (f"| {label} | {sp:.2f}x ({_fmt_s(ref['mean'])} → {_fmt_s(row['mean'])}) | ≥ {need:g}x | "
                f"{'met' if sp >= need else 'NOT met'} |")

    L.append(speedup_row(f"{big}-shape train step, batch {b256}, 2 threads: exact path (`port`)", b256, "port",
                         TARGET_EXACT_SPEEDUP_256))
    L.append(speedup_row(f"{big}-shape train step, batch {b256}: fast path (`{FAST_VARIANT}`)", b256, FAST_VARIANT,
                         TARGET_FAST_SPEEDUP_256))
    L.append(speedup_row(f"{big}-shape train step, batch {b1024}: fast path", b1024, FAST_VARIANT,
                         TARGET_FAST_SPEEDUP_1024))
    t = idx.get(("train_eval", "single", big, "train", b256, None, None), {})
    fp32 = pk.get("float32")
    for impl in (FAST_VARIANT, "port"):
        row = t.get(impl)
        share = _peak_share(row, fp32)
        if share is None:
            L.append(f"| `{impl}` matmul FLOP/s at batch {b256} / measured fp32 peak | not measured | "
                     f"≥ {TARGET_FAST_PEAK_SHARE:.0%} (fast path) | — |")
        else:
            status = ("met" if share >= TARGET_FAST_PEAK_SHARE else "NOT met") if impl == FAST_VARIANT else "(exact path, for reference)"
            L.append(f"| `{impl}` matmul FLOP/s at batch {b256} / measured fp32 peak | {share:.1%} "
                     f"({_fmt_flops(row, fp32)}) | ≥ {TARGET_FAST_PEAK_SHARE:.0%} (fast path) | {status} |")
    gb = 8 if quick else GPU_TARGET_BATCH
    gshape = "small" if quick else "default"
    base = idx.get(("gpu", "single", gshape, "train", gb, "fp32", False), {}).get("reference")
    fast = None
    for impl, compiled in ((FAST_COMPILED_VARIANT, True), (FAST_VARIANT, True)):
        fast = fast or idx.get(("gpu", "single", gshape, "train", gb, "bf16", compiled), {}).get(impl)
    if base and fast:
        sp = base["mean"] / fast["mean"]
        useful = (idx.get(("gpu", "single", gshape, "train", gb, "bf16", False), {}).get("port") or {}).get(
            "flops_per_step") or fast.get("flops_per_step")
        mfu = _peak_share(fast, pk.get("bfloat16"), useful)
        L.append(f"| GPU: compiled bf16 fast path vs fp32 eager reference, {gshape} train, batch {gb} | {sp:.1f}x; "
                 f"MFU {_fmt(mfu * 100 if mfu is not None else None, '.1f', '%')} of the measured bf16 peak | "
                 f"≥ {TARGET_GPU_SPEEDUP:g}x (H200) | {'met' if sp >= TARGET_GPU_SPEEDUP else 'NOT met'} |")
    else:
        why = "no GPU rows in this run" if not base else f"no compiled bf16 `{FAST_VARIANT}` rows"
        L.append(f"| GPU: compiled bf16 fast path vs fp32 eager reference, batch {gb} | not measured ({why}) | "
                 f"≥ {TARGET_GPU_SPEEDUP:g}x (H200) | — |")
    L.append("")
    return L


def _gpu_section(rows: list[dict], idx: dict, pk: dict) -> list[str]:
    gpu = [r for r in rows if r.get("scenario") == "gpu"]
    L = ["## GPU scenarios: fp32 / bf16 / fp16, eager / torch.compile", ""]
    if not gpu:
        L += ["Not run: no CUDA device (`python -m benchmarks --device cuda` on a GPU machine; on CPU the same "
              "scenarios run only with `--quick`).", ""]
        return L
    devices = sorted({r.get("device_name") or r.get("device") for r in gpu})
    backends = sorted({r.get("compile_backend") for r in gpu if r.get("compile_backend")})
    L.append(f"Device: {', '.join(str(d) for d in devices)}; compile backend: {', '.join(backends) or '—'}. "
             "Speedup = the reference's fp32 eager time / this row's time (same model, mode and batch). Useful "
             "FLOP/s = the exact port's FLOP count / time; MFU = useful FLOP/s / the matmul peak of the row's dtype "
             "measured in this run (fp32 rows: IEEE fp32, TF32 off). Datasheet = the same over the vendor's dense "
             "peak. Peak MiB = `torch.cuda.max_memory_allocated` of one step above the allocation before it "
             "(on CPU: resident-set high-water mark).")
    L.append("")
    L.append("| model, mode, batch | implementation | precision | compiled | time | samples/s | speedup vs ref fp32 "
             "eager | useful FLOP/s | MFU (measured peak) | MFU (datasheet) | peak MiB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    dtype_name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    order = {"reference": 0, **{v.name: i + 1 for i, v in enumerate(common.PORT_VARIANTS)}}
    by_model: dict[tuple, list[dict]] = defaultdict(list)
    for r in gpu:
        by_model[(r["kind"], r["shape"], r["mode"], r["batch"])].append(r)
    for (kind, shape, mode, batch), group in sorted(by_model.items()):
        base = idx.get(("gpu", kind, shape, mode, batch, "fp32", False), {}).get("reference")
        port32 = idx.get(("gpu", kind, shape, mode, batch, "fp32", False), {}).get("port")
        useful = port32.get("flops_per_step") if port32 else None
        for r in sorted(group, key=lambda r: (order.get(r["impl"], 99), r["precision"], r["compiled"])):
            peak = pk.get(dtype_name.get(r["precision"], ""))
            f = useful or r.get("flops_per_step")
            rate = f / r["mean"] if f else None
            mfu = rate / peak["flops_per_s"] if (rate and peak) else None
            sheet = rate / r["datasheet_peak_flops"] if (rate and r.get("datasheet_peak_flops")) else None
            L.append(f"| {kind} {shape} {mode} b{batch} | {r['impl']} | {r['precision']} | "
                     f"{'yes' if r['compiled'] else 'no'} | {_fmt_s(r['mean'])} | {_fmt(r.get('samples_per_s'), '.0f')} | "
                     f"{_fmt(base['mean'] / r['mean'] if base else None, '.2f', 'x')} | "
                     f"{_fmt_flops(r, None, f)} | "
                     f"{_fmt(mfu * 100 if mfu is not None else None, '.1f', '%')} | "
                     f"{_fmt(sheet * 100 if sheet is not None else None, '.1f', '%')} | "
                     f"{_fmt(r.get('mem_peak_mib'), '.0f')} |")
    L.append("")
    return L


# ---- serving (issue 13; benchmarks/bench_latency.py) ----------------------------------------------------
SERVING_IMPLS = (("reference", "legacy eager"), ("port", "port eager"), ("port_onnx", "ONNX fp32"),
                 ("port_onnx_int8", "ONNX int8"))


def render_serving(rows: list[dict]) -> list[str]:
    """Batch-1 latency (1 thread) and batch-1024 throughput (2 threads) of the four serving engines: mean time,
    ratio to the legacy eager model, and achieved FLOP/s (the eager port's FlopCounterMode count / time)."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("scenario") in ("latency", "throughput") and r.get("flops"):
            groups[(r["scenario"], r["kind"], r["shape"], r["batch"], r.get("threads"))][r["impl"]] = r
    if not groups:
        return []
    L = ["## Serving: batch-1 latency and batch-scoring throughput, four engines", "",
         "Mean per call; in brackets the ratio to the legacy eager model's mean (< 1: faster) and the achieved "
         "GFLOP/s (the eager port's FLOP count at that batch / the engine's time). ONNX files as `tsa-export-onnx` "
         "writes them (fp32: optimised offline at `extended`; int8: `--quantize int8`).", "",
         "| scenario | threads | GFLOP per call | " + " | ".join(name for _, name in SERVING_IMPLS) + " | int8 max / p99.9 |Δscore| |",
         "|---|---|---|" + "---|" * len(SERVING_IMPLS) + "---|"]
    for key in sorted(groups, key=lambda k: (k[0] != "latency", k[1], k[2])):
        scenario, kind, shape, batch, threads = key
        impls = groups[key]
        ref = impls.get("reference")
        flops = next(iter(impls.values()))["flops"]
        cells = []
        for impl, _ in SERVING_IMPLS:
            r = impls.get(impl)
            if r is None:
                cells.append("—")
                continue
            ratio = f"{r['mean'] / ref['mean']:.3f}, " if ref else ""
            cells.append(f"{_fmt_s(r['mean'])} ({ratio}{flops / r['mean'] / 1e9:.1f} GFLOP/s)")
        q = impls.get("port_onnx_int8") or {}
        dev = (f"{float(q['int8_max_abs_dev']):.1e} / {float(q['int8_p999_abs_dev']):.1e}"
               if q.get("int8_max_abs_dev") else "—")
        L.append(f"| {kind} {shape}, batch {batch} | {threads} | {flops / 1e9:.3f} | " + " | ".join(cells) + f" | {dev} |")
    L.append("")
    return L


def render_cpu_bf16(rows: list[dict]) -> list[str]:
    """The CPU bf16 run of ``bench_cpu_bf16.py`` (its ``extra_info["cpu_bf16"]``): peaks, train and eval tables, the
    profile of the fast path's bf16 step and the issue-21 targets."""
    from benchmarks import bench_cpu_bf16

    found = [r for r in rows if r.get("scenario") == "cpu_bf16" and r.get("cpu_bf16")]
    if not found:
        return []
    return (["## CPU bf16 (issue 21): the fp32 reference vs the port in fp32 and under torch.autocast(bfloat16)", ""]
            + bench_cpu_bf16.render(found[-1]["cpu_bf16"]) + [""])


def render_endpoint(rows: list[dict]) -> list[str]:
    """The endpoint run of ``bench_endpoint.py`` (its ``extra_info["endpoint"]``): in-process and HTTP tables and the
    issue-19 targets."""
    from benchmarks import bench_endpoint

    found = [r for r in rows if r.get("scenario") == "endpoint" and r.get("endpoint")]
    if not found:
        return []
    res = found[-1]["endpoint"]
    return (["## Endpoint (issue 19): the legacy handler vs the port's endpoint, request in, three strings out", "",
             "The reproduced legacy handler (`reference/pytorch_inference_handler.py`) and "
             "`lightning_port.serving.inference` (ONNX Runtime and eager backends) on the recorded fixture requests that "
             "score, batch 1, one torch thread, interleaved rounds; over HTTP the legacy handler behind a stdlib "
             "wrapper (`benchmarks/legacy_http.py`) and `tsa-serve` on 127.0.0.1 (benchmarks/bench_endpoint.py). "
             f"pytest-benchmark's own rounds (mean {_fmt_s(found[-1]['mean'])}) time the legacy handler in-process.", ""]
            + bench_endpoint.render(res) + [""])
