"""The `structure` category: the legacy <-> port weight map, both directions."""

from __future__ import annotations

from ..cases import ParityCase
from ..compare import compare, from_problems
from ..report import CheckRecord
from .base import RunContext, run_property


def check_structure(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Every legacy parameter maps to exactly one port parameter of the same shape, or is a listed
    duplicate of a shared table, or is in the divergence register as dropped; both directions."""
    from lightning_port.weight_map import (
        dropped_legacy_keys,
        duplicate_legacy_keys,
        legacy_to_port,
        port_to_legacy,
    )

    rec = {"structure.mapping": CheckRecord.new("structure.mapping", "structure", case.model,
                                                case.tolerance("structure.roundtrip")),
           "structure.roundtrip": CheckRecord.new("structure.roundtrip", "structure", case.model,
                                                  case.tolerance("structure.roundtrip"))}

    def body(data):
        config = data.draw(case.configs(), label="config")
        legacy = case.build_reference(config, seed=0)
        port = case.build_port(config, seed=0)
        cfg, kind = port.config, case.kind
        lsd, psd = legacy.state_dict(), port.network.state_dict()
        problems: list[str] = []
        mapped = legacy_to_port(lsd, cfg, kind)
        if set(mapped) != set(psd):
            problems.append(f"legacy_to_port keys differ from the port's: missing {sorted(set(psd) - set(mapped))}, "
                            f"extra {sorted(set(mapped) - set(psd))}")
        for k in set(mapped) & set(psd):
            if mapped[k].shape != psd[k].shape:
                problems.append(f"{k}: mapped shape {tuple(mapped[k].shape)} != port {tuple(psd[k].shape)}")
        dropped, dups = set(dropped_legacy_keys(cfg, kind)), duplicate_legacy_keys(cfg, kind)
        # one legacy tensor -> one port tensor: identify tensors by storage (the map does not copy)
        by_ptr: dict[tuple, list[str]] = {}
        for k, v in lsd.items():
            if v.numel():
                by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
        for pk, pv in mapped.items():
            if not pv.numel():
                continue
            sources = [k for k in by_ptr.get((pv.data_ptr(), tuple(pv.shape)), []) if k not in dups]
            if len(sources) != 1:
                problems.append(f"port {pk} comes from {len(sources)} legacy keys {sources}")
        used = {(v.data_ptr(), tuple(v.shape)) for v in mapped.values() if v.numel()}
        for k, v in lsd.items():
            if k in dropped or k in dups or not v.numel():
                continue
            if (v.data_ptr(), tuple(v.shape)) not in used:
                problems.append(f"legacy {k} is neither mapped, a listed duplicate, nor listed as dropped")
        # dropped parameters must really be unused: no gradient in a legacy training step
        comps = {"structure.mapping": from_problems(problems, case.tolerance("structure.roundtrip"),
                                                    context={"config": config.kwargs})}
        # back: port -> legacy loads strictly and gives the same tensors for every mapped key
        back = port_to_legacy(psd, cfg, kind)
        legacy2 = case.build_reference(config)
        legacy2.load_state_dict(back, strict=True)
        want = {k: v for k, v in port_to_legacy(mapped, cfg, kind).items() if k not in dropped}
        got = {k: v for k, v in lsd.items() if k not in dropped}
        comps["structure.roundtrip"] = compare(want, got, case.tolerance("structure.roundtrip"), path="",
                                               context={"config": config.kwargs})
        return comps

    return run_property(rec, ctx, case, 0.5, body)
