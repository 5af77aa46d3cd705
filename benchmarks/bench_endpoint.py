"""The online endpoint (issue 19 item 5): the reproduced legacy handler vs the port's endpoint, side by side in one
run, on the recorded fixture requests that score (parity/fixtures/endpoint: the production-shape model with 413
engineered features, ~40 kB JSON bodies).

In-process, batch 1, one torch thread: each engine answers a request through ``input_fn -> predict_fn ->
output_fn`` (the SageMaker handler contract):

- ``reference``: the reproduced legacy handler (``reference/pytorch_inference_handler.py``: numpy preprocessing,
  the legacy model in eager PyTorch, scipy's spline);
- ``port:onnx`` / ``port:eager``: ``lightning_port.serving.inference`` with each backend (when importable).

Rounds are interleaved: every round visits every request, and for each request every engine in turn (the order
rotating), so a load change on a shared machine hits all engines alike. p50 / p99 are over all timed requests.

Over HTTP on 127.0.0.1 (ready line awaited, ``GET /ping``, then ``POST /invocations`` with the record's body, Content-
Type and Accept on a keep-alive connection):

- ``legacy-http``: :mod:`benchmarks.legacy_http`, the reproduced handler behind the stdlib ``ThreadingHTTPServer``
  (SageMaker toolkit semantics; what the legacy side is compared with over HTTP);
- ``tsa-serve``: the port's server (``tsa-serve MODEL_DIR --host 127.0.0.1 --port P``, its defaults otherwise).

(a) sequential requests, interleaved between the servers and the same engines called in-process in the same rounds:
p50 / p99 and the overhead (p50 over HTTP - p50 of the same engine in-process, measured alongside); (b) a bounded concurrent load: C client threads (each with its own
connection) send N requests in total: p50 / p99 latency and requests/s.

Targets (issue 19): the port's in-process p99 <= 0.35 x the legacy handler's in-process p99; ``tsa-serve``'s p50
overhead over the port in-process <= 1 ms.

``python -m benchmarks.bench_endpoint [--quick] [--rounds R] [--clients C] [--requests N] [--no-http] [--json PATH]``
prints the tables; ``python -m benchmarks -k endpoint`` records the same run in the benchmark JSON / summary.
``--quick``: 3 requests, 2 rounds, 2 clients x 8 requests (a harness check, seconds; the port's engines and
``tsa-serve`` join when importable / installed).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"listening on http://([^\s:/]+):(\d+)")
TARGET_P99_RATIO = 0.35
TARGET_HTTP_OVERHEAD_S = 1e-3
FULL = {"requests": None, "rounds": 5, "http_rounds": 3, "clients": 8, "load_requests": 400, "load_rounds": 2}
QUICK = {"requests": 3, "rounds": 2, "http_rounds": 2, "clients": 2, "load_requests": 8, "load_rounds": 1}
START_TIMEOUT_S = 180.0


def scoring_records(limit: int | None = None) -> list[dict]:
    """The recorded requests whose genuine answer was a score (not -1, NaN or a crash), in id order."""
    from parity import endpoint as E

    out = [q for q, r in E.fixture_records() if E.Outcome.from_record(r).kind == "score"]
    return out[:limit] if limit else out


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs, float)
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "p50": float(np.quantile(a, 0.5)), "p99": float(np.quantile(a, 0.99)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


# --- in-process -----------------------------------------------------------------------------------------------------
def _caller(functions: Any, model: Any) -> Callable[[dict], Any]:
    def call(rec: dict) -> Any:
        data = functions.input_fn(rec["body"], rec["content_type"])
        return functions.output_fn(functions.predict_fn(data, model), rec["accept"])

    return call


def inprocess_engines(include_port: bool = True) -> tuple[dict[str, Callable[[dict], Any]], dict[str, str]]:
    """``{name: call(record) -> answer}`` and ``{name: why not run}``."""
    from parity import endpoint as E
    from reference import pytorch_inference_handler as H

    engines = {"reference": _caller(H, H.model_fn(E.MODEL_DIR, features=E.FEATURES))}
    missing: dict[str, str] = {}
    if include_port:
        try:
            mod = E.port_module()
        except E.PortUnavailable as exc:
            missing["port:onnx"] = missing["port:eager"] = f"not run: {exc}"
        else:
            for backend in ("onnx", "eager"):
                try:
                    engines[f"port:{backend}"] = _caller(mod, mod.model_fn(str(E.MODEL_DIR), backend=backend))
                except Exception as exc:  # noqa: BLE001 - reported, the other engines still run
                    missing[f"port:{backend}"] = f"not run: model_fn failed: {type(exc).__name__}: {exc}"
    return engines, missing


def interleaved_inprocess(engines: dict[str, Callable[[dict], Any]], records: list[dict], rounds: int) -> dict:
    """Per-request latencies (s) of every engine, interleaved; answers compared with the reference's."""
    import torch

    torch.set_num_threads(1)  # the legacy handler's setting (its model_fn sets it too)
    names = list(engines)
    times: dict[str, list[float]] = {n: [] for n in names}
    agree: dict[str, str] = {}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the legacy prints per request
        answers = {n: [engines[n](rec) for rec in records] for n in names}  # warm-up
        for n in names:
            same = sum(a == b for a, b in zip(answers[n], answers["reference"]))
            close = sum(abs(float(a["predictions"][0]["legacy-score"]) - float(b["predictions"][0]["legacy-score"]))
                        <= 1e-5 for a, b in zip(answers[n], answers["reference"]))
            agree[n] = f"{same}/{len(records)} answers identical to the reference's, {close} legacy-scores within 1e-5"
        for r in range(rounds):
            for i, rec in enumerate(records):
                k = (r + i) % len(names)
                for n in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    engines[n](rec)
                    times[n].append(time.perf_counter() - t0)
    return {"latency": {n: stats(ts) for n, ts in times.items()}, "agreement": agree}


# --- HTTP -------------------------------------------------------------------------------------------------------------
class Server:
    """A server subprocess: started, its ready line awaited (``listening on http://HOST:PORT``), output drained."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None):
        self.name, self.cmd = name, cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=env, bufsize=1)
        self.lines: list[str] = []
        self.host = self.port = None
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                if len(self.lines) < 200:
                    self.lines.append(line.rstrip())
                m = READY.search(line)
                if m and not ready.is_set():
                    self.host, self.port = m.group(1), int(m.group(2))
                    ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                why = "exited" if self.proc.returncode is not None else f"not ready after {START_TIMEOUT_S:.0f} s"
                raise RuntimeError(f"{name} {why}: {' | '.join(self.lines[-5:]) or '(no output)'}")
        self._ping()

    def _ping(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", "/ping")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{self.name}: GET /ping answered {resp.status}")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tsa_serve_command() -> list[str] | None:
    """``tsa-serve`` from the installed entry point (run with this interpreter), else on PATH; None if absent."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="console_scripts"):
        if ep.name == "tsa-serve":
            mod, _, func = ep.value.partition(":")
            return [sys.executable, "-c", f"import sys; from {mod} import {func} as m; sys.exit(m())"]
    exe = shutil.which("tsa-serve")
    return [exe] if exe else None


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_servers(include_port: bool = True) -> tuple[dict[str, Server], dict[str, str]]:
    from parity import endpoint as E

    servers: dict[str, Server] = {}
    missing: dict[str, str] = {}
    try:
        servers["legacy-http"] = Server("legacy-http", [sys.executable, "-m", "benchmarks.legacy_http",
                                                        str(E.MODEL_DIR), "--host", "127.0.0.1", "--port", "0"], _env())
    except RuntimeError as exc:
        missing["legacy-http"] = f"not run: {exc}"
    if include_port:
        cmd = tsa_serve_command()
        if cmd is None:
            missing["tsa-serve"] = "not run: tsa-serve is not installed (no console script, not on PATH)"
        else:
            try:
                servers["tsa-serve"] = Server("tsa-serve", cmd + [str(E.MODEL_DIR), "--host", "127.0.0.1", "--port",
                                                                  str(free_port())], _env())
            except RuntimeError as exc:
                missing["tsa-serve"] = f"not run: {exc}"
    return servers, missing


def connect(server: Server, timeout: float = 60) -> http.client.HTTPConnection:
    """A keep-alive connection with TCP_NODELAY (no Nagle / delayed-ACK stalls between a request's segments)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _post(conn: http.client.HTTPConnection, rec: dict) -> tuple[int, bytes]:
    headers = {}
    if rec.get("content_type") is not None:
        headers["Content-Type"] = rec["content_type"]
    if rec.get("accept") is not None:
        headers["Accept"] = rec["accept"]
    conn.request("POST", "/invocations", body=rec["body"].encode("utf-8"), headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def sequential(servers: dict[str, Server], records: list[dict], rounds: int,
               inproc: dict[str, Callable[[dict], Any]] | None = None) -> dict:
    """One client per server (keep-alive); requests interleaved between the servers and the in-process engines of
    ``inproc`` (the same engines measured in the same rounds, for the overhead); latencies and the servers' answers."""
    conns = {n: connect(s) for n, s in servers.items()}
    inproc = inproc or {}
    names = list(servers) + [f"in-process {n}" for n in inproc]
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, int] = {n: 0 for n in servers}
    bodies: dict[str, list] = {n: [] for n in servers}

    def once(name: str, rec: dict) -> float:
        t0 = time.perf_counter()
        if name in servers:
            status, _ = _post(conns[name], rec)
            errors[name] += status != 200
        else:
            inproc[name.removeprefix("in-process ")](rec)
        return time.perf_counter() - t0

    try:
        for n in servers:  # warm-up
            for rec in records:
                status, body = _post(conns[n], rec)
                bodies[n].append(json.loads(body) if status == 200 else status)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            for r in range(rounds):
                for i, rec in enumerate(records):
                    k = (r + i) % len(names)
                    for n in names[k:] + names[:k]:
                        times[n].append(once(n, rec))
    finally:
        for c in conns.values():
            c.close()
    return {"latency": {n: stats(ts) for n, ts in times.items()}, "errors": errors, "answers": bodies}


def concurrent(server: Server, records: list[dict], clients: int, total: int) -> dict:
    """``clients`` threads, each on its own keep-alive connection, send ``total`` requests (records in turn)."""
    lock = threading.Lock()
    next_i = [0]
    lat: list[float] = []
    errors = [0]
    start = threading.Barrier(clients + 1)

    def client():
        conn = connect(server, timeout=120)
        start.wait()
        try:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= total:
                    return
                t0 = time.perf_counter()
                status, _ = _post(conn, records[i % len(records)])
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors[0] += status != 200
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {**stats(lat), "clients": clients, "requests": total, "wall_s": wall, "rps": total / wall,
            "errors": errors[0]}


# --- the whole run --------------------------------------------------------------------------------------------------
def run(quick: bool = False, include_port: bool = True, http: bool = True, **overrides: Any) -> dict:
    cfg = dict(QUICK if quick else FULL)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    records = scoring_records(cfg["requests"])
    engines, missing = inprocess_engines(include_port)
    if not include_port:
        missing.update({n: "not run (--no-port)" for n in ("port:onnx", "port:eager", "tsa-serve")})
    out: dict[str, Any] = {"quick": quick, "config": cfg, "requests": len(records), "threads": 1,
                           "engines": list(engines), "not_run": dict(missing)}
    inp = interleaved_inprocess(engines, records, cfg["rounds"])
    out["inprocess"] = inp["latency"]
    out["agreement"] = inp["agreement"]
    if http:
        servers, missing_http = start_servers(include_port)
        out["not_run"].update(missing_http)
        try:
            if servers:
                same_engine = {"legacy-http": "reference", "tsa-serve": "port:onnx"}
                inproc = {same_engine[n]: engines[same_engine[n]] for n in servers if same_engine[n] in engines}
                seq = sequential(servers, records, cfg["http_rounds"], inproc)
                out["http_sequential"] = {n: v for n, v in seq["latency"].items() if n in servers}
                out["http_inprocess_same_rounds"] = {n.removeprefix("in-process "): v for n, v in seq["latency"].items()
                                                     if n not in servers}
                out["http_errors"] = seq["errors"]
                ref_answers = seq["answers"].get("legacy-http")
                out["http_agreement"] = {
                    n: f"{sum(a == b for a, b in zip(ans, ref_answers))}/{len(records)} answers identical to "
                       "legacy-http's" for n, ans in seq["answers"].items()} if ref_answers else {}
                out["http_overhead_p50"] = {  # p50 over HTTP - p50 of the same engine in-process, same rounds
                    n: out["http_sequential"][n]["p50"] - out["http_inprocess_same_rounds"][same_engine[n]]["p50"]
                    for n in servers if same_engine[n] in out["http_inprocess_same_rounds"]}
                load = {n: [] for n in servers}
                for _ in range(cfg["load_rounds"]):
                    for n, s in servers.items():
                        load[n].append(concurrent(s, records, cfg["clients"], cfg["load_requests"]))
                out["http_concurrent"] = {n: _merge_load(rs) for n, rs in load.items()}
        finally:
            for s in servers.values():
                s.stop()
    out["targets"] = targets(out)
    out["machine"] = common.machine_info()
    return out


def _merge_load(rounds: list[dict]) -> dict:
    """The rounds of one server's load: medians of p50 / p99 / rps over rounds, and each round's figures."""
    return {"p50": float(np.median([r["p50"] for r in rounds])), "p99": float(np.median([r["p99"] for r in rounds])),
            "rps": float(np.median([r["rps"] for r in rounds])), "clients": rounds[0]["clients"],
            "requests": rounds[0]["requests"], "errors": sum(r["errors"] for r in rounds), "rounds": rounds}


def targets(res: dict) -> list[dict]:
    out = []
    inp = res.get("inprocess", {})
    ref = inp.get("reference")
    for name in ("port:onnx", "port:eager"):
        row = {"target": f"{name} in-process p99 / legacy handler in-process p99", "needed": f"<= {TARGET_P99_RATIO}"}
        if ref and name in inp:
            ratio = inp[name]["p99"] / ref["p99"]
            row.update(measured=ratio, detail=f"{inp[name]['p99'] * 1e3:.2f} / {ref['p99'] * 1e3:.2f} ms; p50 ratio "
                                               f"{inp[name]['p50'] / ref['p50']:.3f}", met=ratio <= TARGET_P99_RATIO)
        else:
            row.update(measured=None, detail=res["not_run"].get(name, "not measured"), met=None)
        out.append(row)
    row = {"target": "tsa-serve p50 over HTTP - port:onnx p50 in-process (HTTP overhead)",
           "needed": f"<= {TARGET_HTTP_OVERHEAD_S * 1e3:g} ms"}
    ov = res.get("http_overhead_p50", {}).get("tsa-serve")
    if ov is not None:
        row.update(measured=ov, detail=f"{ov * 1e3:.2f} ms", met=ov <= TARGET_HTTP_OVERHEAD_S)
    else:
        row.update(measured=None, detail=res["not_run"].get("tsa-serve") or res["not_run"].get("port:onnx")
                   or "not measured", met=None)
    out.append(row)
    return out


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.2f} ms"


def render(res: dict) -> list[str]:
    """Markdown lines of the run (used by the printout and benchmarks/summary.py)."""
    cfg = res["config"]
    L = [f"Fixture requests that score: {res['requests']}; {res['threads']} torch thread; in-process: {cfg['rounds']} "
         f"interleaved rounds; over HTTP: {cfg['http_rounds']} interleaved sequential rounds, then {cfg['clients']} "
         f"concurrent clients x {cfg['load_requests']} requests ({cfg['load_rounds']} round(s) per server, "
         "alternating).", "",
         "| in-process engine | p50 | p99 | mean | p50 / legacy | p99 / legacy | answers |", "|---|---|---|---|---|---|---|"]
    ref = res["inprocess"].get("reference")
    for n, s in res["inprocess"].items():
        L.append(f"| {n} | {_ms(s['p50'])} | {_ms(s['p99'])} | {_ms(s['mean'])} | {s['p50'] / ref['p50']:.3f} | "
                 f"{s['p99'] / ref['p99']:.3f} | {res['agreement'].get(n, '')} |")
    for n, why in res["not_run"].items():
        if n.startswith("port:"):
            L.append(f"| {n} | {why} | | | | | |")
    if "http_sequential" in res or any(k in res["not_run"] for k in ("legacy-http", "tsa-serve")):
        L += ["", "| over HTTP (127.0.0.1) | sequential p50 | sequential p99 | same engine in-process, same rounds: "
                  f"p50 | overhead p50 | {cfg['clients']} clients: p50 | p99 | requests/s | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
        same = {"legacy-http": "reference", "tsa-serve": "port:onnx"}
        for n, s in res.get("http_sequential", {}).items():
            c = res.get("http_concurrent", {}).get(n, {})
            ov = res.get("http_overhead_p50", {}).get(n)
            ip = res.get("http_inprocess_same_rounds", {}).get(same.get(n), {})
            L.append(f"| {n} | {_ms(s['p50'])} | {_ms(s['p99'])} | {same.get(n)} {_ms(ip.get('p50'))} | {_ms(ov)} | "
                     f"{_ms(c.get('p50'))} | {_ms(c.get('p99'))} | {c.get('rps', 0):.1f} | "
                     f"{res['http_errors'].get(n, 0) + c.get('errors', 0)} |")
        for n in ("legacy-http", "tsa-serve"):
            if n in res["not_run"]:
                L.append(f"| {n} | {res['not_run'][n]} | | | | | | | |")
    L += ["", "| target (issue 19) | measured | needed | status |", "|---|---|---|---|"]
    for t in res["targets"]:
        status = "—" if t["met"] is None else ("met" if t["met"] else "NOT met")
        measured = t["detail"] if t["measured"] is None else f"{t['measured']:.3f} ({t['detail']})" if "ms" not in \
            t["needed"] else t["detail"]
        L.append(f"| {t['target']} | {measured} | {t['needed']} | {status} |")
    return L


# --- pytest-benchmark scenario (python -m benchmarks -k endpoint) ------------------------------------------------------
Scenario = common.WholeRunScenario


def scenarios(quick: bool, device) -> list[Scenario]:
    return [Scenario("endpoint", "endpoint-fixture-b1")]


def test_endpoint(benchmark, scenario: Scenario, options):
    """The whole side-by-side run (in ``extra_info["endpoint"]``); pytest-benchmark's own rounds time the legacy
    handler in-process on the same requests (a cross-check of the interleaved figure)."""
    import itertools

    import torch

    res = run(quick=options["quick"])
    benchmark.extra_info.update({"scenario": "endpoint", "kind": "single", "shape": "endpoint-fixture",
                                 "mode": "serve", "batch": 1, "impl": "legacy_handler", "threads": 1,
                                 "device": "cpu", "endpoint": res})
    from parity import endpoint as E
    from reference import pytorch_inference_handler as H

    call = _caller(H, H.model_fn(E.MODEL_DIR, features=E.FEATURES))
    torch.set_num_threads(1)
    records = itertools.cycle(scoring_records(res["config"]["requests"]))
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        benchmark.pedantic(call, setup=lambda: ((next(records),), {}), rounds=6 if options["quick"] else 50,
                           warmup_rounds=1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_endpoint", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 requests, 2 rounds, 2 clients x 8 requests")
    p.add_argument("--requests", type=int, help="the first N scoring fixture requests (default all)")
    p.add_argument("--rounds", type=int, help="interleaved in-process rounds (default 5)")
    p.add_argument("--http-rounds", type=int, help="interleaved sequential HTTP rounds (default 3)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 8)")
    p.add_argument("--load-requests", type=int, help="requests per concurrent-load round (default 400)")
    p.add_argument("--load-rounds", type=int, help="concurrent-load rounds per server (default 2)")
    p.add_argument("--no-port", action="store_true", help="the legacy side only")
    p.add_argument("--no-http", action="store_true", help="in-process only")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    res = run(quick=args.quick, include_port=not args.no_port, http=not args.no_http, requests=args.requests,
              rounds=args.rounds, http_rounds=args.http_rounds, clients=args.clients,
              load_requests=args.load_requests, load_rounds=args.load_rounds)
    print("\n".join(render(res)))
    m = res["machine"]
    print(f"\nmachine: {m['cpu_model']}, {m['usable_cores']} usable cores, load average {m.get('load_average_1m', '?')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
