"""Micro-batching: concurrent requests scored in one model call, with answers identical to unbatched ones.

A worker thread owns the model. Requests that passed preprocessing are queued; the worker takes what is
queued (at most ``max_batch``) and scores it in one call. It waits -- at most ``max_wait_ms`` after the
first queued request -- only while other requests are still being received and preprocessed (the server
marks them with :meth:`MicroBatcher.arriving`), so a lone request is never delayed and a burst is
gathered. A request whose preprocessing fails never enters a batch; if a batch call itself fails, its
requests are scored one by one, so only the failing one fails.

Identical answers: the worker only batches when the scorer computes every row exactly as it would alone.
:func:`batch_exactness` measures that at start-up (random rows in the model's input layout, scored alone
and inside batches of several sizes and positions, compared bit for bit); where it does not hold (the eager
port: torch's CPU matmuls round rows differently at other batch sizes; an ONNX graph with MoE layers not
exported batch-invariant, whose expert capacity couples rows) the server scores one request per call.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from .preprocess import INPUTS_ORDER, ModelInputs

logger = logging.getLogger("lightning_port.serving")

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 2.0
CHECK_SIZES = (2, 3, 4, 5, 7, 8, 16)


class MicroBatcher:
    """Scores queued :class:`ModelInputs` with ``score_many`` (a list of rows -> a list of scores) on a
    worker thread, up to ``max_batch`` rows per call."""

    def __init__(self, score_many: Callable[[Sequence[ModelInputs]], list[float]], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.score_many = score_many
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self._queue: collections.deque[tuple[ModelInputs, Future]] = collections.deque()
        self._cond = threading.Condition()
        self._arriving = 0
        self._busy = False  # the worker is scoring a batch
        self._closed = False
        self.batches: collections.Counter[int] = collections.Counter()  # batch size -> calls (for tests, stats)
        self.inline = 0  # requests scored by their caller (score_inline)
        self._thread = threading.Thread(target=self._run, name="tsa-serve-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request as being received / preprocessed: the worker may wait (boundedly) for it."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing queued, nothing being scored or prepared: a lone request may be scored by its caller."""
        with self._cond:
            return not self._queue and not self._busy and self._arriving == 0 and not self._closed

    def score_inline(self, inputs: ModelInputs) -> float:
        """Score one request in the calling thread (no hand-over to the worker; the same single-row call the
        worker would make for a batch of one), counted in :attr:`inline`."""
        score = self.score_many([inputs])[0]
        self.inline += 1
        return score

    def submit(self, inputs: ModelInputs) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((inputs, fut))
            self._cond.notify_all()
        return fut

    def score(self, inputs: ModelInputs) -> float:
        """Blocking convenience: submit and wait."""
        return self.submit(inputs).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _take(self) -> list[tuple[ModelInputs, Future]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and self._arriving > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch, len(self._queue))
            self._busy = True
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self.batches[len(batch)] += 1
            try:
                outcomes = self._score([x for x, _ in batch])
            finally:
                with self._cond:  # idle again before the waiting requests resume
                    self._busy = False
            for (_, fut), (ok, value) in zip(batch, outcomes):
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _score(self, rows: list[ModelInputs]) -> list[tuple[bool, Any]]:
        """(True, score) or (False, exception) per row: a failing batch is scored again row by row, so one bad
        request does not fail the others."""
        try:
            return [(True, s) for s in self.score_many(rows)]
        except Exception:  # noqa: BLE001 - isolate the failing request: score one by one
            if len(rows) > 1:
                logger.warning("a batch of %d failed; scoring its requests one by one", len(rows))
            out: list[tuple[bool, Any]] = []
            for x in rows:
                try:
                    out.append((True, self.score_many([x])[0]))
                except Exception as exc:  # noqa: BLE001 - handed to the waiting request
                    out.append((False, exc))
            return out


def probe_rows(n: int, seq_len: int, n_cat: int, n_num: int, n_dense: int, n_rows: int, seed: int = 0
               ) -> list[ModelInputs]:
    """``n`` random rows in the endpoint's input layout: left-padded histories of random lengths (1..L),
    codes in the embedding table, numbers ~ N(0, 1), time gaps up to 1e6, dense ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        real = int(rng.integers(1, seq_len + 1))
        pad = seq_len - real
        x_cat = np.zeros((seq_len, n_cat), np.float32)
        x_cat[pad:] = rng.integers(0, n_rows, (real, n_cat))
        x_num = np.zeros((seq_len, n_num), np.float32)
        x_num[pad:] = rng.standard_normal((real, n_num))
        t = np.zeros((seq_len, 1), np.float32)
        t[pad:, 0] = np.sort(rng.uniform(0, 1e6, real))[::-1] - 0.0
        t[-1, 0] = 0.0
        kpm = np.ones(seq_len + 1, bool)
        kpm[pad:] = False
        rows.append(ModelInputs(x_cat, x_num, t, kpm, rng.standard_normal(n_dense).astype(np.float32), real - 1))
    return rows


def batch_exactness(logits: Callable[[dict[str, np.ndarray]], np.ndarray], rows: Sequence[ModelInputs],
                    sizes: Sequence[int] = CHECK_SIZES) -> tuple[bool, str]:
    """Whether every row's logits are bit-identical alone and inside batches of ``sizes`` (each row at
    several positions). Returns (exact, a one-line account)."""

    def run(items: Sequence[ModelInputs]) -> np.ndarray:
        return np.asarray(logits({n: np.stack([getattr(x, a) for x in items]) for n, a in INPUTS_ORDER}))

    alone = np.stack([run([r])[0] for r in rows])
    n = len(rows)
    checked = 0
    for size in sizes:
        for shift in range(0, n, max(1, n // 3)):
            idx = [(shift + i) % n for i in range(size)]
            out = run([rows[i] for i in idx])
            same = out.view(np.uint32) == alone[idx].view(np.uint32)
            checked += size
            if not same.all():
                bad = int(np.flatnonzero(~same.all(axis=1))[0])
                return False, (f"row {idx[bad]} differs inside a batch of {size} (position {bad}) from its logits alone "
                               f"(max |diff| {float(np.abs(out - alone[idx]).max()):.2e})")
    return True, f"{checked} rows in batches of {', '.join(map(str, sizes))}: bit-identical to their logits alone"


def exact_batching(model: Any, max_batch: int) -> tuple[int, str]:
    """The batch size the server may use for ``model`` (:class:`~lightning_port.serving.inference.EndpointModel`):
    ``max_batch`` when its scorer is measured batch-exact, else 1; and why."""
    if max_batch <= 1:
        return 1, "batching off (max batch 1)"
    scorer = model.scorer
    if not getattr(scorer, "batch_invariant", True):
        return 1, "an MoE graph not exported batch-invariant: rows of a batch share the expert capacity"
    if scorer.name == "eager":
        return 1, ("the eager port's matmuls round a row differently at other batch sizes (measured); one "
                   "request per call")
    f = model.folder.features
    rows = probe_rows(12, f.seq_len, len(f.seq_cat_vars), len(f.seq_num_vars), len(f.dense_num_vars),
                      model.folder.n_embedding_rows)
    sizes = tuple(s for s in CHECK_SIZES if s <= max_batch) + ((max_batch,) if max_batch not in CHECK_SIZES else ())
    exact, note = batch_exactness(scorer.logits, rows, sizes)
    return (max_batch if exact else 1), note
