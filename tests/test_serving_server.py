"""``tsa-serve`` over real HTTP on 127.0.0.1: the recorded requests answer as in-process, refusals are one-line
4xx JSON with the legacy's messages, concurrent requests (micro-batched) answer as sequential ones."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from _serving_helpers import MODEL_DIR, cache_dir, endpoint, requests, responses

from lightning_port.serving import server

REPO = Path(__file__).resolve().parents[1]
STATUS = {"input_fn": {"ValueError": 415, "JSONDecodeError": 400}, "predict_fn": 422, "output_fn": 406}


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.getheader("content-type"), resp.read()
        finally:
            conn.close()

    def invoke(self, req: dict):
        headers = {}
        if req["content_type"] is not None:
            headers["Content-Type"] = req["content_type"]
        if req.get("accept") is not None:
            headers["Accept"] = req["accept"]
        return self.request("POST", "/invocations", req["body"].encode(), headers)


def start_server(*args: str) -> tuple[subprocess.Popen, int, str]:
    endpoint("onnx")  # the ONNX export, cached in the private folder the server reads too
    env = {**os.environ, "TSA_SERVE_CACHE": str(cache_dir()), "PYTHONPATH": str(REPO)}
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by stop(); a pipe could fill up and block the server
    proc = subprocess.Popen([sys.executable, "-m", "lightning_port.serving.server", str(MODEL_DIR), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
    proc.log = log
    deadline = time.monotonic() + 180
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("tsa-serve: listening on "):
            port = int(re.search(r"http://127\.0\.0\.1:(\d+) ", line).group(1))
            return proc, port, line
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"tsa-serve did not start: {line!r} {stop(proc)[-2000:]}")


def stop(proc: subprocess.Popen) -> str:
    """Stops the server; returns its log."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.log.seek(0)
    text = proc.log.read()
    proc.log.close()
    return text


@pytest.fixture(scope="module")
def onnx_server():
    proc, port, line = start_server("--max-batch", "16", "--max-wait-ms", "2")
    yield Client(port), line
    err = stop(proc)
    assert "Traceback" not in err, err[-3000:]


def test_ping_and_the_ready_line(onnx_server):
    client, line = onnx_server
    assert "backend onnx" in line and "micro-batching up to 16, wait <= 2 ms" in line
    status, ctype, body = client.request("GET", "/ping")
    assert status == 200
    assert json.loads(body) == {"status": "Healthy"}


def test_every_recorded_request_over_http(onnx_server):
    client, _ = onnx_server
    model = endpoint("onnx")
    for req, rec in zip(requests(), responses()):
        status, ctype, body = client.invoke(req)
        where = f"request {rec['id']} ({rec['kind']})"
        assert ctype == "application/json", where
        if rec["ok"]:
            assert status == 200, (where, body)
            want = model.answer(model.predict(json.loads(req["body"])))  # in-process, unbatched
            assert body.decode() == json.dumps(want, indent=2), where  # the legacy wire format
            continue
        stage = STATUS[rec["stage"]]
        expected = stage[rec["error_type"]] if isinstance(stage, dict) else stage
        assert status == expected, (where, status, body)
        assert b"\n" not in body and b"Traceback" not in body, where
        err = json.loads(body)
        if rec["stage"] == "predict_fn":  # the legacy exception's type and message
            assert (err["type"], err["message"]) == (rec["error_type"], rec["error"][:500]), where
            assert err["error"] == f"{rec['error_type']}: {rec['error']}"[:500], where
        elif rec["error_type"] == "JSONDecodeError":
            assert err["error"] == f"JSONDecodeError: {rec['error']}", where
        else:
            assert err["error"] == rec["error"], where
        if rec["stage"] != "predict_fn":
            assert "expected" in err, where


def test_headers_as_the_toolkit_handed_them(onnx_server):
    client, _ = onnx_server
    req = requests()[0]
    body = req["body"].encode()
    ok = client.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    for accept in ("*/*", None):  # missing or */*: the default accept, application/json
        headers = {"Content-Type": "application/json", **({"Accept": accept} if accept else {})}
        assert client.request("POST", "/invocations", body, headers) == ok
    status, _, err = client.request("POST", "/invocations", body, {})
    assert status == 415 and json.loads(err)["error"] == "None not supported by script!"
    status, _, err = client.request("POST", "/invocations", body, {"Content-Type": "application/json",
                                                                   "Accept": "application/json, text/plain"})
    assert status == 406 and json.loads(err) == {"error": "output format doesn't support application/json, text/plain",
                                                 "expected": "Accept: application/json"}
    status, _, err = client.request("POST", "/invocations", b"\xff\xfe{", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(err)["expected"] == "a UTF-8 JSON body"


def test_unknown_routes_methods_and_big_bodies_are_one_line_json(onnx_server):
    client, _ = onnx_server
    for method, path, status in (("GET", "/nope", 404), ("GET", "/invocations", 405), ("POST", "/ping", 405),
                                 ("DELETE", "/invocations", 405)):
        got, ctype, body = client.request(method, path)
        assert (got, ctype) == (status, "application/json"), (method, path)
        assert b"\n" not in body and "expected" in json.loads(body), (method, path)
    assert client.request("HEAD", "/ping")[:2] == (200, "application/json")
    big = b"[" + b"0," * (6 << 20) + b"0]"  # 12 MiB > the 10 MiB default
    status, _, body = client.request("POST", "/invocations", big, {"Content-Type": "application/json"})
    assert status == 413 and "larger than" in json.loads(body)["error"]
    # the server still answers after it
    assert client.request("GET", "/ping")[0] == 200


def test_concurrent_requests_answer_as_sequential_ones(onnx_server):
    client, _ = onnx_server
    scored = [(q, r) for q, r in zip(requests(), responses()) if r["ok"]]
    sequential = {q["id"]: client.invoke(q) for q, _ in scored}
    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []

    def worker(k):
        try:
            for q, _ in scored[k::3] + scored[:8]:
                results[(k, q["id"])] = client.invoke(q)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) > 100
    for (_, rid), got in results.items():
        assert got == sequential[rid], rid


def test_concurrent_invocations_are_batched_and_exact():
    model = endpoint("onnx")
    ep = server.Endpoint(model, max_batch=16, max_wait_ms=2)
    try:
        assert ep.max_batch == 16, ep.batching_note
        scored = [q for q, r in zip(requests(), responses()) if r["ok"] and r["prediction"] != "-1"]

        async def burst():
            return await asyncio.gather(*(ep.invoke(q["body"].encode(), "application/json", None)
                                          for q in scored * 2))

        replies = asyncio.run(burst())
        for q, (status, body) in zip(scored * 2, replies):
            assert status == 200
            assert body.decode() == json.dumps(model.answer(model.predict(json.loads(q["body"]))), indent=2)
        assert max(ep.batcher.batches) > 1, dict(ep.batcher.batches)  # several requests per ONNX Runtime call
    finally:
        ep.close()


def test_a_lone_request_is_scored_inline_and_answers_the_same():
    # no other request in flight and the batcher idle: scored in the event loop's thread (no hand-over); the answer
    # is the batched path's; with the batcher busy, the request is queued as before
    model = endpoint("onnx")
    ep = server.Endpoint(model, max_batch=16, max_wait_ms=2)
    try:
        req = next(q for q, r in zip(requests(), responses()) if r["ok"] and r["prediction"] not in ("-1", "nan"))
        body = req["body"].encode()
        queued = asyncio.run(ep.invoke(body, "application/json", None))
        assert ep.batcher.inline == 0 and sum(ep.batcher.batches.values()) == 1
        inline = asyncio.run(ep.invoke(body, "application/json", None, alone=True))
        assert ep.batcher.inline == 1 and sum(ep.batcher.batches.values()) == 1
        assert inline == queued
        with ep.batcher.arriving():  # another request being prepared: not alone any more
            assert not ep.batcher.idle()
            assert asyncio.run(ep.invoke(body, "application/json", None, alone=True)) == queued
        assert ep.batcher.inline == 1 and sum(ep.batcher.batches.values()) == 2
    finally:
        ep.close()


def test_internal_failures_are_one_line_500s():
    class Broken:
        name = "onnx"
        batch_invariant = True

        def logits(self, feed):
            raise RuntimeError("the accelerator fell off\nsecond line")

    model = endpoint("onnx")
    ep = server.Endpoint(model, max_batch=1)
    original = model.scorer
    try:
        model.scorer = Broken()
        status, body = asyncio.run(ep.invoke(requests()[0]["body"].encode(), "application/json", "application/json"))
    finally:
        model.scorer = original
        ep.close()
    assert status == 500
    assert json.loads(body) == {"error": "internal error: RuntimeError: the accelerator fell off second line"}


def test_strict_refusals_over_http():
    proc, port, line = start_server("--strict", "--backend", "eager")
    try:
        assert "backend eager, strict" in line and "one request per model call" in line
        client = Client(port)
        by_kind = {r["kind"]: q for q, r in zip(requests(), responses())}
        status, _, body = client.invoke(by_kind["missing_key_cat"])
        assert status == 422
        err = json.loads(body)
        assert err["type"] == "StrictRefusal"
        assert err["message"].startswith("strict: sanity check failed: Input data does not contain required key")
        status, _, body = client.invoke(by_kind["normal"])
        assert status == 200
    finally:
        assert "Traceback" not in stop(proc)


def test_cli_refuses_bad_folders_and_busy_ports_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "lightning_port.serving.server", str(tmp_path / "none")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("tsa-serve: error: model folder ") and run.stderr.count("\n") == 1
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "lightning_port.serving.server", str(MODEL_DIR), "--backend", "eager",
                              "--port", str(busy), "--max-batch", "1"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 2
    assert f"tsa-serve: error: cannot listen on 127.0.0.1:{busy}" in run.stderr
    assert "Traceback" not in run.stderr
