"""`tinystory serve`: a web page and an OpenAI-compatible API over one loaded `Generator`.

    GET  /                 the story page (src/tinystory/web/index.html, no build step)
    POST /v1/completions   OpenAI completions, streaming (server-sent events) or not
    GET  /v1/models        the one model served (plus its size, context and defaults)
    GET  /health           liveness, queue length and job counters

One worker thread owns the model. Requests wait in a FIFO queue and run one at a time,
so two clients never share the model's state (no garbled text) and a seed gives the same
story whoever else is connected. Each request carries a stop Event: a client that goes
away, a stop string found in the text, or Ctrl-C sets it, and generation ends at the
next token. The worker never waits for a client: it hands each piece to the request's
event loop and goes on, so a client that reads slowly (or not at all) holds only its own
connection, never the model. Anything a client sends that we cannot serve gets a 4xx
with one JSON line in OpenAI's error shape, never a 500. FastAPI and uvicorn are
imported only here, inside functions (the `serve` extra); nothing else in tinystory
needs them.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time (`request: Request` must be the class), so names imported for typing are quoted.

import asyncio
import errno
import importlib.util
import ipaddress
import json
import math
import queue
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any, overload

from tinystory.console import console, warn
from tinystory.errors import TinystoryError
from tinystory.sampling import GREEDY_BELOW, PENALTY_RANGE, SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

    from tinystory.generation import Generator
    from tinystory.sampling import GenerationStats

MAX_WAITING = 32  # queued requests beyond this get 429: a story takes seconds on a CPU
MAX_BODY_BYTES = 1 << 20  # counted as the body comes, so a chunked body is held to it too
MAX_STOP_STRINGS = 4  # as in the OpenAI API
# The fields /v1/completions takes; any other one is refused (a typo such as `max_token`
# would otherwise be silently ignored). `user` is OpenAI's end-user tag: accepted, unused.
FIELDS = frozenset({"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                    "min_tokens", "stream", "stream_options", "stop", "echo", "user", "n", "best_of", "logprobs",
                    "suffix", "presence_penalty", "frequency_penalty", "logit_bias"})
EXTRA_HINT = "pip install 'tinystory-llm[serve]'"


def require_extra() -> None:
    """Fail in one line, before loading a model, when FastAPI or uvicorn is missing."""

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise TinystoryError(f"tinystory serve needs {' and '.join(missing)}, which {verb} not installed", EXTRA_HINT)


# ------------------------------------------------------------------------ requests


class BadRequest(Exception):
    """A request we refuse with a 4xx and one line saying why (OpenAI's error shape)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        # A lone surrogate from the client (a JSON "\\ud800", a field name) cannot be
        # encoded as UTF-8: the error body would then fail to encode, a 500.
        self.message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.param = None if param is None else param[:60].encode("utf-8", "backslashreplace").decode("utf-8")
        self.status = status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Completion:
    """A validated `/v1/completions` request."""

    prompt: str
    params: "SamplingParams"
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    echo: bool = False


def _shown(value: Any, limit: int = 60) -> str:
    """A client's value as JSON for an error line, cut short: it may be a megabyte long."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):  # nested deeper than json.dumps goes
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        raise BadRequest(f"{key} must be a number, got {_shown(value)}", param=key)
    # Compared as it came: float(10**400) raises OverflowError, and 1e999 is inf (out of range).
    if value < lo or (lo_open and value == lo) or value > hi:
        span = f"{'above' if lo_open else 'at least'} {lo:g} and at most {hi:g}"
        raise BadRequest(f"{key} must be {span}, got {_shown(value)}", param=key)
    return float(value)


@overload
def _integer(body: dict, key: str, default: int, lo: int, hi: float = ...) -> int: ...
@overload
def _integer(body: dict, key: str, default: int | None, lo: int, hi: float = ...) -> int | None: ...
def _integer(body: dict, key: str, default: int | None, lo: int, hi: float = math.inf) -> int | None:
    """body[key] as an integer in [lo, hi], `default` when it is missing or null."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {_shown(value)}", param=key)
    if value < lo or value > hi:
        span = f"at least {lo}" + (f" and at most {hi}" if hi < math.inf else "")
        raise BadRequest(f"{key} must be {span}, got {_shown(value)}", param=key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, got {_shown(value)}", param=key)
    return value


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON "\\ud800"): no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        got = "nothing" if prompt is None else _shown(prompt)
        raise BadRequest(f"prompt must be a string (one prompt, as text), got {got}", param="prompt")
    if not _is_unicode(prompt):
        raise BadRequest("prompt holds a lone UTF-16 surrogate (such as \\ud800), which is not text",
                         param="prompt")
    return prompt


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    ok = isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and s and _is_unicode(s) for s in stops)
    if not ok:
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                         param="stop")
    return tuple(stops)


def _known_fields(body: dict) -> None:
    unknown = next((key for key in body if key not in FIELDS), None)
    if unknown is not None:
        raise BadRequest(f"unknown field {_shown(unknown)}: /v1/completions takes {', '.join(sorted(FIELDS))}",
                         param=unknown)
    for key in ("model", "user"):  # any name: the one model served answers
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"{key} must be a string, got {_shown(body[key])}", param=key)


def _unsupported(body: dict) -> None:
    """Refuse OpenAI options we do not implement, rather than silently ignoring them."""
    neutral: dict[str, tuple[Any, ...]] = {
        "n": (None, 1), "best_of": (None, 1), "logprobs": (None,), "suffix": (None, ""),
        "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}
    for key, ok in neutral.items():
        if key in body and body[key] not in ok:
            raise BadRequest(f"{key}={_shown(body[key])} is not supported by tinystory serve", param=key)


def parse_completion(raw: bytes, defaults: "SamplingParams", context_length: int) -> Completion:
    """The request body -> a `Completion`, or `BadRequest` naming the first bad field.

    Omitted sampling fields take the server's defaults (`tinystory generate`'s settings and
    the run's generation_config.json). temperature 0 means greedy, as in the OpenAI API
    (and so does any below GREEDY_BELOW); fields it does not know are refused;
    `top_k`, `repetition_penalty` and `min_tokens` are extras (vLLM's names).
    """
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is larger than {MAX_BODY_BYTES // 1024} KiB", status=413)
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:  # [[[[... a megabyte deep
        raise BadRequest("request body is not valid JSON: it nests too deep") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _known_fields(body)
    _unsupported(body)
    max_tokens = _integer(body, "max_tokens", min(defaults.max_new_tokens, context_length), 1)
    if max_tokens > context_length:
        raise BadRequest(f"max_tokens is {_shown(max_tokens)}, above the model's context of {context_length} tokens",
                         param="max_tokens")
    temperature = _number(body, "temperature", defaults.temperature, 0, 2)
    top_k = _integer(body, "top_k", defaults.top_k, -1)
    params = replace(
        defaults,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", defaults.top_p, 0, 1, lo_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM) and 0 both mean off
        repetition_penalty=_number(body, "repetition_penalty", defaults.repetition_penalty, *PENALTY_RANGE),
        greedy=defaults.greedy if "temperature" not in body else temperature < GREEDY_BELOW,
        seed=_integer(body, "seed", defaults.seed, -(2**63), 2**63 - 1),
        min_new_tokens=_integer(body, "min_tokens", 0, 0, max_tokens),
    )
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise BadRequest("stream_options must be an object such as {\"include_usage\": true}", param="stream_options")
    return Completion(prompt=_prompt(body), params=params, stream=_flag(body, "stream"),
                      include_usage=_flag(options, "include_usage"), stop=_stop(body), echo=_flag(body, "echo"))


def _not_json(constant: str) -> Any:
    """json.loads takes NaN and Infinity, which JSON has not: refuse them."""
    raise ValueError(f"{constant} is not a JSON value")


class StopScanner:
    """Cut streamed text at the first stop string, holding back only what might start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.pending, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now (`hit` turns True at a stop string)."""
        if not self.stops:
            return piece
        text = self.pending + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.pending = True, ""
            return text[: min(found)]
        # Only ends as long as the text can match: over every k < len(s) this was
        # quadratic in a stop string's length, a minute per token for a 1 MB one.
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the story has ended without a stop string."""
        tail, self.pending = self.pending, ""
        return tail


# -------------------------------------------------------------------------- worker


@dataclass
class Job:
    """One request in the queue. The worker thread posts (kind, value) events to `inbox`
    (start | text | done | error) and wakes the request's event loop, once for however
    many events piled up meanwhile: a busy loop then handles them in one go."""

    request: Completion
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: f"cmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))
    stop: threading.Event = field(default_factory=threading.Event)
    inbox: deque = field(default_factory=deque)  # appends and pops are thread-safe
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0
    stats: "GenerationStats | None" = None
    _wake_pending: bool = False

    def post(self, kind: str, value: Any = None) -> None:
        """From the worker thread: hand an event to the request's event loop."""
        self.inbox.append((kind, value))
        if not self._wake_pending:  # appended first, so a pending wake-up sees it
            self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: the server is gone
                self.stop.set()

    def _wake(self) -> None:
        self._wake_pending = False
        self.ready.set()

    async def wait(self) -> None:
        """Until the worker has posted something not yet taken."""
        while not self.inbox:
            self.ready.clear()
            if not self.inbox:
                await self.ready.wait()


class ModelWorker:
    """The one thread that runs the model; jobs run in arrival order.

    `started`, `finished` and `tokens` count every job the thread took off the queue, every
    one it is done with (run, refused, or skipped because its client had left) and every
    token it generated: at rest started == finished, and a client that leaves costs only
    the tokens made before it left. /health shows them."""

    def __init__(self, generator: "Generator") -> None:
        self.generator = generator
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._closed = False
        self.started = self.finished = self.tokens = 0  # written by the worker thread only
        self._thread = threading.Thread(target=self._loop, name="tinystory-model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued behind the one running."""
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, job: Job) -> None:
        if self._closed:
            raise BadRequest("the server is shutting down", status=503)
        if self.waiting >= MAX_WAITING:
            raise BadRequest(f"{self.waiting} requests are already waiting; try again shortly", status=429)
        self._jobs.put(job)

    def cancel_all(self) -> None:
        """Stop the running story and every queued one (Ctrl-C); refuse new ones."""
        self._closed = True
        with self._jobs.mutex:
            pending = [j for j in self._jobs.queue if j is not None]
        for job in [self._current, *pending]:
            if job is not None:
                job.stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and wait for the thread to end."""
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._current = job
            self.started += 1
            try:
                self._run(job)
            finally:
                self.tokens += job.stats.tokens if job.stats is not None else 0
                self.finished += 1
                self._current = None

    def _run(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        if job.stop.is_set():  # the client left (or Ctrl-C) while it waited
            job.post("done")
            return
        gen, req = self.generator, job.request
        try:
            ids, cut = gen.prompt_ids(req.prompt, allow_empty=True)
            prompt_tokens = len(ids) + cut
            if prompt_tokens + req.params.max_new_tokens > gen.context_length:
                raise BadRequest(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({req.params.max_new_tokens}) "
                                 f"is above the model's context of {gen.context_length} tokens", param="max_tokens")
            stream = gen.stream(req.prompt, req.params, allow_empty=True, stop=job.stop)
        except BadRequest as e:
            job.post("error", e)
            return
        except TinystoryError as e:  # the generator's own checks (params, prompt)
            job.post("error", BadRequest(str(e)))
            return
        except Exception as e:  # a bug: report it, keep serving
            job.post("error", BadRequest(f"{type(e).__name__}: {e}", status=500))
            return
        job.stats = stream.stats
        job.post("start", stream.stats)
        try:
            for piece in stream:
                job.post("text", piece)
        except Exception as e:
            job.post("error", BadRequest(f"{type(e).__name__}: {e}", status=500))
            return
        job.post("done", stream.stats)


# ------------------------------------------------------------------------ responses


def _finish_reason(stats: "GenerationStats | None", scanner: StopScanner) -> str:
    """OpenAI's finish_reason: `stop` at EOS or a stop string, `length` at max_tokens."""
    if scanner.hit or (stats is not None and stats.finish_reason == "eos"):
        return "stop"
    return "length"


def _usage(stats: "GenerationStats | None") -> dict[str, int]:
    prompt = stats.prompt_tokens + stats.prompt_cut if stats else 0
    tokens = stats.tokens if stats else 0
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}


def _chunk(job: Job, model: str, text: str, finish: str | None) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": model, "choices": [choice]}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _first_event(job: Job) -> None:
    """Wait for the worker to start the job; raise its BadRequest if it refused it."""
    await job.wait()
    kind, value = job.inbox.popleft()
    if kind == "error":
        raise value
    if kind == "done":  # stopped before it started
        raise BadRequest("the request was cancelled before it started (client gone, or server stopping)", status=503)


async def _texts(job: Job, scanner: StopScanner) -> AsyncIterator[str]:
    """The story's pieces, cut at a stop string; ends when the worker is done. Pieces
    that piled up while the loop was busy go out joined, as one chunk."""
    while True:
        await job.wait()
        kind, value = job.inbox.popleft()
        while kind == "text" and job.inbox and job.inbox[0][0] == "text":
            value += job.inbox.popleft()[1]
        if kind == "text" and not scanner.hit:
            text = scanner.feed(value)
            if scanner.hit:
                job.stop.set()  # the worker ends at the next token; we drain until "done"
            if text:
                yield text
        elif kind == "done":
            tail = scanner.flush()
            if tail:
                yield tail
            return
        elif kind == "error":
            raise value


async def _read_body(request: "Request") -> bytes:
    """The request body, refused with 413 once it passes MAX_BODY_BYTES. Content-Length is
    checked before reading; a chunked body (no Content-Length) is counted as it comes, so
    no body over the limit is ever held in memory (uvicorn itself sets no limit)."""
    from starlette.requests import ClientDisconnect

    too_big = BadRequest(f"request body is larger than {MAX_BODY_BYTES // 1024} KiB", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # it hung up halfway through its body: nobody reads the answer
        raise BadRequest("the client went away while sending its request") from None
    return b"".join(chunks)


def _check_content_type(request: "Request") -> None:
    """Only application/json. A browser sends text/plain (or no type) from any web page
    without asking this server first (no CORS preflight); asking for JSON makes it ask,
    and we never answer yes, so other sites cannot drive the model."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {_shown(given) if given else 'none'}",
                         status=415)


async def _watch_disconnect(request: "Request", job: Job) -> None:
    """Set the job's stop Event when the client goes away (non-streaming, or queued)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.stop.set()


def _log_line(job: Job, status: int, mode: str, scanner: StopScanner | None = None, note: str = "") -> None:
    """One line per request on stderr: tokens, time, tokens/s."""
    s = job.stats
    waited = (job.started_at or time.perf_counter()) - job.queued_at
    if s is None:
        line = f"POST /v1/completions {status} {mode}: {note or 'no tokens'}"
    else:
        why = note or ("stop string" if scanner is not None and scanner.hit else s.finish_reason)
        line = (f"POST /v1/completions {status} {mode}: {s.tokens} tokens in {s.seconds:.2f} s, "
                f"{s.tokens_per_s:.1f} tok/s, first token {s.first_token_s * 1000:.0f} ms, "
                f"waited {waited:.2f} s, ended by {why}")
    console().print(f"{time.strftime('%H:%M:%S')} {line}", markup=False, highlight=False)


# ---------------------------------------------------------------------------- app


def model_card(generator: "Generator", defaults: "SamplingParams") -> dict[str, Any]:
    """The OpenAI model object, with what the page shows (size, context, defaults)."""
    return {
        "id": generator.name, "object": "model", "created": 0, "owned_by": "tinystory",
        "parameters": generator.num_parameters, "size_bytes": generator.size_bytes,
        "context_length": generator.context_length, "device": generator.device, "dtype": generator.dtype,
        "defaults": {"max_tokens": min(defaults.max_new_tokens, generator.context_length),
                     "temperature": 0.0 if not defaults.sampling else defaults.temperature,
                     "top_p": defaults.top_p, "top_k": defaults.top_k},
    }


def page_html(card: dict[str, Any]) -> str:
    """The web page, with the model card inlined (so it needs no second request)."""

    html = resources.files("tinystory.web").joinpath("index.html").read_text(encoding="utf-8")
    return html.replace("/*MODEL_CARD*/null", json.dumps(card).replace("</", "<\\/"))


class _ExactPaths:
    """ASGI wrapper: Starlette matches a route with `$`, which also matches before a final
    newline, so /health%0A answered as /health and /%0A as the page. Such a path gets the
    404 of any path we do not serve."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("\n"):
            from fastapi.responses import JSONResponse

            await JSONResponse(BadRequest("Not Found", 404).body(), 404)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(generator: "Generator", defaults: "SamplingParams | None" = None) -> "FastAPI":
    """The FastAPI app over `generator`; `app.state.worker` owns it (close it when done)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    defaults = defaults or SamplingParams()
    worker = ModelWorker(generator)
    card = model_card(generator, defaults)
    page = page_html(card)
    app = FastAPI(title="tinystory", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    # /health/ is a 404 like any unknown path, not a 307 to a URL built from the Host header
    app.router.redirect_slashes = False
    app.add_middleware(_ExactPaths)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405 in OpenAI's shape
        return JSONResponse(BadRequest(str(exc.detail), exc.status_code).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours still answers in OpenAI's shape (uvicorn logs the traceback).
        error = BadRequest(f"{type(exc).__name__}: {exc}", 500)
        return JSONResponse(error.body(), 500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        jobs = {"started": worker.started, "finished": worker.finished, "tokens": worker.tokens}
        return {"status": "ok", "model": generator.name, "busy": worker.busy, "waiting": worker.waiting, "jobs": jobs}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != generator.name:
            error = BadRequest(f"no model {model_id!r}; this server has {generator.name!r}", 404)
            return JSONResponse(error.body(), 404)
        return JSONResponse(card)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request):
        try:
            _check_content_type(request)
            req = parse_completion(await _read_body(request), defaults, generator.context_length)
            job = Job(req, asyncio.get_running_loop())
            worker.submit(job)
        except BadRequest as e:
            console().print(f"{time.strftime('%H:%M:%S')} POST /v1/completions {e.status}: {e.message}",
                            markup=False, highlight=False)
            return JSONResponse(e.body(), e.status)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            await _first_event(job)
            if req.stream:
                watcher.cancel()  # StreamingResponse watches for disconnects itself
                return StreamingResponse(_events(job, generator.name), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _whole(job, generator.name)
        except BadRequest as e:
            _log_line(job, e.status, "stream" if req.stream else "whole", note=e.message)
            return JSONResponse(e.body(), e.status)
        finally:
            watcher.cancel()

    return app


async def _whole(job: Job, model: str) -> dict[str, Any]:
    """A non-streaming completion: the whole story in one response."""
    scanner = StopScanner(job.request.stop)
    text = "".join([t async for t in _texts(job, scanner)])
    text = job.request.prompt + text if job.request.echo else text
    body = _chunk(job, model, text, _finish_reason(job.stats, scanner))
    body["usage"] = _usage(job.stats)
    _log_line(job, 200, "whole", scanner, "client disconnected" if job.stop.is_set() and not scanner.hit else "")
    return body


async def _events(job: Job, model: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece, a final chunk, usage if asked, [DONE]."""
    scanner = StopScanner(job.request.stop)
    finished = False
    try:
        if job.request.echo:
            yield _sse(_chunk(job, model, job.request.prompt, None))
        try:
            async for text in _texts(job, scanner):
                yield _sse(_chunk(job, model, text, None))
        except BadRequest as e:  # a failure mid-stream: the status line is long gone
            yield _sse(e.body())
        yield _sse(_chunk(job, model, "", _finish_reason(job.stats, scanner)))
        if job.request.include_usage:
            yield _sse({**_chunk(job, model, "", None), "choices": [], "usage": _usage(job.stats)})
        yield _sse("[DONE]")
        finished = True
    finally:
        job.stop.set()  # the client went away mid-stream: stop generating for it
        _log_line(job, 200, "stream", scanner, "" if finished else "client disconnected")


# -------------------------------------------------------------------------- server


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (port taken, unknown address)."""
    if not 0 <= port <= 65535:
        raise TinystoryError(f"port {port} is not a TCP port", "use --port between 1 and 65535 (0 = any free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror as e:
        hint = "use --host 127.0.0.1 or an address of this machine"
        raise TinystoryError(f"cannot bind {host}: {e.strerror}", hint) from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            hint = "pass another --port, or stop the other server"
            raise TinystoryError(f"port {port} on {host} is already in use", hint) from None
        raise TinystoryError(f"cannot bind {host}:{port}: {e.strerror}",
                             "use --host 127.0.0.1 or another --port") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def run_server(generator: "Generator", defaults: "SamplingParams | None" = None, host: str = "127.0.0.1",
               port: int = 8000, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C (or SIGTERM); then stop the running story and return cleanly."""
    require_extra()
    import uvicorn

    sock = bind(host, port)
    if not is_loopback(host):
        warn(f"binding {host}: anyone who can reach this machine can use the model (there is no authentication)")
    app = create_app(generator, defaults)
    worker: ModelWorker = app.state.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            worker.cancel_all()  # end running streams now, so the graceful shutdown is quick
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = Server(config)
    # Our handler from here on, so a Ctrl-C before uvicorn installs its own (or after it
    # restores ours and re-raises the signal) asks the server to stop, never raising
    # KeyboardInterrupt in the middle of a print.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        url = url_of(sock)
        console().print(f"serving {generator.describe()}", markup=False)
        console().print(f"open {url}/ in a browser; API at {url}/v1 (Ctrl-C to stop)", markup=False)
        if on_ready is not None:
            on_ready(url)
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()
        sock.close()
    console().print("server stopped", markup=False)


@contextmanager
def serve_in_thread(generator: "Generator", defaults: "SamplingParams | None" = None, host: str = "127.0.0.1",
                    port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """A live server on a background thread, for tests, benchmarks and notebooks:
    `with serve_in_thread(gen) as url: ...` (port 0 = any free port)."""
    require_extra()
    import uvicorn

    sock = bind(host, port)
    app = create_app(generator, defaults)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tinystory-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise TinystoryError(f"the server did not start within {timeout:g} s")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        app.state.worker.cancel_all()
        server.should_exit = True
        thread.join(timeout)
        app.state.worker.close()
        sock.close()
