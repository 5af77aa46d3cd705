"""Sessions: tests (default), parity (the main job), benchmark (opt-in), lint.

Every session installs the tested torch release (CPU wheel, pinned in constraints.txt) first, so
pip never pulls a multi-GB CUDA build, then the project with the extras the session needs.
"""

import os

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False

CONSTRAINTS = ("-c", "constraints.txt")
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str) -> None:
    session.install(*CONSTRAINTS, TORCH)
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests of every package (fast; small model configurations)."""
    install(session, "test,onnx,bench,serve")  # bench: tests/test_benchmarks_quick.py runs python -m benchmarks --quick
    session.run("pytest", *session.posargs)


@nox.session
def parity(session: nox.Session) -> None:
    """The parity suite: reference vs port; writes reports/parity/report.json and report.md."""
    install(session, "test,onnx,serve")
    env = {"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "parity")}
    session.run("python", "-m", "parity", *session.posargs, env=env)


@nox.session(default=False)
def benchmark(session: nox.Session) -> None:
    """Side-by-side speed and memory, reference vs port; writes reports/benchmark/ (GPU: -- --device cuda)."""
    install(session, "test,onnx,bench")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff over the project."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".", *session.posargs)
