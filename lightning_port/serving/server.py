"""``tsa-serve MODEL_DIR``: the bring-your-own-container HTTP server (SageMaker's ``/ping`` + ``/invocations``).

::

    tsa-serve MODEL_DIR [--host 127.0.0.1] [--port 8080] [--backend onnx|eager] [--max-batch 16]
              [--max-wait-ms 2] [--threads 1] [--strict] [--features PATH]

- ``GET /ping`` -> 200 ``{"status": "Healthy"}`` once the model is loaded;
- ``POST /invocations`` -> 200 with the legacy answer, serialised as the legacy model server did
  (``json.dumps(answer, indent=2)``), Content-Type / Accept read as the SageMaker toolkit handed them to
  the legacy handler (a missing Accept or ``*/*`` means ``application/json``);
- refusals are a 4xx with a one-line JSON body ``{"error": ..., "expected": ...}``: 415 for a content type
  other than exactly ``application/json`` (the legacy's message), 400 for a body that is not JSON / UTF-8,
  422 for request data that crashed the legacy handler (``{"error": "<Type>: <message>", "type", "message"}``
  with the legacy exception's type and message) or that strict mode refuses, 406 for an Accept other than
  ``application/json``, 413 for a body over ``--max-body-bytes``; an internal failure is a 500 with one
  line; never a traceback (it goes to the server log).

Concurrent requests are micro-batched into one model call (:mod:`lightning_port.serving.batching`). The
server prints ``tsa-serve: listening on http://HOST:PORT (...)`` once its socket accepts connections.
"""

import argparse
import asyncio
import json
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from .artifacts import ArtifactError
from .batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, MicroBatcher, exact_batching
from .inference import ACCEPT, CONTENT_TYPE, SANITY_FAILURE, EndpointModel, input_fn, load_endpoint
from .preprocess import LegacyRequestError, SanityFailure, StrictRefusal, redacted

PROG = "tsa-serve"
logger = logging.getLogger("lightning_port.serving")
DEFAULT_MAX_BODY = 10 << 20


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Reply(NamedTuple):
    status: int
    body: bytes


def error_body(status: int, error: str, **extra: str) -> Reply:
    return Reply(status, json.dumps({"error": _one_line(error), **extra}).encode())


class Endpoint:
    """The request handling, independent of the web framework (tested directly and through HTTP)."""

    def __init__(self, model: EndpointModel, max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_body: int = DEFAULT_MAX_BODY):
        self.model = model
        self.max_batch, self.batching_note = exact_batching(model, max_batch)
        self.batcher = MicroBatcher(model.score_many, self.max_batch, max_wait_ms)
        self.max_wait_ms = max_wait_ms
        self.max_body = max_body
        self.in_flight = 0  # HTTP requests received and not yet answered (counted by the event loop's thread)

    def close(self) -> None:
        self.batcher.close()

    async def invoke(self, body: bytes, content_type: str | None, accept: str | None, alone: bool = False) -> Reply:
        """One /invocations request -> (status, body). ``alone``: no other request is in flight (the HTTP layer
        knows): when the batcher is idle too, the request is scored here, in the event loop's thread, without the
        hand-over to the batcher's thread (~0.6 ms measured) -- the same single-row model call."""
        try:
            with self.batcher.arriving():
                prepared = self._prepare(body, content_type, accept)
            if isinstance(prepared, Reply):
                return prepared
            if isinstance(prepared, SanityFailure):
                prediction: int | float = SANITY_FAILURE
            elif alone and self.batcher.idle():
                prediction = self.model.finish(self.batcher.score_inline(prepared))
            else:
                score = await asyncio.wrap_future(self.batcher.submit(prepared))
                prediction = self.model.finish(score)
            return Reply(200, json.dumps(self.model.answer(prediction), indent=2).encode())
        except StrictRefusal as exc:
            return error_body(422, f"StrictRefusal: {exc}", type="StrictRefusal", message=_one_line(str(exc)))
        except Exception as exc:  # noqa: BLE001 - internal failure: one line to the client, traceback to the log
            logger.exception("internal error on /invocations")
            return error_body(500, f"internal error: {type(exc).__name__}: {_one_line(str(exc), 300)}")

    def _prepare(self, body: bytes, content_type: str | None, accept: str | None) -> Any:
        if len(body) > self.max_body:
            return error_body(413, f"request body of {len(body)} bytes is larger than {self.max_body}",
                              expected=f"a body of at most {self.max_body} bytes")
        if content_type != CONTENT_TYPE:  # the legacy input_fn's check, before anything else
            return error_body(415, f"{content_type} not supported by script!", expected=f"Content-Type: {CONTENT_TYPE}")
        try:
            text = body.decode("utf-8")  # the toolkit decodes JSON bodies as UTF-8 before input_fn
        except UnicodeDecodeError as exc:
            return error_body(400, f"UnicodeDecodeError: {exc}", expected="a UTF-8 JSON body")
        try:
            data = input_fn(text, content_type)
        except json.JSONDecodeError as exc:
            return error_body(400, f"JSONDecodeError: {exc}", expected="a JSON body")
        try:
            parsed = self.model.parse(data)
        except LegacyRequestError as exc:
            err = exc.error
            if logger.isEnabledFor(logging.INFO):
                logger.info("request refused as the legacy did: %s", redacted(exc))
            return error_body(422, f"{type(err).__name__}: {err}", type=type(err).__name__,
                              message=_one_line(str(err)), stage=exc.stage)
        accept = ACCEPT if accept in (None, "", "*/*") else accept
        if accept != ACCEPT:  # the legacy output_fn's check (after predict_fn: its errors come first)
            return error_body(406, f"output format doesn't support {accept}", expected=f"Accept: {ACCEPT}")
        return parsed


ROUTES = {"/ping": ("GET", "HEAD"), "/invocations": ("POST",)}


def create_app(endpoint: Endpoint) -> Any:
    """The FastAPI application over an :class:`Endpoint`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tsa-serve", docs_url=None, redoc_url=None, openapi_url=None)

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("internal error on %s: %s", request.url.path, exc)
        return Response(error_body(500, f"internal error: {type(exc).__name__}").body, status_code=500,
                        media_type="application/json")

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        allowed = ROUTES.get(request.url.path)
        if allowed is None:
            reply = error_body(404, f"no route {request.url.path}", expected="GET /ping or POST /invocations")
        elif exc.status_code == 405:
            reply = error_body(405, f"{request.method} {request.url.path} not allowed",
                               expected=f"{' or '.join(allowed)} {request.url.path}")
        else:
            reply = error_body(exc.status_code, str(exc.detail))
        return Response(reply.body, status_code=reply.status, media_type="application/json")

    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    @app.api_route("/ping", methods=list(ROUTES["/ping"]))
    async def ping() -> Response:
        return Response(b'{"status": "Healthy"}\n', media_type="application/json")

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        endpoint.in_flight += 1  # counted before the body is read: a request still arriving is in flight
        try:
            body = await request.body()
            status, payload = await endpoint.invoke(body, request.headers.get("content-type"),
                                                    request.headers.get("accept"), alone=endpoint.in_flight == 1)
        finally:
            endpoint.in_flight -= 1
        return Response(payload, status_code=status, media_type="application/json")

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve the legacy TSA endpoint contract over HTTP "
                                "(SageMaker bring-your-own-container: GET /ping, POST /invocations).")
    p.add_argument("model_dir", help="the legacy model folder (isSmall_0_OrderFeature.pt or a port .ckpt / .onnx, "
                                     "preprocessor.pkl, percentile_score.pkl, bspline_parameters.json, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080, SageMaker's; 0 picks a free one)")
    p.add_argument("--backend", choices=("onnx", "eager"), default="onnx", help="ONNX Runtime (default) or the eager port")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"most concurrent requests scored in one model call (default {DEFAULT_MAX_BATCH}; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                   help=f"longest wait for more requests while others are still arriving (default {DEFAULT_MAX_WAIT_MS:g})")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the model (default 1, as the legacy)")
    p.add_argument("--strict", action="store_true",
                   help="refuse what the legacy scored silently wrong (docs/serving.md, 'Strict mode')")
    p.add_argument("--features", default=None, help="features.json to use instead of MODEL_DIR/features.json / the "
                                                   "packaged lists")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body (default 10 MiB)")
    p.add_argument("--log-level", default="warning", help="log level of the server (default warning)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                   help="uvicorn's HTTP parser (default auto: httptools when installed, else h11)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_body_bytes < 1:
            raise ArtifactError("--max-batch and --max-body-bytes must be >= 1, --max-wait-ms >= 0")
        model = load_endpoint(args.model_dir, args.backend, strict=args.strict, features=args.features,
                              threads=args.threads)
        endpoint = Endpoint(model, args.max_batch, args.max_wait_ms, args.max_body_bytes)
    except (ArtifactError, ValueError) as exc:
        print(f"{PROG}: error: {_one_line(str(exc), 1000)}", file=sys.stderr)
        return 2
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and without it Nagle's
        # algorithm and the client's delayed ACK add ~40 ms to every response after the first few on a connection
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as exc:
        endpoint.close()
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(endpoint), log_level=args.log_level.lower(), access_log=args.access_log,
                            lifespan="off", timeout_keep_alive=60, http=args.http)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    batching = (f"micro-batching up to {endpoint.max_batch}, wait <= {args.max_wait_ms:g} ms"
                if endpoint.max_batch > 1 else f"one request per model call: {endpoint.batching_note}")
    print(f"{PROG}: listening on http://{shown}:{port} ({model.describe()}; {batching})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        endpoint.close()
        sock.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
