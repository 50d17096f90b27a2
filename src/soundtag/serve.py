"""`soundtag serve`: an HTTP API and a web page over one loaded model (extra ``[serve]``: FastAPI, uvicorn).

One process, one model file, N interpreters (LiteRT interpreters are not thread-safe: one per worker,
lent per window to whichever request or stream needs one). Uploads are spooled to a temporary file by
Starlette (never held whole in memory) and decoded from it; requests wait for a turn in a bounded queue.
Every bad input is an answer (400/413/415/422/429, the CLI's one-line message as ``{"error"}``), never a 500.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and
# its types are imported inside create_app (the [serve] extra is optional).
import asyncio
import json
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources

from . import __version__
from .errors import AudioError, InferenceError, ModelError, OptionsError, SoundtagError, TooLongError
from .labels import labels
from .results import error_reason
from .tagger import Tagger, TaggerOptions, load_model

log = logging.getLogger(__name__)

WEB_ASSETS = "web"  # package folder of the page: soundtag/assets/web
UPLOAD_SLACK_BYTES = 64 * 1024  # multipart headers and form fields on top of the file itself
RETRY_AFTER_S = 2  # advised wait on 429
CLIENT_GONE = 499  # nginx's status for a client that left before its answer
DISCONNECT_POLL_S = 0.05  # how long to listen for a closed connection before a request's turn
PUBLIC_PATHS = ("/health", "/")  # no API key needed (plus /static/: the page holds no data)
OPTION_FIELDS = ("top_k", "threshold", "hop_s", "aggregate", "allow", "deny")  # per-request tag options


@dataclass(frozen=True)
class ServeConfig:
    options: TaggerOptions  # model path, threads and the default tag options
    workers: int = 1  # interpreters, i.e. windows tagged at once
    queue: int = 8  # uploads that may wait for a turn beyond the ones running; more get 429
    max_upload_mb: float = 100.0  # larger uploads get 413
    max_duration_s: float = 3600.0  # longer audio gets 413
    api_key: str | None = None  # Bearer key for every endpoint but /health and the page

    def __post_init__(self) -> None:
        if self.workers < 1 or self.queue < 0 or self.max_upload_mb <= 0 or self.max_duration_s <= 0:
            raise OptionsError("--workers must be >= 1, --queue >= 0, --max-upload-mb and --max-duration-s > 0")


class ModelPool:
    """N interpreters of one model file, lent one window at a time (a thread blocks until one is free)."""

    def __init__(self, options: TaggerOptions, workers: int) -> None:
        self.options, self.workers = options, workers
        self._free: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.error: str | None = None
        self.info: dict = {}

    def load(self) -> None:
        """Load every interpreter (run in a thread at start-up: /health answers meanwhile, /ready is 503)."""
        from .files import file_digest

        try:
            # one worker runs from XNNPACK's mapped weight cache; several take Interpreters, whose runs
            # release the GIL so their windows run at once (each holds its own packed weights)
            models = [load_model(self.options, weight_cache=self.workers == 1) for _ in range(self.workers)]
        except ModelError as exc:
            self.error = str(exc)
            log.error("%s", exc)
            return
        first = models[0]
        self.info = {"model": str(first.path), "sha256": file_digest(first.path, "sha256"), "precision": first.precision,
                     "embedding": first.has_embedding, "accelerator": first.accelerator, "workers": self.workers}
        if first.gpu is not None:
            self.info["gpu"] = {"precision": first.gpu.precision, "backend": first.gpu.backend, "adapter": first.gpu.adapter}
        for m in models:
            self._free.put(m)
        self.lent = PooledModel(self, first)
        self.ready.set()

    def borrow(self):
        return self._free.get()

    def give_back(self, model) -> None:
        self._free.put(model)


class PooledModel:
    """Looks like a Cnn14Model to a Tagger or a TagStream; each call borrows a free interpreter."""

    def __init__(self, pool: ModelPool, example) -> None:
        self._pool = pool
        self.path, self.precision, self.has_embedding = example.path, example.precision, example.has_embedding
        self.input_kind, self.features = example.input_kind, example.features

    def run(self, logmel):
        model = self._pool.borrow()
        try:
            return model.run(logmel)
        finally:
            self._pool.give_back(model)

    def __call__(self, logmel):
        return self.run(logmel)[0]


def create_app(config: ServeConfig):
    """The FastAPI application (the model loads in the background when the app starts)."""
    try:
        from fastapi import FastAPI, File, Form, Query, Request, UploadFile, WebSocket, WebSocketDisconnect
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
        from starlette.concurrency import run_in_threadpool
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise OptionsError(f"serve needs FastAPI and uvicorn: pip install 'soundtag[serve]' ({exc})") from None

    pool = ModelPool(config.options, config.workers)
    metrics = _Metrics()
    turns = asyncio.Semaphore(config.workers)
    state = {"active": 0}  # uploads running or waiting

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=pool.load, name="soundtag-model-load", daemon=True)
        loader.start()
        yield

    app = FastAPI(title="soundtag", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def bad_form(request, exc):  # e.g. top_k=abc, or no file field: one line, as every error here
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")}, status_code=422)
    limit = int(config.max_upload_mb * 1_000_000)
    app.add_middleware(_UploadLimit, limit_bytes=limit + UPLOAD_SLACK_BYTES, path="/v1/tags",
                       message=f"upload larger than the limit of {config.max_upload_mb:g} MB (--max-upload-mb)")
    if config.api_key:
        app.add_middleware(_ApiKey, key=config.api_key)
    app.add_middleware(_Measure, metrics=metrics)

    def error(status: int, reason: str, **headers) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status, headers=headers or None)

    def options_for(fields: dict) -> TaggerOptions:
        """The server's options with a request's fields (same meaning and validation as the CLI)."""
        given = {k: v for k, v in fields.items() if v not in (None, "")}
        for key in ("allow", "deny"):
            if isinstance(given.get(key), str):
                given[key] = [c.strip() for c in given[key].split(",") if c.strip()]
        return replace(config.options, max_duration_s=min(config.options.max_duration_s, config.max_duration_s), **given)

    def not_ready() -> JSONResponse | None:
        if pool.error:
            return error(503, f"model failed to load: {pool.error}")
        if not pool.ready.is_set():
            return error(503, "model loading", **{"Retry-After": str(RETRY_AFTER_S)})
        return None

    @app.get("/health")
    async def health():
        return {"status": "alive"}

    @app.get("/ready")
    async def ready():
        return not_ready() or {"status": "ready"}

    @app.get("/info")
    async def info():
        return not_ready() or {**pool.info, "version": __version__, "max_upload_mb": config.max_upload_mb,
                               "max_duration_s": config.max_duration_s, "queue": config.queue}

    @app.get("/v1/labels")
    async def labels_list():
        return [{"index": lab.index, "mid": lab.mid, "label": lab.name} for lab in labels()]

    @app.get("/metrics")
    async def metrics_text():
        metrics.queue_depth.set(state["active"])
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/tags")
    async def tags(request: Request, file: UploadFile = File(...), top_k: int | None = Form(None),
                   threshold: float | None = Form(None), hop_s: float | None = Form(None),
                   aggregate: str | None = Form(None), allow: str | None = Form(None), deny: str | None = Form(None),
                   format: str = Query("json"), scores: bool = Query(False)):
        if (busy := not_ready()) is not None:
            return busy
        if format not in ("json", "csv"):
            return error(422, f"format must be json or csv, got {format!r}")
        try:
            options = options_for(dict(top_k=top_k, threshold=threshold, hop_s=hop_s, aggregate=aggregate,
                                       allow=allow, deny=deny))
        except OptionsError as exc:
            return error(422, exc.reason)
        if file.size is not None and file.size > limit:
            return error(413, f"upload larger than the limit of {config.max_upload_mb:g} MB (--max-upload-mb)")
        if state["active"] >= config.workers + config.queue:
            return error(429, "server busy: the queue is full, retry later", **{"Retry-After": str(RETRY_AFTER_S)})
        state["active"] += 1
        try:
            async with turns:
                if await _client_gone(request):
                    return Response(status_code=CLIENT_GONE)
                name = file.filename or "upload"
                tagger = Tagger(options, model=pool.lent)
                result = await run_in_threadpool(tagger.tag_file, file.file, name)
        except TooLongError as exc:
            return error(413, exc.reason)
        except AudioError as exc:
            return error(415, exc.reason)
        except InferenceError as exc:
            return error(422, exc.reason)
        finally:
            state["active"] -= 1
            await file.close()
        metrics.windows.inc(len(result.windows))
        record = result.to_record(scores=scores)
        if format == "csv":
            from .writers import csv_header, csv_rows

            return PlainTextResponse(csv_header() + csv_rows(record), media_type="text/csv")
        return JSONResponse(record)

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        try:
            if (busy := not_ready()) is not None:
                await ws.send_json({"type": "error", "error": json.loads(busy.body)["error"]})
                await ws.close(code=1013)
                return
            try:
                cfg = json.loads(await ws.receive_text())
                if not isinstance(cfg, dict):
                    raise ValueError("the first message must be a JSON object")
                encoding, channels = cfg.get("encoding", "f32le"), cfg.get("channels", 1)
                options = options_for({k: cfg.get(k) for k in OPTION_FIELDS})
                from .stream import PCM_ENCODINGS, decode_pcm

                if encoding not in PCM_ENCODINGS:
                    raise OptionsError(f"encoding must be one of {', '.join(PCM_ENCODINGS)}, got {encoding!r}")
                live = Tagger(options, model=pool.lent).stream(cfg.get("sample_rate"), channels)
            except (ValueError, TypeError, OptionsError) as exc:
                await ws.send_json({"type": "error", "error": error_reason(exc)})
                await ws.close(code=1008)
                return
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes")
                if data is None:
                    continue  # text after the first message: ignored
                try:
                    if data:
                        items = await run_in_threadpool(lambda d=data: live.feed(decode_pcm(d, encoding, channels)))
                    else:
                        items = await run_in_threadpool(live.close)
                except SoundtagError as exc:
                    await ws.send_json({"type": "error", "error": exc.reason})
                    await ws.close(code=1003)
                    return
                for item in items:
                    rec = item.to_record()
                    if "event" in rec:
                        await ws.send_json({"type": "event", **rec})
                    else:
                        metrics.windows.inc()
                        await ws.send_json({"type": "window", **rec, "latency_ms": round(1000 * item.latency_s, 1)})
                if not data:
                    await ws.send_json({"type": "done"})
                    await ws.close()
                    return
        except WebSocketDisconnect:
            return

    page = resources.files("soundtag.assets").joinpath(WEB_ASSETS)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str):
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json"}
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        item = page.joinpath(name)
        if "/" in name or name.startswith(".") or suffix not in types or not item.is_file():
            return error(404, f"no such file: {name}")
        return Response(item.read_bytes(), media_type=types[suffix])

    app.state.pool = pool
    return app


async def _client_gone(request) -> bool:
    """Whether the client has closed the connection. Starlette's is_disconnected() polls with a cancelled
    scope, which cannot see it: uvicorn notices a closed socket only once reading resumes, inside receive()."""
    import anyio

    with anyio.move_on_after(DISCONNECT_POLL_S):
        return (await request.receive()).get("type") == "http.disconnect"
    return False


class _Metrics:
    """Prometheus metrics of one app (its own registry: several apps in one process stay apart)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("soundtag_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("soundtag_request_seconds", "HTTP request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("soundtag_queue_depth", "uploads running or waiting for a turn", registry=self.registry)
        self.windows = Counter("soundtag_windows", "10 s windows tagged", registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _Measure:
    """ASGI middleware: request count by endpoint and status, and latency, for /metrics."""

    def __init__(self, app, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {"code": 500}
        endpoint = scope["path"] if scope["path"].startswith("/v1/") or scope["path"] in (
            "/health", "/ready", "/info", "/metrics", "/") else "other"

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class _UploadTooLarge(Exception):
    pass


class _UploadLimit:
    """ASGI middleware: a body over the limit is 413, by its Content-Length or while it streams in."""

    def __init__(self, app, limit_bytes: int, path: str, message: str) -> None:
        self.app, self.limit, self.path, self.message = app, limit_bytes, path, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, {"error": self.message})
        received, started = 0, {"yes": False}

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _UploadTooLarge
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started["yes"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _UploadTooLarge:
            if not started["yes"]:
                await _send_json(send, 413, {"error": self.message})


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` (or ``?api_key=KEY`` for a WebSocket) on every path
    but /health and the page."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS or scope["path"].startswith("/static/"):
            return await self.app(scope, receive, send)
        import hmac
        from urllib.parse import parse_qs

        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.startswith("Bearer ") else ""
        if scope["type"] == "websocket" and not token:
            token = (parse_qs(scope.get("query_string", b"").decode()).get("api_key") or [""])[0]
        if hmac.compare_digest(token.encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        return await _send_json(send, 401, {"error": "API key needed: Authorization: Bearer <key>"},
                                {"www-authenticate": "Bearer"})


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app on uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", ws_max_size=16 * 1024 * 1024)
