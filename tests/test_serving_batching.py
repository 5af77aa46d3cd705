"""Micro-batching (lightning_port.serving.batching): bounded waits, failure isolation, and answers identical to
unbatched ones (the start-up bit-exactness check, and its claim checked on the recorded requests)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from _serving_helpers import endpoint, requests

from lightning_port.serving.batching import MicroBatcher, batch_exactness, exact_batching, probe_rows
from lightning_port.serving.preprocess import ModelInputs


class Recorder:
    """A fake score_many: the score of a row is its x_engineered[0]; records the batch sizes."""

    def __init__(self, delay: float = 0.0, poison: float | None = None):
        self.sizes: list[int] = []
        self.delay = delay
        self.poison = poison

    def __call__(self, rows):
        self.sizes.append(len(rows))
        time.sleep(self.delay)
        if self.poison is not None and any(r.x_engineered[0] == self.poison for r in rows):
            raise RuntimeError("poisoned row")
        return [float(r.x_engineered[0]) for r in rows]


def row(value: float) -> ModelInputs:
    return ModelInputs(np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32), np.zeros((3, 1), np.float32),
                       np.zeros(4, bool), np.array([value], np.float32), 0)


def test_a_lone_request_is_not_delayed_by_the_wait():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=5000)
    try:
        start = time.monotonic()
        assert b.score(row(1.0)) == 1.0
        assert time.monotonic() - start < 2.5  # nobody else arriving: no 5 s wait
        assert rec.sizes == [1]
    finally:
        b.close()


def test_requests_still_arriving_are_waited_for_and_batched():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=5000)
    try:
        futures = []
        with b.arriving():  # request 2 is still being received while request 1 is queued
            futures.append(b.submit(row(1.0)))
            time.sleep(0.05)
            futures.append(b.submit(row(2.0)))
        assert [f.result(timeout=10) for f in futures] == [1.0, 2.0]
        assert rec.sizes == [2]
    finally:
        b.close()


def test_the_wait_is_bounded():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=50)
    try:
        with b.arriving():  # an arrival that never submits
            start = time.monotonic()
            assert b.score(row(3.0)) == 3.0
            waited = time.monotonic() - start
        assert 0.04 <= waited < 2.0
    finally:
        b.close()


def test_max_batch_and_order_under_load():
    rec = Recorder(delay=0.05)
    b = MicroBatcher(rec, max_batch=4, max_wait_ms=0)
    try:
        first = b.submit(row(0.0))  # occupies the worker for 50 ms while 9 more queue up
        time.sleep(0.01)
        futures = [b.submit(row(float(i))) for i in range(1, 10)]
        assert first.result(timeout=10) == 0.0
        assert [f.result(timeout=10) for f in futures] == [float(i) for i in range(1, 10)]
        assert max(rec.sizes) == 4 and sum(rec.sizes) == 10 and len(rec.sizes) >= 3
    finally:
        b.close()


def test_a_failing_row_fails_alone():
    rec = Recorder(delay=0.05, poison=5.0)
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=0)
    try:
        b.submit(row(0.0))
        time.sleep(0.01)
        futures = {v: b.submit(row(v)) for v in (4.0, 5.0, 6.0)}
        assert futures[4.0].result(timeout=10) == 4.0
        assert futures[6.0].result(timeout=10) == 6.0
        with pytest.raises(RuntimeError, match="poisoned row"):
            futures[5.0].result(timeout=10)
        assert 3 in rec.sizes  # the three were batched, then scored one by one
    finally:
        b.close()


def test_concurrent_threads_get_their_own_answers():
    rec = Recorder(delay=0.002)
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=2)
    out: dict[int, float] = {}

    def client(i):
        with b.arriving():
            fut = b.submit(row(float(i)))
        out[i] = fut.result(timeout=30)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == {i: float(i) for i in range(64)}
        assert sum(rec.sizes) == 64
    finally:
        b.close()


def test_exactness_check_detects_batch_dependent_rounding():
    rows = probe_rows(6, 5, 3, 2, 4, 10, seed=1)

    def row_independent(feed):
        return np.stack([feed["x_num"].sum(axis=(1, 2)), feed["x_engineered"].sum(axis=1)], axis=1)

    def batch_dependent(feed):  # a kernel whose rounding depends on the batch size
        out = row_independent(feed)
        return out + np.float32(1e-7) * (feed["x_num"].shape[0] > 3)

    assert batch_exactness(row_independent, rows, sizes=(2, 4, 5))[0]
    exact, note = batch_exactness(batch_dependent, rows, sizes=(2, 4, 5))
    assert not exact
    assert "differs inside a batch of 4" in note


def test_the_servers_batch_size_per_scorer():
    size, note = exact_batching(endpoint("eager"), 16)
    assert size == 1 and "eager" in note

    class MoEGraph:
        name = "onnx"
        batch_invariant = False

    class Fake:
        scorer = MoEGraph()

    assert exact_batching(Fake(), 16)[0] == 1
    assert exact_batching(endpoint("onnx"), 1)[0] == 1


def test_onnx_batches_answer_as_unbatched_on_the_recorded_requests():
    m = endpoint("onnx")
    size, note = exact_batching(m, 16)
    rows = []
    for req in requests():
        try:
            parsed = m.parse(json.loads(req["body"]))
        except Exception:  # noqa: BLE001 - refused requests never enter a batch
            continue
        if isinstance(parsed, ModelInputs):
            rows.append(parsed)
    assert len(rows) >= 40
    alone = [m.score_many([r])[0] for r in rows]
    if size == 1:
        pytest.skip(f"ONNX Runtime is not batch-exact on this machine, so the server does not batch: {note}")
    for start in range(0, len(rows), 7):  # batches of 7 (and the rest), every row at some position
        chunk = rows[start:start + 7]
        got = m.score_many(chunk)
        for g, a in zip(got, alone[start:start + 7]):
            assert repr(g) == repr(a)  # bit for bit (NaN included)
    got = m.score_many(rows[::-1][:16])
    assert [repr(g) for g in got] == [repr(a) for a in alone[::-1][:16]]
