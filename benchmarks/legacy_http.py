"""A minimal HTTP server around the reproduced legacy handler, for the endpoint benchmark's legacy side (stdlib only).

::

    python -m benchmarks.legacy_http MODEL_DIR [--features PATH] [--host 127.0.0.1] [--port 0]

The SageMaker bring-your-own-container routes, served the way the SageMaker inference toolkit calls a handler:
``GET /ping`` -> 200; ``POST /invocations`` -> ``input_fn(body, Content-Type)``, ``predict_fn``, ``output_fn(prediction,
Accept)`` (a missing Accept or ``*/*`` becomes ``application/json``, as the toolkit's default accept), answered with
``json.dumps(answer, indent=2)`` (TorchServe's formatting of a dict result); an exception answers 500 with
``str(exception)``. ``http.server.ThreadingHTTPServer``: one thread per connection, HTTP/1.1 keep-alive; each request
runs the handler's single torch thread (its ``model_fn`` sets one); TCP_NODELAY. The handler's own prints are
discarded.

It prints ``legacy-http: listening on http://HOST:PORT (...)`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_ACCEPT = "application/json"


def make_handler(H, model):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes: no Nagle / delayed-ACK stall

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/ping":
                self._send(200, b"")
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path != "/invocations":
                self._send(404, b'{"error": "not found"}')
                return
            content_type = self.headers.get("Content-Type")
            accept = self.headers.get("Accept")
            if not accept or accept == "*/*":
                accept = DEFAULT_ACCEPT
            try:
                body = raw.decode("utf-8")
                data = H.input_fn(body, content_type)
                prediction = H.predict_fn(data, model)
                answer = H.output_fn(prediction, accept)
            except Exception as exc:  # noqa: BLE001 - the toolkit answers 500 with the exception's text
                self._send(500, str(exc).encode("utf-8"), "text/plain")
                return
            self._send(200, json.dumps(answer, indent=2).encode("utf-8"))

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.legacy_http", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--features", type=Path, default=None,
                   help="feature lists (default: features.json in MODEL_DIR, else parity/fixtures/endpoint/features.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (the ready line names it)")
    args = p.parse_args(argv)

    from parity.endpoint import FEATURES
    from reference import pytorch_inference_handler as H

    features = args.features
    if features is None and not (args.model_dir / "features.json").is_file():
        features = FEATURES
    model = H.model_fn(args.model_dir, features=features)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(H, model))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"legacy-http: listening on http://{host}:{port} (reproduced legacy handler, {args.model_dir})", flush=True)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the server
    # the handler prints a line per request (and the whole request on warnings)
    with contextlib.redirect_stdout(devnull), contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
