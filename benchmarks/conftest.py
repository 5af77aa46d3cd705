"""pytest configuration of the benchmark scenarios (collected only by ``python -m benchmarks``).

Options (``python -m benchmarks`` passes them; they can be given by hand too):
  --quick                tiny shapes and batch sizes: checks the harness end to end in a minute or two
  --budget-minutes M     once the session has run M minutes, the remaining reference (legacy) scenarios
                         with batch >= 256 are skipped with a reason (the port ones still run)
  --memory-subprocess    0/1: also measure peak memory of selected scenarios in fresh spawned processes
  --skip-log PATH        where skipped scenarios and their reasons are written (JSON lines)

The device is ``TSA_BENCH_DEVICE`` (``python -m benchmarks --device``), else CUDA when present. Before the first
scenario the run measures the device's matmul peak at its thread count (:func:`benchmarks.common.matmul_peak`:
fp32; on CUDA also bf16 and fp16); it is written into the benchmark JSON's ``machine_info``
(``tsa_matmul_peaks``) and every FLOP/s figure of the summary is read against it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common

_T0 = time.monotonic()


def pytest_addoption(parser):
    g = parser.getgroup("tsa-benchmarks")
    g.addoption("--quick", action="store_true", default=False, help="tiny shapes, smoke run of the harness")
    g.addoption("--budget-minutes", type=float, default=26.0, help="time budget for heavy reference cases")
    g.addoption("--memory-subprocess", type=int, default=1, help="measure memory in fresh processes (0/1)")
    g.addoption("--skip-log", default="reports/benchmark/skips.jsonl", help="skipped scenarios (JSON lines)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA")
    config.addinivalue_line("markers", "heavy: a large legacy case, few rounds")
    path = Path(config.getoption("--skip-log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def pytest_generate_tests(metafunc):
    """Scenario matrices depend on --quick and the device; the scenario modules declare them."""
    quick = metafunc.config.getoption("--quick")
    if "scenario" in metafunc.fixturenames:
        make = metafunc.module.scenarios
        items = make(quick=quick, device=common.device())
        metafunc.parametrize("scenario", items, ids=[s.id for s in items])


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        path = Path(_SKIP_LOG[0]) if _SKIP_LOG else None
        if path is not None:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            with path.open("a") as f:
                f.write(json.dumps({"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")}) + "\n")


_SKIP_LOG: list[str] = []
PEAKS: dict[str, dict] = {}  # dtype name -> common.matmul_peak(...) of this run


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tsa_matmul_peaks"] = dict(PEAKS)
    machine_info["tsa_device"] = str(common.device())
    machine_info["tsa_compile_backend"] = common.compile_backend()
    machine_info["tsa_cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


@pytest.fixture(scope="session", autouse=True)
def matmul_peaks(pytestconfig):
    """The device's dense matmul peak, measured once before the first scenario, at the run's thread count."""
    dev = common.device()
    quick = pytestconfig.getoption("--quick")
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if dev.type == "cuda" else [])
    n = (2048 if dev.type == "cuda" else 1024) if quick else None
    for dtype in dtypes:
        PEAKS[str(dtype).removeprefix("torch.")] = common.matmul_peak(dev, dtype, n=n, reps=3 if quick else 5)
    return PEAKS


@pytest.fixture(scope="session", autouse=True)
def _skip_log(pytestconfig):
    _SKIP_LOG[:] = [pytestconfig.getoption("--skip-log")]


@pytest.fixture(scope="session")
def options(pytestconfig):
    return {
        "quick": pytestconfig.getoption("--quick"),
        "budget_s": pytestconfig.getoption("--budget-minutes") * 60,
        "memory_subprocess": bool(pytestconfig.getoption("--memory-subprocess")),
    }


@pytest.fixture(scope="session")
def dev():
    return common.device()


def elapsed() -> float:
    return time.monotonic() - _T0


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class ModelCache:
    """Builds each (kind, shape, policy) set once per session: the reference and every port variant
    (``common.PORT_VARIANTS``) on the same weights."""

    def __init__(self):
        self._pairs: dict = {}

    def get(self, kind: str, shape: str, policy: str = "random"):
        key = (kind, shape, policy)
        if key not in self._pairs:
            self._pairs.clear()  # keep at most one pair alive (memory)
            pair = common.build_pair(kind, common.SHAPES[shape], which="all", moe_eval_policy=policy)
            self._pairs[key] = {k: m.to(common.device()) for k, m in pair.items()}
        return self._pairs[key]


@pytest.fixture(scope="session")
def models():
    return ModelCache()
