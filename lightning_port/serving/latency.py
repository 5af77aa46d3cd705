"""Per-request latency of the port endpoint on a request log, backends interleaved (docs/serving.md "Speed").

::

    python -m lightning_port.serving.latency MODEL_DIR REQUESTS.jsonl [--rounds 5] [--backends onnx,eager] [--http]

``REQUESTS.jsonl``: ``{body, content_type, accept}`` records (parity/fixtures/endpoint/requests.jsonl). Every
request that the endpoint scores is timed per step at one thread -- ``input_fn`` (JSON), preprocessing
(``data_parsing``), the model call, ``output_fn`` -- round after round, each request through every backend
in turn, so the machine's load hits all of them alike. ``--http`` also times the same requests through
``tsa-serve`` on 127.0.0.1 (its own process, ONNX backend, one keep-alive connection, interleaved with the
in-process calls) and reports the difference. Prints p50 / p99 in ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from .inference import input_fn, load_endpoint
from .preprocess import ModelInputs


def _pct(values: list[float]) -> str:
    a = np.asarray(values) * 1e3
    return f"p50 {np.percentile(a, 50):6.3f}  p99 {np.percentile(a, 99):6.3f}"


def _start_server(model_dir: str) -> tuple[subprocess.Popen, int]:
    """``tsa-serve MODEL_DIR --port 0 --max-batch 1`` in its own process (as deployed: no GIL shared with the
    client); returns it and its port once it prints its ready line."""
    proc = subprocess.Popen([sys.executable, "-m", "lightning_port.serving.server", model_dir, "--port", "0",
                             "--max-batch", "1", "--log-level", "error"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("tsa-serve: listening on "):
            return proc, int(line.split("http://127.0.0.1:")[1].split(" ")[0])
    raise RuntimeError("tsa-serve did not start")


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc)."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115 - read at once
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_port.serving.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("requests")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default="onnx,eager")
    p.add_argument("--http", action="store_true", help="also time the HTTP server (ONNX backend)")
    p.add_argument("--reference", action="store_true",
                   help="also time the legacy model's forward (reference.models, legacy weights) on the same inputs")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # sanity-failure lines would be timed otherwise
    backends = [b for b in args.backends.split(",") if b]
    models = {b: load_endpoint(args.model_dir, b, threads=1) for b in backends}
    with open(args.requests, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    first = models[backends[0]]
    scored = []
    for r in records:
        try:
            if isinstance(first.parse(input_fn(r["body"], r["content_type"])), ModelInputs):
                scored.append(r)
        except Exception:  # noqa: BLE001 - refused requests are not timed
            continue
    steps = {b: {"input_fn": [], "preprocess": [], "model": [], "output_fn": [], "total": [], "cpu": []}
             for b in backends}
    http = None
    if args.http:
        import http.client

        proc, port = _start_server(args.model_dir)
        import socket

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # http.client sends headers, body apart
        http = {"http": [], "in-process": [], "cpu": []}
        server_cpu = _cpu_seconds(proc.pid)
    reference = None
    if args.reference:
        import torch

        from reference.models import OrderFeatureAttentionClassifier

        f = first.folder.features
        reference = OrderFeatureAttentionClassifier(**f.model_args)
        reference.load_state_dict(torch.load(first.folder.path / f.model_file, map_location="cpu", weights_only=True))
        reference.eval()
        steps["legacy model"] = {"forward": []}
    for _ in range(args.rounds):
        for r in scored:
            if reference is not None:
                x = first.parse(input_fn(r["body"], r["content_type"]))
                t = [torch.from_numpy(a)[None] for a in (x.x_cat, x.x_num, x.x_engineered, x.time_seq)]
                kpm = torch.from_numpy(x.key_padding_mask)[None]
                t0 = time.perf_counter()
                with torch.no_grad():
                    out, _ = reference(t[0], t[1], t[2], t[3], None, kpm)
                    float(torch.softmax(out[0], dim=0)[1])
                steps["legacy model"]["forward"].append(time.perf_counter() - t0)
            for b in backends:
                m = models[b]
                c0 = time.process_time()
                t0 = time.perf_counter()
                data = input_fn(r["body"], r["content_type"])
                t1 = time.perf_counter()
                x = m.parse(data)
                t2 = time.perf_counter()
                score = m.finish(m.score_many([x])[0])
                t3 = time.perf_counter()
                json.dumps(m.answer(score), indent=2)
                t4 = time.perf_counter()
                s = steps[b]
                s["input_fn"].append(t1 - t0)
                s["preprocess"].append(t2 - t1)
                s["model"].append(t3 - t2)
                s["output_fn"].append(t4 - t3)
                s["total"].append(t4 - t0)
                s["cpu"].append(time.process_time() - c0)
                if http is not None and b == "onnx":
                    t5 = time.perf_counter()
                    conn.request("POST", "/invocations", r["body"].encode(), {"Content-Type": r["content_type"]})
                    conn.getresponse().read()
                    http["http"].append(time.perf_counter() - t5)
                    http["in-process"].append(t4 - t0)
    print(f"{len(scored)} scored requests x {args.rounds} rounds, 1 thread, backends interleaved (ms):")
    for b, table in steps.items():
        for step, values in table.items():
            print(f"  {b:5s} {step:10s} {_pct(values)}")
    if http is not None:
        server_cpu = (_cpu_seconds(proc.pid) - server_cpu) / max(1, len(http["http"]))
        diff = [a - b for a, b in zip(http["http"], http["in-process"])]
        inproc_cpu = float(np.mean(steps["onnx"]["cpu"])) if "onnx" in steps else float("nan")
        print(f"  HTTP (onnx, keep-alive)   {_pct(http['http'])}")
        print(f"  HTTP minus in-process     {_pct(diff)}  (same requests, interleaved)")
        print(f"  CPU per request: server process {server_cpu * 1e3:.3f} ms, in-process {inproc_cpu * 1e3:.3f} ms "
              f"(difference {(server_cpu - inproc_cpu) * 1e3:.3f} ms: the HTTP stack)")
        conn.close()
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
