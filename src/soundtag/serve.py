"""`soundtag serve`: an HTTP API and a web page over one loaded model (extra ``[serve]``: FastAPI, uvicorn).

One process, one model file, N interpreters (LiteRT interpreters are not thread-safe: one per worker,
lent per window to whichever request or stream needs one). Uploads are spooled to a temporary file by
Starlette (never held whole in memory) and decoded from it; requests wait for a turn in a bounded queue.
Every bad input is an answer (400/403/408/413/415/421/422/429, the CLI's one-line message as
``{"error"}``), never a 500.

A hostile client cannot sink it (issue #18), each limit a ServeConfig field and a flag:
- admission before parsing: an upload beyond ``workers + queue`` gets 429 before its body is read, and
  one over ``--max-upload-mb`` 413 (by Content-Length, or as it streams in); the form has at most
  MAX_FORM_FIELDS fields of MAX_FIELD_BYTES each;
- time: a request's headers must arrive within ``--read-timeout-s`` (uvicorn waits for ever), its body
  may pause no longer than that and must average MIN_UPLOAD_BYTES_PER_S; a stream that sends nothing
  for ``--stream-idle-s``, or does not read its results for SEND_TIMEOUT_S, is closed;
- work: an input or a stream of more than ``--max-windows`` windows at its hop, or longer than
  ``--max-duration-s``, is refused (uploads up front, by their declared duration); a client that leaves
  stops its work at the next window; large responses are built off the event loop; a WebSocket message
  is at most STREAM_MAX_MESSAGE_BYTES and its windows are cut one at a time;
- connections: at most ``--max-connections`` (uvicorn answers 503 beyond), ``--max-streams`` streams;
- origin: the Host header must name the bound address (or ``--allowed-host``), and a browser's Origin
  on the WebSocket and on POSTs must be this server's own (or ``--allowed-origin``): no other web page
  the user opens can drive a server on 127.0.0.1, even after DNS rebinding;
- metrics are labelled by route template, so unknown paths add no series.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and
# its types are imported inside create_app (the [serve] extra is optional).
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .errors import (AudioError, InferenceError, ModelError, OptionsError, SoundtagError,
                     TooLongError)
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
MAX_FORM_FIELDS = len(OPTION_FIELDS) + 1  # the options and the file; more fields: 422
MAX_FIELD_BYTES = 16 * 1024  # one text field of the form (a long allow list fits); more: 413
MIN_UPLOAD_BYTES_PER_S = 32 * 1024  # after --read-timeout-s, an upload must average at least this
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
STREAM_MAX_MESSAGE_BYTES = 1 << 20  # one WebSocket message: 8 s of 32 kHz 16-bit stereo; more closes it (1009)
STREAM_MAX_CONFIG_BYTES = 16 * 1024  # the stream's first message, its JSON configuration
SEND_TIMEOUT_S = 10.0  # a stream whose client does not take its results for this long is closed
API_KEY_ENV = "SOUNDTAG_API_KEY"  # where `serve` reads the key from when no flag gives it
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # a loopback server answers to each of these
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bound to every address: the names it is reached by are unknown


@dataclass(frozen=True)
class ServeConfig:
    options: TaggerOptions  # model path, threads and the default tag options
    workers: int = 1  # interpreters, i.e. windows tagged at once
    queue: int = 8  # uploads that may wait for a turn beyond the ones running; more get 429
    max_upload_mb: float = 100.0  # larger uploads get 413
    max_duration_s: float = 3600.0  # longer audio (an upload or a stream) gets 413 / closes the stream
    max_windows: int = 1000  # windows per upload or stream at its hop; more get 413 / close the stream
    api_key: str | None = None  # Bearer key for every endpoint but /health and the page
    host: str = "127.0.0.1"  # the bound address: the Host and Origin checks start from it
    port: int = 8000
    read_timeout_s: float = 30.0  # headers within this; the body may pause no longer than this
    max_connections: int = 64  # open connections (HTTP and WebSocket); uvicorn answers 503 beyond
    max_streams: int = 4  # WebSocket streams at once; more are closed with 1013 (try again later)
    stream_idle_s: float = 30.0  # a stream that sends nothing for this long is closed
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the bound address ("*": any)
    allowed_origins: tuple[str, ...] = ()  # browser origins accepted besides the server's own ("*": any)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.queue < 0 or self.max_upload_mb <= 0 or self.max_duration_s <= 0:
            raise OptionsError("--workers must be >= 1, --queue >= 0, --max-upload-mb and --max-duration-s > 0")
        for name in ("max_windows", "max_connections", "max_streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("read_timeout_s", "stream_idle_s", "max_upload_mb", "max_duration_s"):
            if not (isinstance(getattr(self, name), (int, float)) and math.isfinite(getattr(self, name))
                    and getattr(self, name) > 0):
                raise OptionsError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionsError("the API key is empty: give a non-empty key (or none, for an open server)")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        object.__setattr__(self, "allowed_origins", tuple(o.rstrip("/").lower() for o in self.allowed_origins))

    def host_names(self) -> tuple[str, ...]:
        """The Host names a request may give ("*": any): the bound address (every loopback name for a
        loopback one, any for a wildcard bind, whose names are unknown) and ``allowed_hosts``."""
        bound = self.host.strip("[]").lower()
        if bound in WILDCARD_HOSTS:
            names = ("*",)
        elif bound in LOOPBACK_NAMES or bound.startswith("127."):
            names = (bound, *LOOPBACK_NAMES)
        else:
            names = (bound,)
        return names + self.allowed_hosts


class ModelPool:
    """N interpreters of one model file, lent one window at a time (a thread blocks until one is free)."""

    def __init__(self, options: TaggerOptions, workers: int, on_window=None) -> None:
        self.options, self.workers = options, workers
        self.on_window = on_window  # called after every window a model ran (the metrics' window count)
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
                     "embedding": first.has_embedding, "accelerator": first.accelerator, "workers": self.workers,
                     "spec": first.spec.summary()}
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
    """Looks like a Model to a Tagger or a TagStream; each call borrows a free interpreter."""

    def __init__(self, pool: ModelPool, example) -> None:
        self._pool = pool
        self.path, self.precision, self.has_embedding = example.path, example.precision, example.has_embedding
        self.spec = example.spec
        self.input_kind, self.features = example.input_kind, example.features

    def run(self, logmel):
        model = self._pool.borrow()
        try:
            out = model.run(logmel)
        finally:
            self._pool.give_back(model)
        if self._pool.on_window is not None:
            self._pool.on_window()
        return out

    def __call__(self, logmel):
        return self.run(logmel)[0]


@dataclass
class _House:
    """What the server holds now: uploads admitted (running or waiting), streams open."""

    uploads: int = 0
    streams: int = 0


def create_app(config: ServeConfig):
    """The FastAPI application (the model loads in the background when the app starts)."""
    try:
        from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise OptionsError(f"serve needs FastAPI and uvicorn: pip install 'soundtag[serve]' ({exc})") from None

    metrics = _Metrics()
    pool = ModelPool(config.options, config.workers, on_window=metrics.windows.inc)
    turns = asyncio.Semaphore(config.workers)
    house = _House()

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=pool.load, name="soundtag-model-load", daemon=True)
        loader.start()
        yield

    # no /docs: Swagger UI loads from a CDN, and everything served here works offline (docs/reference/http.md)
    app = FastAPI(title="soundtag", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):  # e.g. ?scores=maybe: one line, as every error here
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # FastAPI's own 404/405/400 as {"error"}, not {"detail"}
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    limit = int(config.max_upload_mb * 1_000_000)
    app.add_middleware(_Admission, house=house, capacity=config.workers + config.queue,
                       limit_bytes=limit + UPLOAD_SLACK_BYTES, read_timeout_s=config.read_timeout_s,
                       message=f"upload larger than the limit of {config.max_upload_mb:g} MB (--max-upload-mb)")
    if config.api_key:
        app.add_middleware(_ApiKey, key=config.api_key)
    app.add_middleware(_Guard, hosts=config.host_names(), origins=config.allowed_origins)
    app.add_middleware(_Measure, metrics=metrics, routes=lambda: app.routes)

    def error(status: int, reason: str, **headers) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status, headers=headers or None)

    def options_for(fields: dict) -> TaggerOptions:
        """The server's options with a request's fields (same meaning and validation as the CLI)."""
        given = {k: v for k, v in fields.items() if v not in (None, "")}
        for key in ("allow", "deny"):
            value = given.get(key)
            if isinstance(value, str):
                given[key] = [c.strip() for c in value.split(",") if c.strip()]
            elif value is not None and not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
                raise OptionsError(f"{key} must be a comma-separated string or a list of class names, got {value!r:.80}")
        return replace(config.options, max_duration_s=min(config.options.max_duration_s, config.max_duration_s),
                       max_windows=config.max_windows, **given)

    def not_ready() -> JSONResponse | None:
        if pool.error:
            return error(503, f"model failed to load: {pool.error}")
        if not pool.ready.is_set():
            return error(503, "model loading", **{"Retry-After": str(RETRY_AFTER_S)})
        return None

    @app.get("/health")
    async def health():
        """Alive: answers as soon as the server runs (no API key needed)."""
        return {"status": "alive"}

    @app.get("/ready", responses={503: {"description": "the model is loading (Retry-After) or failed to load"}})
    async def ready():
        """Ready once the model is loaded (it loads in the background when the server starts)."""
        return not_ready() or {"status": "ready"}

    @app.get("/info", responses={503: {"description": "the model is not loaded yet"}})
    async def info():
        """The model file, its sha256, precision and spec, the accelerator, workers, limits and version."""
        return not_ready() or {**pool.info, "version": __version__, "max_upload_mb": config.max_upload_mb,
                               "max_duration_s": config.max_duration_s, "max_windows": config.max_windows,
                               "queue": config.queue, "max_streams": config.max_streams}

    @app.get("/v1/labels", responses={503: {"description": "the model is not loaded yet"}})
    async def labels_list():
        """The model's classes: `{"index", "mid", "label"}` each (527 for AudioSet)."""
        return not_ready() or [{"index": lab.index, "mid": lab.mid, "label": lab.name} for lab in pool.lent.spec.labels]

    @app.get("/metrics")
    async def metrics_text():
        """Prometheus text: requests by route and status, latency, queue depth, windows tagged."""
        metrics.queue_depth.set(house.uploads)
        metrics.streams.set(house.streams)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/tags", openapi_extra=_UPLOAD_SCHEMA, responses=_TAG_RESPONSES)
    async def tags(request: Request, format: str = Query("json"), scores: bool = Query(False)):
        """Tag one uploaded audio file (multipart form: ``file`` and the tag options)."""
        if (busy := not_ready()) is not None:
            return busy
        if format not in ("json", "csv"):
            return error(422, f"format must be json or csv, got {format!r}")
        try:  # admitted by _Admission already: parsing spools the file to disk, the fields stay small
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
        except HTTPException as exc:  # malformed multipart, too many fields, a field too large
            return error(413 if "maximum size" in str(exc.detail) else 422, f"form: {exc.detail}")
        except ClientDisconnect:  # left in the middle of its upload
            return Response(status_code=CLIENT_GONE)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return error(422, "file: Field required (an audio file in the form field 'file')")
            try:
                fields = _form_fields(form)
                options = options_for(fields)
            except OptionsError as exc:
                return error(422, exc.reason)
            if upload.size is not None and upload.size > limit:
                return error(413, f"upload larger than the limit of {config.max_upload_mb:g} MB (--max-upload-mb)")
            name = _printable(upload.filename or "upload")
            cancel = threading.Event()
            async with turns:
                if await _client_gone(request):
                    return Response(status_code=CLIENT_GONE)
                tagger = Tagger(options, model=pool.lent)
                work = asyncio.ensure_future(run_in_threadpool(tagger.tag_file, upload.file, name, cancel))
                gone = asyncio.ensure_future(_disconnected(request))
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():  # the client left: the work stops at its next window
                    cancel.set()
                    with contextlib.suppress(Exception):
                        await work
                    return Response(status_code=CLIENT_GONE)
                gone.cancel()
                result = work.result()
            body, media = await run_in_threadpool(_render, result, scores, format)  # a big body off the loop
            return Response(body, media_type=media)
        except TooLongError as exc:
            return error(413, exc.reason)
        except AudioError as exc:
            return error(415, exc.reason)
        except InferenceError as exc:
            return error(422, exc.reason)
        finally:
            await form.close()

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        if house.streams >= config.max_streams:
            await _ws_refuse(ws, 1013, f"too many streams: {config.max_streams} already open (--max-streams)")
            return
        house.streams += 1
        try:
            await _stream(ws)
        except (WebSocketDisconnect, _SlowClient):
            return
        finally:
            house.streams -= 1

    async def _stream(ws) -> None:
        if (busy := not_ready()) is not None:
            await _ws_refuse(ws, 1013, json.loads(busy.body)["error"])
            return
        try:
            first = await asyncio.wait_for(ws.receive(), config.stream_idle_s)
        except asyncio.TimeoutError:
            await _ws_refuse(ws, 1008, f"no configuration within {config.stream_idle_s:g} s (--stream-idle-s)")
            return
        if first["type"] == "websocket.disconnect":
            return
        try:
            text = first.get("text")
            if text is None:
                raise ValueError("the first message must be the JSON configuration as text, not binary data")
            if len(text) > STREAM_MAX_CONFIG_BYTES:
                raise ValueError(f"the configuration is over {STREAM_MAX_CONFIG_BYTES} bytes")
            try:
                cfg = json.loads(text)
            except RecursionError:
                raise ValueError("the configuration is nested too deeply") from None
            if not isinstance(cfg, dict):
                raise ValueError("the first message must be a JSON object")
            encoding, channels = cfg.get("encoding", "f32le"), cfg.get("channels", 1)
            options = options_for({k: cfg.get(k) for k in OPTION_FIELDS})
            from .stream import PCM_ENCODINGS, decode_pcm

            if encoding not in PCM_ENCODINGS:
                raise OptionsError(f"encoding must be one of {', '.join(PCM_ENCODINGS)}, got {encoding!r:.40}")
            live = Tagger(options, model=pool.lent).stream(cfg.get("sample_rate"), channels, limited=True)
        except (ValueError, TypeError, OptionsError) as exc:
            await _ws_refuse(ws, 1008, error_reason(exc))
            return
        receiving = None  # the next message, read while the last one is tagged: a client that leaves is seen
        try:
            while True:
                if receiving is None:
                    receiving = asyncio.ensure_future(ws.receive())
                try:
                    msg = await asyncio.wait_for(asyncio.shield(receiving), config.stream_idle_s)
                except asyncio.TimeoutError:
                    await _ws_refuse(ws, 1008, f"no audio for {config.stream_idle_s:g} s (--stream-idle-s)")
                    return
                receiving = None
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes")
                if data is None:
                    continue  # text after the first message: ignored
                step = (lambda d=data: live.feed(decode_pcm(d, encoding, channels))) if data else live.close
                work = asyncio.ensure_future(run_in_threadpool(step))
                receiving = asyncio.ensure_future(ws.receive())
                await asyncio.wait({work, receiving}, return_when=asyncio.FIRST_COMPLETED)
                if receiving.done() and receiving.result()["type"] == "websocket.disconnect":
                    live.cancel.set()  # stops at its next window; nothing to send it to
                    with contextlib.suppress(Exception):
                        await work
                    return
                try:
                    items = await work
                except SoundtagError as exc:
                    await _ws_refuse(ws, 1003 if isinstance(exc, AudioError) and not isinstance(exc, TooLongError)
                                     else 1008, exc.reason)
                    return
                for item in items:
                    rec = item.to_record()
                    if "event" in rec:
                        await _send(ws, {"type": "event", **rec})
                    else:
                        await _send(ws, {"type": "window", **rec, "latency_ms": round(1000 * item.latency_s, 1)})
                if not data:
                    await _send(ws, {"type": "done"})
                    await ws.close()
                    return
        finally:
            live.cancel.set()
            if receiving is not None:
                receiving.cancel()

    page = resources.files("soundtag.assets").joinpath(WEB_ASSETS)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        """The web page: tag a file, or listen live through the microphone (no CDN: works offline)."""
        return HTMLResponse(page.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str):
        """The page's script and stylesheet."""
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json"}
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        item = page.joinpath(name)
        if "/" in name or name.startswith(".") or suffix not in types or not item.is_file():
            return error(404, f"no such file: {name}")
        return Response(item.read_bytes(), media_type=types[suffix])

    app.state.pool = pool
    app.state.house = house
    return app


_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the audio file (any format soundtag reads)"},
        "top_k": {"type": "integer", "minimum": 1}, "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "hop_s": {"type": "number"}, "aggregate": {"type": "string", "enum": ["max", "mean"]},
        "allow": {"type": "string", "description": "comma-separated class names or MIDs"},
        "deny": {"type": "string", "description": "comma-separated class names or MIDs"}}}}}}}
_TAG_RESPONSES = {
    200: {"description": "the CLI's JSONL record as JSON (`?format=csv`: its CSV; `?scores=1`: all 527 scores too)"},
    401: {"description": "no or a wrong API key (`--api-key`)"},
    408: {"description": "headers or body too slow (`--read-timeout-s`)"},
    413: {"description": "upload over `--max-upload-mb`, audio over `--max-duration-s` or `--max-windows`"},
    415: {"description": "not decodable audio"},
    422: {"description": "bad options or a malformed form"},
    429: {"description": "`--workers` + `--queue` uploads already admitted (Retry-After)"},
    499: {"description": "the client left: its work stopped at the next window"},
    503: {"description": "the model is not loaded yet"},
}
_FIELD_TYPES = {"top_k": (int, "a valid integer"), "threshold": (float, "a valid number"), "hop_s": (float, "a valid number")}


def _form_fields(form) -> dict:
    """The tag options among a form's text fields, typed (OptionsError naming the field otherwise)."""
    out = {}
    for key in OPTION_FIELDS:
        value = form.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise OptionsError(f"{key}: expected a text field, got a file")
        kind, what = _FIELD_TYPES.get(key, (str, ""))
        try:
            out[key] = kind(value)
        except ValueError:
            raise OptionsError(f"{key}: Input should be {what}, got {value!r:.40}") from None
    return out


def _printable(name: str) -> str:
    """An upload's name as valid UTF-8 text: a lone surrogate (from a percent-encoded name) becomes '?'."""
    return name.encode("utf-8", "replace").decode("utf-8")


def _render(result, scores: bool, fmt: str) -> tuple[bytes, str]:
    record = result.to_record(scores=scores)
    if fmt == "csv":
        from .writers import csv_header, csv_rows

        return (csv_header() + csv_rows(record)).encode("utf-8"), "text/csv"
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8"), "application/json"


class _SlowClient(Exception):
    pass


async def _send(ws, message: dict) -> None:
    """Send one message; a client that does not take it within SEND_TIMEOUT_S ends its stream."""
    try:
        await asyncio.wait_for(ws.send_json(message), SEND_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise _SlowClient from None


async def _ws_refuse(ws, code: int, reason: str) -> None:
    """The one-line error as a message, then the close code."""
    with contextlib.suppress(Exception):
        await _send(ws, {"type": "error", "error": reason})
        await ws.close(code=code)


async def _client_gone(request) -> bool:
    """Whether the client has closed the connection. Starlette's is_disconnected() polls with a cancelled
    scope, which cannot see it: uvicorn notices a closed socket only once reading resumes, inside receive()."""
    import anyio

    with anyio.move_on_after(DISCONNECT_POLL_S):
        return (await request.receive()).get("type") == "http.disconnect"
    return False


async def _disconnected(request) -> None:
    """Returns when the client closes the connection (its body has been read: receive() waits for that)."""
    while (await request.receive()).get("type") != "http.disconnect":
        pass


class _Metrics:
    """Prometheus metrics of one app (its own registry: several apps in one process stay apart)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("soundtag_requests", "HTTP requests by route and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("soundtag_request_seconds", "HTTP request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("soundtag_queue_depth", "uploads running or waiting for a turn", registry=self.registry)
        self.streams = Gauge("soundtag_streams", "WebSocket streams open", registry=self.registry)
        self.windows = Counter("soundtag_windows", "windows the model ran (uploads and streams)", registry=self.registry)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _Measure:
    """ASGI middleware: request count by route template (e.g. /static/{name}; "unmatched" for any path no
    route has, so a client cannot add series) and status, and latency, for /metrics."""

    def __init__(self, app, metrics: _Metrics, routes) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _template(self, scope) -> str:
        from starlette.routing import Match

        for route in self.routes():
            if route.matches(scope)[0] != Match.NONE:
                return getattr(route, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {"code": 500}
        endpoint = self._template(scope)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class _Guard:
    """ASGI middleware: the Host header must name this server (``hosts``, "*" for any: 421 otherwise),
    and a browser's Origin, on a WebSocket or a POST, must be this server's own (scheme://Host) or one
    of ``origins`` (403 otherwise): a web page elsewhere cannot drive it, even after DNS rebinding."""

    def __init__(self, app, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        name = urlsplit(f"//{host}").hostname or ""
        if "*" not in self.hosts and name not in self.hosts:
            return await _refuse(scope, send, 421, f"Host {host!r:.80} is not this server's name (--allowed-host)")
        origin = headers.get(b"origin")
        if origin is not None and (scope["type"] == "websocket" or scope["method"] not in ("GET", "HEAD", "OPTIONS")):
            origin = origin.decode("latin-1").strip().rstrip("/").lower()
            own = {f"{scheme}://{host}" for scheme in ("http", "https")}
            if origin not in own and origin not in self.origins and "*" not in self.origins:
                return await _refuse(scope, send, 403, f"Origin {origin!r:.80} may not use this server (--allowed-origin)")
        return await self.app(scope, receive, send)


async def _refuse(scope, send, status: int, reason: str) -> None:
    if scope["type"] == "websocket":  # closed before the handshake completes: the client sees HTTP 403
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
    else:
        await _send_json(send, status, {"error": reason})


class _UploadTooLarge(Exception):
    pass


class _ReadTimeout(Exception):
    pass


class _Admission:
    """ASGI middleware for uploads (POST /v1/tags), before anything reads their body: 429 when
    ``capacity`` uploads are in the house already, 413 over the size limit (by Content-Length, or as it
    streams in: also chunked), 408 when the body pauses longer than ``read_timeout_s`` or falls below
    MIN_UPLOAD_BYTES_PER_S on average after that. Counts the uploads in ``house``."""

    def __init__(self, app, house: _House, capacity: int, limit_bytes: int, read_timeout_s: float, message: str) -> None:
        self.app, self.house, self.capacity = app, house, capacity
        self.limit, self.read_timeout_s, self.message = limit_bytes, read_timeout_s, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/tags" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, {"error": self.message})
        if self.house.uploads >= self.capacity:
            return await _send_json(send, 429, {"error": "server busy: the queue is full, retry later"},
                                    {"retry-after": str(RETRY_AFTER_S)})
        self.house.uploads += 1
        received, started, body_done = 0, {"yes": False}, {"yes": False}
        t0 = time.monotonic()

        async def guarded_receive():
            nonlocal received
            if body_done["yes"]:  # after the body: only the disconnect is left to wait for
                return await receive()
            # the body's time so far may not exceed read_timeout_s, or its size at MIN_UPLOAD_BYTES_PER_S
            left = max(self.read_timeout_s, received / MIN_UPLOAD_BYTES_PER_S) - (time.monotonic() - t0)
            if left <= 0:
                raise _ReadTimeout
            try:
                message = await asyncio.wait_for(receive(), min(self.read_timeout_s, left))
            except asyncio.TimeoutError:
                raise _ReadTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _UploadTooLarge
                body_done["yes"] = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started["yes"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _UploadTooLarge:
            if not started["yes"]:
                await _send_json(send, 413, {"error": self.message})
        except _ReadTimeout:
            if not started["yes"]:
                await _send_json(send, 408, {"error": f"the upload stalled: no data for {self.read_timeout_s:g} s, or "
                                                      f"under {MIN_UPLOAD_BYTES_PER_S // 1024} KB/s (--read-timeout-s)"},
                                 {"connection": "close"})
        finally:
            self.house.uploads -= 1


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` (the scheme in any case; or ``?api_key=KEY`` for a
    WebSocket, which a browser cannot give headers) on every path but /health and the page."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS or scope["path"].startswith("/static/"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, token = given.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if scope["type"] == "websocket" and not token:
            token = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key") or [""])[0]
        if hmac.compare_digest(token.encode("utf-8", "replace"), self.key.encode()):
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


def read_api_key(flag: str | None, key_file: str | None) -> str | None:
    """The API key from --api-key, else --api-key-file (its first line), else $SOUNDTAG_API_KEY; None for
    an open server. An empty key is refused (OptionsError): it would read as 'no key' or match nothing."""
    if flag is not None and key_file is not None:
        raise OptionsError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise OptionsError(f"--api-key-file {key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not key:
            raise OptionsError(f"--api-key-file {key_file}: the file's first line is empty")
        return key
    if flag is not None:
        if not flag.strip():
            raise OptionsError("--api-key is empty: give a key, or leave the flag out for an open server")
        return flag
    return os.environ.get(API_KEY_ENV) or None


def _header_deadline_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on every request's headers. uvicorn waits for them for ever
    (its keep-alive timer covers only the idle gap before a request's first byte), so a client that
    trickles its headers would hold its connection, and a slot of --max-connections, for good."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # headers complete (or an upgrade): the app's turn
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(read_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    return HeaderDeadline


def serve(config: ServeConfig) -> None:
    """Run the app on uvicorn (config.host, config.port) until interrupted."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=config.host, port=config.port, log_level="warning",
        http=_header_deadline_protocol(config.read_timeout_s), ws_max_size=STREAM_MAX_MESSAGE_BYTES,
        limit_concurrency=config.max_connections, timeout_keep_alive=KEEP_ALIVE_S))
    server.run()
