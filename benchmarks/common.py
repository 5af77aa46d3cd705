"""Shared pieces of the benchmark scenarios: shapes, inputs, the two models on the same weights,
the step functions and the machine description.

Everything here is importable without pytest so the memory subprocesses (``benchmarks.memory``)
build exactly what the timed scenarios build.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# --- shapes ------------------------------------------------------------------------------------
# legacy-tsa.md section 8 (the legacy default) and section 12 (production suspect-queue config)
DEFAULT = {
    "n_cat_features": 53, "n_num_features": 47, "n_classes": 2, "n_embedding": 1352, "seq_len": 51,
    "n_engineered_num_features": 0, "dim_embedding_table": 128, "dim_attn_feedforward": 64,
    "num_heads": 1, "dropout": 0.1, "n_layers_order": 6, "n_layers_feature": 6, "emb_tbl_use_bias": 1,
    "use_moe": True, "num_experts": 5, "use_time_seq": True,
}
PRODUCTION = {**DEFAULT, "dim_embedding_table": 64, "dim_attn_feedforward": 256, "n_layers_order": 6,
              "n_layers_feature": 4, "use_moe": False}
# a tiny configuration for `--quick` (checks the harness end to end in a minute or two)
SMALL = {
    "n_cat_features": 6, "n_num_features": 5, "n_classes": 2, "n_embedding": 40, "seq_len": 51,
    "n_engineered_num_features": 2, "dim_embedding_table": 8, "dim_attn_feedforward": 16,
    "num_heads": 2, "dropout": 0.1, "n_layers_order": 2, "n_layers_feature": 1, "emb_tbl_use_bias": 1,
    "use_moe": True, "num_experts": 3, "use_time_seq": True,
}
SMALL_PLAIN = {**SMALL, "use_moe": False}
SHAPES = {"default": DEFAULT, "production": PRODUCTION, "small": SMALL, "small_plain": SMALL_PLAIN}

WEIGHT_SEED = 1234  # the legacy model is built after torch.manual_seed(WEIGHT_SEED); the port copies it
DATA_SEED = 4321
SERVING_POLICY = "threshold"  # deterministic MoE policy of the port for serving scenarios


# --- inputs ------------------------------------------------------------------------------------
def _sequence(g: torch.Generator, B: int, cfg: dict, min_len: int = 1) -> dict[str, Tensor]:
    """Left-padded history: codes in 1..n_emb-n_num, times to last within ~1e7, position L last."""
    L, n_cat, n_num = cfg["seq_len"], cfg["n_cat_features"], cfg["n_num_features"]
    n_codes = cfg["n_embedding"] - n_num
    lengths = torch.randint(min_len, L + 1, (B,), generator=g)
    not_padded = (torch.arange(L)[None, :] >= (L - lengths)[:, None]).float()  # (B, L)
    x_cat = torch.randint(1, n_codes + 1, (B, L, n_cat), generator=g).float() * not_padded[..., None]
    x_num = torch.randn(B, L, n_num, generator=g) * not_padded[..., None]
    gaps = torch.rand(B, L, generator=g) * 2e5  # sums to at most ~1e7 over 51 steps
    t = gaps.flip(1).cumsum(1).flip(1) - gaps  # time from each transaction to the last one, last = 0
    time_seq = (t * not_padded)[..., None]
    kpm = torch.logical_not(torch.nn.functional.pad(not_padded, (0, 1), value=1.0).bool())  # (B, L+1)
    return {"x_cat": x_cat, "x_num": x_num, "time_seq": time_seq, "kpm": kpm}


def make_inputs(kind: str, cfg: dict, B: int, seed: int = DATA_SEED) -> dict[str, Any]:
    """(args, kwargs, y) of the legacy forward for ``kind``; the same tensors feed both models."""
    g = torch.Generator().manual_seed(seed + B)
    n_eng = cfg["n_engineered_num_features"]
    x_eng = torch.randn(B, n_eng, generator=g) if n_eng else None
    y = torch.randint(0, cfg["n_classes"], (B,), generator=g)
    if kind == "single":
        s = _sequence(g, B, cfg)
        args = (s["x_cat"], s["x_num"], x_eng, s["time_seq"])
        kwargs = {"key_padding_mask": s["kpm"]}
    else:
        cid = _sequence(g, B, cfg)
        ccid = _sequence(g, B, cfg)
        # about a quarter of the card histories hold only the current order (legacy gate rule)
        empty = torch.rand(B, generator=g) < 0.25
        keep = torch.zeros(cfg["seq_len"], dtype=torch.bool)
        keep[-1] = True
        for k in ("x_cat", "x_num", "time_seq"):
            ccid[k][empty] = ccid[k][empty] * keep[None, :, None]
        ccid["kpm"][empty] = torch.ones(cfg["seq_len"] + 1, dtype=torch.bool)
        ccid["kpm"][empty, -2:] = False
        args = (cid["x_cat"], cid["x_num"], cid["time_seq"], ccid["x_cat"], ccid["x_num"], ccid["time_seq"], x_eng)
        kwargs = {"key_padding_mask_cid": cid["kpm"], "key_padding_mask_ccid": ccid["kpm"]}
    return {"args": args, "kwargs": kwargs, "y": y}


def inputs_to(inputs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return {"args": tuple(mv(a) for a in inputs["args"]),
            "kwargs": {k: mv(v) for k, v in inputs["kwargs"].items()}, "y": mv(inputs["y"])}


# --- the models benchmarked ----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PortVariant:
    """One port configuration to benchmark beside the reference: a name (the ``impl`` of its scenarios and
    its summary column), the LightningModule options it is built with (on the reference's weights), and
    whether the benchmark wraps the module in ``torch.compile``."""

    name: str
    options: dict = field(default_factory=dict)
    compiled: bool = False


# Every scenario (train/eval, GPU, memory subprocesses) and the summary iterate over this table; ``port`` (the
# exact path, default options) must stay first: its FLOP count is the "useful work" of every FLOP/s figure.
# ``port_fast``: the opt-in fast path (``legacy_rng=False``; same function, other random draws).
PORT_VARIANTS: tuple[PortVariant, ...] = (
    PortVariant("port"),
    PortVariant("port_fast", {"legacy_rng": False}),
    PortVariant("port_fast_compiled", {"legacy_rng": False}, compiled=True),
)


def port_variant(name: str) -> PortVariant:
    for v in PORT_VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no port variant {name!r}; known: {[v.name for v in PORT_VARIANTS]}")


@dataclass(frozen=True)
class WholeRunScenario:
    """The scenario of a module whose one pytest-benchmark test records a whole side-by-side run
    (``bench_endpoint``, ``bench_cpu_bf16``): its pytest id and the part of the summary it fills."""

    part: str
    id: str


# --- models on the same weights ----------------------------------------------------------------
def build_reference(kind: str, cfg: dict) -> torch.nn.Module:
    import reference

    return reference.build_model(kind, seed=WEIGHT_SEED, use_mlp=0, **cfg)


def port_class(kind: str):
    from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification

    return TemporalSelfAttentionClassification if kind == "single" else DualSequenceTSA


def build_port(kind: str, cfg: dict, legacy_state: dict[str, Tensor] | None = None,
               moe_eval_policy: str = "random", **port_options) -> torch.nn.Module:
    """The port LightningModule carrying the legacy model's weights (legacy -> port weight map)."""
    from lightning_port.weight_map import legacy_to_port

    if legacy_state is None:
        legacy_state = build_reference(kind, cfg).state_dict()
    module = port_class(kind)(**cfg, moe_eval_policy=moe_eval_policy, **port_options)
    module.network.load_state_dict(legacy_to_port(legacy_state, module.config, kind))
    return module


def build_pair(kind: str, cfg: dict, which: str = "both", moe_eval_policy: str = "random", **port_options):
    """``which`` = reference | port | both | all | a port variant's name -> dict of models (every port on the
    reference's weights). ``both`` is the reference and ``port`` (with ``port_options``); ``all`` adds every
    :data:`PORT_VARIANTS` entry under its name (built with its own options)."""
    ref = build_reference(kind, cfg)
    out = {}
    if which in ("reference", "both", "all"):
        out["reference"] = ref
    if which in ("port", "both"):
        out["port"] = build_port(kind, cfg, ref.state_dict(), moe_eval_policy, **port_options)
    names = [v.name for v in PORT_VARIANTS] if which == "all" else [which] if which not in (
        "reference", "port", "both") else []
    for name in names:
        v = port_variant(name)
        out[name] = build_port(kind, cfg, ref.state_dict(), moe_eval_policy, **{**v.options, **port_options})
    return out


# --- steps ---------------------------------------------------------------------------------------
def compile_backend() -> str:
    """The ``torch.compile`` backend of compiled scenarios (``python -m benchmarks --compile-backend``)."""
    return os.environ.get("TSA_BENCH_COMPILE_BACKEND", "inductor")



@dataclass
class Runner:
    """One model, one input batch, one mode: ``step()`` runs a train step or an eval forward.

    ``autocast``: run forward and loss under ``torch.autocast(device, dtype)``; float16 training goes through a
    ``torch.amp.GradScaler`` like the legacy AMP loop (scale, backward, unscale + inf check, step, update).
    ``compiled``: ``torch.compile(model, backend=compile_backend())`` after ``torch._dynamo.reset()`` (a fresh
    compile per runner: the dynamo cache's recompile limit would otherwise silently fall back to eager after
    enough scenarios on one module). The first steps compile: time only after warm-up.
    Every step ends with ``torch.cuda.synchronize()`` on CUDA, so a timed step includes its kernels.
    """

    model: torch.nn.Module
    inputs: dict[str, Any]
    mode: str  # "train" | "eval"
    autocast: torch.dtype | None = None
    compiled: bool = False
    compile_backend: str | None = None

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.fn = self.model
        if self.compiled:
            import torch._dynamo as dynamo

            dynamo.reset()
            self.fn = torch.compile(self.model, backend=self.compile_backend or compile_backend())
        self.scaler = None
        if self.mode == "train":
            self.model.train()
            # legacy loop: Adam(lr 1e-5), CrossEntropyLoss(reduction="sum"), no clipping
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5, betas=(0.9, 0.999))
            self.loss = torch.nn.CrossEntropyLoss(reduction="sum")
            if self.autocast == torch.float16:
                self.scaler = torch.amp.GradScaler(self.device.type)
        else:
            self.model.eval()

    def _forward(self):
        a, kw = self.inputs["args"], self.inputs["kwargs"]
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                return self.fn(*a, **kw)[0]
        return self.fn(*a, **kw)[0]

    def step(self) -> None:
        if self.mode == "train":
            self.opt.zero_grad(set_to_none=True)
            scores = self._forward()
            loss = self.loss(scores.float(), self.inputs["y"])
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
        else:
            with torch.inference_mode():
                self._forward()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def count_flops(self) -> int:
        """Matmul-family FLOPs of one step (``torch.utils.flop_counter``: mm, bmm, addmm, baddbmm, attention,
        convolution; elementwise work is not counted), counted on the eager module (a train step runs once; an
        eval forward runs once with autograd on, because the counter's module tracker hooks every input that
        requires grad, which inference mode forbids; the FLOPs are the same)."""
        from torch.utils.flop_counter import FlopCounterMode

        fn, self.fn = self.fn, self.model
        try:
            with FlopCounterMode(display=False) as counter, plain_computation():
                if self.mode == "train":
                    self.step()
                else:
                    self._forward()
            return int(counter.get_total_flops())
        finally:
            self.fn = fn


@contextlib.contextmanager
def plain_computation():
    """The port computing every position (no deduplication of empty history positions, see
    ``lightning_port.nn.stacks.DEDUPE_EMPTY_POSITIONS``): the FLOP count of the function itself -- the useful
    work every implementation is credited with in the FLOP/s figures, whatever it skips."""
    from lightning_port.nn import stacks

    saved = stacks.DEDUPE_EMPTY_POSITIONS
    stacks.DEDUPE_EMPTY_POSITIONS = False
    try:
        yield
    finally:
        stacks.DEDUPE_EMPTY_POSITIONS = saved


# --- the machine's matmul peak, measured in the run ---------------------------------------------------
def matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.float32, n: int | None = None,
                reps: int = 5) -> dict[str, Any]:
    """Achievable dense matmul throughput: the best of ``reps`` timed ``n x n @ n x n`` products (2n³ FLOPs
    each) at the current thread count, after two warm-up products; synchronised on CUDA. The reference
    point of every "% of peak" figure (fp32 on CPU; fp32, bf16 and fp16 on CUDA, where fp32 means IEEE fp32:
    TF32 stays off, torch's default)."""
    dev = torch.device(device)
    if n is None:
        n = 8192 if dev.type == "cuda" else 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"device": str(dev), "dtype": str(dtype).removeprefix("torch."), "n": n, "reps": reps,
            "threads": torch.get_num_threads(), "seconds": best, "flops_per_s": 2.0 * n**3 / best,
            "method": f"best of {reps} {n}x{n} @ {n}x{n} products"}


# --- environment -----------------------------------------------------------------------------------
def device() -> torch.device:
    forced = os.environ.get("TSA_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


class Stopwatch:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
