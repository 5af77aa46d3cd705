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
from dataclasses import dataclass
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
    """``which`` = reference | port | both -> dict of models (the port always on the reference weights)."""
    ref = build_reference(kind, cfg)
    out = {}
    if which in ("reference", "both"):
        out["reference"] = ref
    if which in ("port", "both"):
        out["port"] = build_port(kind, cfg, ref.state_dict(), moe_eval_policy, **port_options)
    return out


# --- steps ---------------------------------------------------------------------------------------
@dataclass
class Runner:
    """One model, one input batch, one mode: ``step()`` runs a train step or an eval forward."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    mode: str  # "train" | "eval"
    autocast: torch.dtype | None = None
    compiled: bool = False

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.fn = self.model
        if self.compiled:
            self.fn = torch.compile(self.model)
        if self.mode == "train":
            self.model.train()
            # legacy loop: Adam(lr 1e-5), CrossEntropyLoss(reduction="sum"), no clipping
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5, betas=(0.9, 0.999))
            self.loss = torch.nn.CrossEntropyLoss(reduction="sum")
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
            self.loss(scores.float(), self.inputs["y"]).backward()
            self.opt.step()
        else:
            with torch.inference_mode():
                self._forward()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


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
