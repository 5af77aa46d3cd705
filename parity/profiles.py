"""Hypothesis profiles of the parity suite. ``parity``: derandomized, sized so ``python -m parity``
finishes in about 10-15 minutes on 2 cores; ``deep``: many more examples, random search."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

# examples per (check, case) at weight 1.0; cases scale this by their weight (full-size ones are costly)
BASE_EXAMPLES = {"parity": 100, "deep": 500, "quick": 3}

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])

settings.register_profile("parity", derandomize=True, max_examples=BASE_EXAMPLES["parity"], **_COMMON)
settings.register_profile("deep", derandomize=False, max_examples=BASE_EXAMPLES["deep"], **_COMMON)
settings.register_profile("quick", derandomize=True, max_examples=BASE_EXAMPLES["quick"], **_COMMON)


def examples_for(profile: str, weight: float) -> int:
    return max(1, round(BASE_EXAMPLES.get(profile, BASE_EXAMPLES["parity"]) * weight))


def check_settings(profile: str, weight: float, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if shrink else [])
    return settings(settings.get_profile(profile), max_examples=examples_for(profile, weight), phases=phases)
