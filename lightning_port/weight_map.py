"""The legacy <-> port ``state_dict`` mapping: ONE table of rows plus checks.

Each row is ``(legacy pattern, port pattern, transform)``. Patterns contain placeholders:
``{i}`` a layer index (same on both sides), ``{p}`` a parameter leaf (``weight``/``bias``), and
``{fa}`` a feature-aggregation layer (legacy ``encoder.{0,2,..,10}`` <-> port ``layers.{0..5}``).
A port pattern of ``DROPPED`` marks a legacy parameter the port does not carry (never used in the
legacy forward); ``DUPLICATE`` rows are extra legacy keys of one shared tensor (the shared tables).
All transforms are currently the identity; the column exists so that a layout change is one row.

Both directions check key sets (missing and unexpected keys) and shapes against the network that
``config`` describes, and raise :class:`WeightMapError` naming every offending key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import TSAConfig

DROPPED = "<dropped>"

Transform = Callable[[Tensor], Tensor] | None


class WeightMapError(ValueError):
    """A state_dict does not fit the mapping (missing/unexpected keys, shape mismatches)."""


@dataclass(frozen=True)
class Row:
    legacy: str
    port: str  # a port pattern, DROPPED, or "=<port key pattern>" for a duplicate of a shared tensor
    transform: Transform = None
    inverse: Transform = None

    @property
    def dropped(self) -> bool:
        return self.port == DROPPED

    @property
    def duplicate(self) -> bool:
        return self.port.startswith("=")


_FIELDS = {  # placeholder -> (legacy regex, port regex, legacy->port, port->legacy)
    "i": (r"\d+", r"\d+", str, str),
    "p": (r"weight|bias", r"weight|bias", str, str),
    "fa": (r"0|2|4|6|8|10", r"[0-5]", lambda s: str(int(s) // 2), lambda s: str(int(s) * 2)),
}


def _order_rows(legacy: str, port: str, table: str) -> list[Row]:
    L, P = legacy, port
    rows = [
        Row(f"{L}.dummy_order", f"{P}.dummy_token"),
        Row(f"{L}.embedding.weight", f"={table}"),
        Row(f"{L}.emb_tbl_bias", DROPPED),  # never used in the legacy forward
        Row(f"{L}.layer_norm_feature.{{p}}", f"{P}.input_norm.{{p}}"),
        Row(f"{L}.layer_norm.{{p}}", f"{P}.token_norm.{{p}}"),
        Row(f"{L}.feature_aggregation_cat.encoder.{{fa}}.{{p}}", f"{P}.aggregate_cat.layers.{{fa}}.{{p}}"),
        Row(f"{L}.feature_aggregation_num.encoder.{{fa}}.{{p}}", f"{P}.aggregate_num.layers.{{fa}}.{{p}}"),
    ]
    return rows + _layer_rows(f"{L}.layer_stack", f"{P}.layers")


def _layer_rows(legacy: str, port: str) -> list[Row]:
    L, P = legacy + ".{i}", port + ".{i}"
    return [
        Row(f"{L}.multi_attn.in_proj_weight", f"{P}.attn.in_proj_weight"),
        Row(f"{L}.multi_attn.in_proj_bias", f"{P}.attn.in_proj_bias"),
        Row(f"{L}.multi_attn.out_proj.{{p}}", f"{P}.attn.out_proj.{{p}}"),
        Row(f"{L}.layer_norm1.{{p}}", f"{P}.norm1.{{p}}"),
        Row(f"{L}.layer_norm2.{{p}}", f"{P}.norm2.{{p}}"),
        Row(f"{L}.feedforward.gate.w_gating", f"{P}.ff.w_gate"),
        Row(f"{L}.feedforward.experts.w1", f"{P}.ff.w1"),
        Row(f"{L}.feedforward.experts.w2", f"{P}.ff.w2"),
        Row(f"{L}.feedforward.0.{{p}}", f"{P}.ff.fc1.{{p}}"),
        Row(f"{L}.feedforward.3.{{p}}", f"{P}.ff.fc2.{{p}}"),
    ]


def _feature_rows() -> list[Row]:
    return [
        Row("feature_attention.embedding.weight", "=embedding.weight"),
        Row("feature_attention.embedding_engineered.weight", "=embedding_engineered.weight"),
        Row("feature_attention.emb_tbl_bias", "features.feature_bias"),
        Row("feature_attention.engineered_emb_tbl_bias", "features.engineered_bias"),
        Row("feature_attention.layer_norm.{p}", DROPPED),  # never used in the legacy forward
        Row("feature_attention.layer_norm_engineered.{p}", "features.token_norm.{p}"),
        *_layer_rows("feature_attention.layer_stack_feature", "features.layers"),
    ]


def mapping_rows(kind: str) -> list[Row]:
    """The mapping table for ``kind`` = ``"single"`` or ``"dual"``."""
    common = [
        Row("embedding.weight", "embedding.weight"),
        Row("embedding_engineered.weight", "embedding_engineered.weight"),
        Row("clf.0.{p}", "head.fc1.{p}"),
        Row("clf.3.{p}", "head.fc2.{p}"),
        *_feature_rows(),
    ]
    if kind == "single":
        return common + _order_rows("order_attention", "order", "embedding.weight") + [
            Row("layer_norm.{p}", DROPPED),  # single model: never used in the legacy forward
        ]
    if kind == "dual":
        return common + [
            *_order_rows("order_attention_cid", "order_cid", "embedding.weight"),
            *_order_rows("order_attention_ccid", "order_ccid", "embedding.weight"),
            Row("embedding_gate.weight", "gate_embedding.weight"),
            *_order_rows("gate_emb", "gate_order", "gate_embedding.weight"),
            Row("gate_score.0.{p}", "gate_head.fc1.{p}"),
            Row("gate_score.3.{p}", "gate_head.fc2.{p}"),
            Row("layer_norm.{p}", "ensemble_norm.{p}"),  # used by the dual model
        ]
    raise WeightMapError(f"kind must be 'single' or 'dual', got {kind!r}")


# --- pattern matching ------------------------------------------------------------------------
@functools.cache
def _compile(pattern: str, side: int) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[pos:m.start()]) + f"(?P<{m.group(1)}>{_FIELDS[m.group(1)][side]})"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]) + r"\Z")


def _fill(pattern: str, groups: Mapping[str, str], convert: int) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: _FIELDS[m.group(1)][convert](groups[m.group(1)]), pattern)


def _match(rows: list[Row], key: str, side: int) -> tuple[Row, dict[str, str]] | None:
    for row in rows:
        pattern = row.legacy if side == 0 else row.port
        if side == 1 and (row.dropped or row.duplicate):
            continue
        m = _compile(pattern, side).match(key)
        if m:
            return row, m.groupdict()
    return None


# --- expected shapes ---------------------------------------------------------------------------
def expected_port_shapes(config: TSAConfig, kind: str) -> dict[str, torch.Size]:
    """Parameter names and shapes of the port network for ``config`` (built on the meta device:
    no memory, no random draws)."""
    from .nn import DualSequenceNetwork, SingleSequenceNetwork

    cls = {"single": SingleSequenceNetwork, "dual": DualSequenceNetwork}.get(kind)
    if cls is None:
        raise WeightMapError(f"kind must be 'single' or 'dual', got {kind!r}")
    with torch.device("meta"):
        net = cls(config)
    return {k: v.shape for k, v in net.state_dict().items()}


def _dropped_shape(key: str, config: TSAConfig) -> tuple[int, ...]:
    D = 16 if key.startswith("gate_emb.") else config.dim_embedding_table
    if key.endswith("emb_tbl_bias"):
        return (config.n_cat_features + config.n_num_features, D)
    return (config.dim_order,)  # the unused LayerNorm(E) weight / bias


def expected_legacy_shapes(config: TSAConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Legacy key -> shape for ``config``: the mapped keys, the duplicates, the dropped ones."""
    rows = mapping_rows(kind)
    port_shapes = expected_port_shapes(config, kind)
    out: dict[str, tuple[int, ...]] = {}
    for pkey, shape in port_shapes.items():
        row, groups = _match(rows, pkey, 1)
        out[_fill(row.legacy, groups, 3)] = tuple(shape)
    for row in rows:
        if row.duplicate:
            out[row.legacy] = tuple(port_shapes[row.port[1:]])
        elif row.dropped and "{" not in row.legacy:
            if row.legacy.endswith("emb_tbl_bias") and not config.emb_tbl_use_bias:
                continue
            out[row.legacy] = _dropped_shape(row.legacy, config)
        elif row.dropped:
            for leaf in ("weight", "bias"):
                key = _fill(row.legacy, {"p": leaf}, 3)
                out[key] = _dropped_shape(key, config)
    return out


def dropped_legacy_keys(config: TSAConfig, kind: str) -> list[str]:
    """Legacy keys the port drops on purpose (never used by the legacy forward), for reports."""
    rows = mapping_rows(kind)
    return sorted(k for k in expected_legacy_shapes(config, kind) if _match(rows, k, 0)[0].dropped)


def duplicate_legacy_keys(config: TSAConfig, kind: str) -> dict[str, str]:
    """Legacy keys that are extra names of a shared table -> the port key holding the table."""
    return {row.legacy: row.port[1:] for row in mapping_rows(kind) if row.duplicate
            and row.legacy in expected_legacy_shapes(config, kind)}


def infer_kind(state_dict: Mapping[str, Tensor]) -> str:
    dual = any(k.startswith(("order_attention_cid.", "order_cid.")) for k in state_dict)
    return "dual" if dual else "single"


# --- the two directions ------------------------------------------------------------------------
def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise WeightMapError(f"{what}: " + "; ".join(problems))


def _check_shapes(sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} != expected {tuple(expected[k])}"
                   for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append("missing keys " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys " + ", ".join(unexpected))
    if wrong:
        problems.append("shape mismatches " + ", ".join(wrong))
    _raise_if(problems, what)


def legacy_to_port(legacy_sd: Mapping[str, Tensor], config: TSAConfig, kind: str | None = None
                   ) -> dict[str, Tensor]:
    """Map a legacy ``state_dict`` to the port network's names (pure; tensors are not copied)."""
    kind = kind or infer_kind(legacy_sd)
    _check_shapes(legacy_sd, expected_legacy_shapes(config, kind), f"legacy {kind} state_dict")
    rows = mapping_rows(kind)
    out: dict[str, Tensor] = {}
    duplicates: list[tuple[str, str]] = []
    for key, value in legacy_sd.items():
        row, groups = _match(rows, key, 0)
        if row.dropped:
            continue
        if row.duplicate:
            duplicates.append((key, row.port[1:]))
            continue
        out[_fill(row.port, groups, 2)] = row.transform(value) if row.transform else value
    differ = [f"{k} differs from {p}" for k, p in duplicates if not torch.equal(legacy_sd[k], out[p])]
    _raise_if(differ, f"legacy {kind} state_dict: shared-table copies disagree")
    return out


def port_to_legacy(port_sd: Mapping[str, Tensor], config: TSAConfig, kind: str | None = None
                   ) -> dict[str, Tensor]:
    """Map a port ``state_dict`` back to legacy names: shared-table keys are recreated and the
    never-used legacy parameters filled with zeros, so the legacy model loads it strictly."""
    kind = kind or infer_kind(port_sd)
    _check_shapes(port_sd, expected_port_shapes(config, kind), f"port {kind} state_dict")
    rows = mapping_rows(kind)
    expected = expected_legacy_shapes(config, kind)
    out: dict[str, Tensor] = {}
    for key, value in port_sd.items():
        row, groups = _match(rows, key, 1)
        out[_fill(row.legacy, groups, 3)] = row.inverse(value) if row.inverse else value
    ref = next(iter(port_sd.values()))
    for key, shape in expected.items():
        if key in out:
            continue
        row, _ = _match(rows, key, 0)
        if row.duplicate:
            out[key] = port_sd[row.port[1:]]
        else:
            out[key] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    return {k: out[k] for k in expected}  # legacy key order


def lookup_legacy_key(key: str, kind: str | None = None, rows: list[Row] | None = None) -> tuple[Row, str | None]:
    """The table row of a legacy key and its port key (None when the legacy parameter is dropped)."""
    rows = rows if rows is not None else mapping_rows(kind)
    hit = _match(rows, key, 0)
    if hit is None:
        raise WeightMapError(f"legacy key {key} is not in the weight map")
    row, groups = hit
    if row.dropped:
        return row, None
    if row.duplicate:
        return row, row.port[1:]
    return row, _fill(row.port, groups, 2)
