"""The machinery every parity check shares: the run context, the hypothesis property runner
and the failure type that makes hypothesis shrink a failing example."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from ..cases import ParityCase
from ..compare import Comparison
from ..pairs import Mutation
from ..profiles import check_settings
from ..report import CheckRecord


class ParityFailure(AssertionError):
    pass


@dataclass
class RunContext:
    profile: str = "parity"
    mutate: Mutation | None = None  # planted bugs (tests only)
    weight_scale: float = 1.0
    log: Callable[[str], None] = print
    shrink: bool = True
    extra: dict = field(default_factory=dict)


def run_property(records: dict[str, CheckRecord], ctx: RunContext, case: ParityCase, weight: float,
                 body: Callable[[st.DataObject], dict[str, Comparison]]) -> list[CheckRecord]:
    """Run ``body`` as a hypothesis property; each returned comparison goes to the record of that name."""
    sett = check_settings(ctx.profile, weight * case.weight * ctx.weight_scale,
                          shrink=ctx.shrink and not case.full_size)

    @sett
    @given(data=st.data())
    def prop(data):
        comps = body(data)
        bad = []
        for name, comp in comps.items():
            records[name].add(comp)
            if not comp.passed:
                bad.append(f"[{name}] " + comp.report())
        if bad:
            raise ParityFailure("\n".join(bad))

    try:
        prop()
    except ParityFailure as e:
        # the last failure hypothesis reports is the shrunk one; keep it first
        for rec in records.values():
            if rec.status == "failed":
                rec.failures.insert(0, "minimal failing example:\n" + str(e)[:4000])
                del rec.failures[5:]
    except Exception as e:  # a crash in either model is a failed check, with its traceback
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        for rec in records.values():
            rec.error(tb)
    return list(records.values())


def _init_seed(case: ParityCase) -> st.SearchStrategy[int]:
    return st.just(1234) if case.full_size else st.integers(0, 2**16)
