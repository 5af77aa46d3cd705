"""Shared by the serving tests: the recorded endpoint fixtures and the loaded endpoint models (loaded once per
test process; the ONNX backend exports the fixture model once into a private cache folder)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "parity" / "fixtures" / "endpoint"
MODEL_DIR = ROOT / "model"


@functools.cache
def requests() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "requests.jsonl").read_text().splitlines()]


@functools.cache
def responses() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "responses.jsonl").read_text().splitlines()]


@functools.cache
def output_cases() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "output_fn_cases.jsonl").read_text().splitlines()]


@functools.cache
def cache_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tsa-serve-test-cache-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@contextlib.contextmanager
def private_cache():
    old = os.environ.get("TSA_SERVE_CACHE")
    os.environ["TSA_SERVE_CACHE"] = str(cache_dir())
    try:
        yield cache_dir()
    finally:
        if old is None:
            os.environ.pop("TSA_SERVE_CACHE", None)
        else:
            os.environ["TSA_SERVE_CACHE"] = old


@functools.cache
def endpoint(backend: str, strict: bool = False):
    """An EndpointModel over the fixture folder (not registered as output_fn's model)."""
    from lightning_port.serving.inference import load_endpoint

    with private_cache():
        return load_endpoint(MODEL_DIR, backend, strict=strict)


def legacy_parse(text: str) -> int | float:
    """A recorded ``prediction`` (repr of predict_fn's value) back to the value."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


# --- requests built from the first recorded one ("normal": 25 history rows) --------------------------
SEP = ";SEP;"


@functools.cache
def features() -> dict:
    return json.loads((ROOT / "features.json").read_text())


@functools.cache
def _base_text() -> str:
    return requests()[0]["body"]


def base_request() -> dict:
    """A fresh copy of the first recorded request (normal, 25 history rows, every key present)."""
    return json.loads(_base_text())


def with_rows(data: dict, n: int, group: str | None = None) -> dict:
    """Keep the newest ``n`` elements of every history sequence (of one group: "cat" / "num")."""
    f = features()
    keys = {"cat": f["input_data_seq_cat_otf_vars"], "num": f["input_data_seq_num_otf_vars"]}
    for g, ks in keys.items():
        if group in (None, g):
            for k in ks:
                data[k] = SEP.join(data[k].split(SEP)[-n:])
    return data


def otf(name: str, group: str | None = None) -> str:
    """The history key of a current variable (``group`` "cat" / "num" for orderDate and objectId, in both)."""
    f = features()
    for g, cur, hist in (("cat", "input_data_seq_cat_vars", "input_data_seq_cat_otf_vars"),
                         ("num", "input_data_seq_num_vars", "input_data_seq_num_otf_vars")):
        if group in (None, g) and name in f[cur]:
            return f[hist][f[cur].index(name)]
    raise KeyError(name)
