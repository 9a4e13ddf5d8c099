"""`tinystory serve` under load, hostile input and slow clients, on an untrained cpu-3m model.

32 concurrent streams each get exactly the story they get alone; clients that hang up
stop their story and free their place (the server's own counters say so); 500+ generated
malformed requests each get a 4xx with a JSON error line, never a 500, while good
requests keep being answered; a stalled reader or sender holds nobody up; the body and
token limits hold; the server binds 127.0.0.1 and no request makes it read a file.

The helpers (`stream_one`, `send`, `malformed`) are also what benchmarks/bench_serve_load.py
drives, so the benchmark measures what these tests check.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import select
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tinystory-llm[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'tinystory-llm[serve]'")
pytest.importorskip("hypothesis", reason="needs the dev extra: pip install 'tinystory-llm[dev]'")

from conftest import PacedGenerator, sample_stories
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tinystory.generation import Generator
from tinystory.sampling import SamplingParams
from tinystory.serve import FIELDS, MAX_BODY_BYTES, MAX_STOP_STRINGS, parse_completion, serve_in_thread

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "tinystory-hypothesis")  # its caches, not in the checkout
DEFAULTS = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.9, seed=None)
CONTEXT = 1024  # the cpu-3m preset's max_position_embeddings
NAMES = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia", "Sam", "Zoe"]
THINGS = ["red ball", "little bird", "big box", "shiny key"]
PROMPTS = [f"Once upon a time, {n} found a {t}" for n in NAMES for t in THINGS]  # 32 different openings


def build_cpu3m(folder: Path) -> Path:
    """An untrained `cpu-3m` (seed 0) beside a byte-level BPE 4096 of 600 sample stories."""
    import torch

    from tinystory.model import build_config, build_model
    from tinystory.tokenizer import train_bpe

    tok = train_bpe(sample_stories("train", 600), 4096)
    torch.manual_seed(0)
    model = build_model(build_config("cpu-3m", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    return Generator.load(build_cpu3m(tmp_path_factory.mktemp("cpu3m") / "cpu-3m"), device="cpu", threads=1)


@pytest.fixture(scope="module")
def live(generator: Generator):
    with serve_in_thread(generator, DEFAULTS) as url:
        yield url


def alone(generator: Generator, body: dict[str, Any]) -> str:
    """What `body` gets with nobody else around: the server's own parse, `Generator` directly."""
    req = parse_completion(json.dumps(body).encode(), DEFAULTS, generator.context_length)
    return generator.generate(req.prompt, req.params, allow_empty=True)


def story_request(i: int, max_tokens: int = 16) -> dict[str, Any]:
    """Request i of the load: even ones greedy, odd ones sampled with seed i (so no two odd
    ones share a story, and a piece of one stream in another would show)."""
    how = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": i}
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "min_tokens": max_tokens, **how,
            "stream": True, "stream_options": {"include_usage": True}}


def health(url: str) -> dict[str, Any]:
    status, _, body = send(url, "GET", "/health")
    assert status == 200
    return json.loads(body)


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """/health once nothing runs and nothing waits (fails after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if not h["busy"] and h["waiting"] == 0 and h["jobs"]["started"] == h["jobs"]["finished"]:
            return h
        assert time.monotonic() < deadline, f"the server is still busy after {timeout} s: {h}"
        time.sleep(0.02)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): p99 of 32 values is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ------------------------------------------------------------------ HTTP clients


@dataclass
class Streamed:
    """One streaming request as its client saw it."""

    status: int
    text: str = ""
    tokens: int = 0
    ttft: float = 0.0  # seconds to the first text piece
    seconds: float = 0.0  # to [DONE]
    done: bool = False  # [DONE] arrived, after a final chunk with a finish_reason
    error: str = ""


async def stream_one(http: Any, url: str, body: dict[str, Any]) -> Streamed:
    """POST a streaming completion with an httpx.AsyncClient and read it to [DONE],
    checking the server-sent-event framing on the way."""
    t0 = time.perf_counter()
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        out = Streamed(r.status_code)
        if r.status_code != 200:
            out.error = (await r.aread()).decode()
            return out
        pieces, finished = [], False
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                out.done = finished
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out.error = chunk["error"]["message"]
            elif chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["finish_reason"]:
                finished = True
            elif chunk["choices"][0]["text"]:
                out.ttft = out.ttft or time.perf_counter() - t0
                pieces.append(chunk["choices"][0]["text"])
    out.text, out.seconds = "".join(pieces), time.perf_counter() - t0
    return out


async def many(url: str, bodies: list[dict[str, Any]]) -> tuple[list[Streamed], float]:
    """All `bodies` streamed at once, one connection each; their results and the wall time."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(http, url, b) for b in bodies))
        return list(results), time.perf_counter() - t0


def send(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         chunks: int = 0, timeout: float = 60) -> tuple[int, str, bytes]:
    """One raw request (http.client sends the path as given: no `..` resolved, no quoting);
    `chunks` > 0 sends the body chunked, with no Content-Length. (status, content type, body)."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    try:
        payload: Any = body
        if chunks and body is not None:
            step = max(1, math.ceil(len(body) / chunks))
            payload = (body[i: i + step] for i in range(0, len(body), step))
        conn.request(method, path, body=payload, headers=headers or {}, encode_chunked=bool(chunks))
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()


def assert_error(status: int, content_type: str, body: bytes, want_status: int, want_param: Any = ...) -> None:
    """A 4xx in OpenAI's error shape: one line of message, and the field it names."""
    assert status == want_status, (status, body[:300])
    assert content_type == "application/json", content_type
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    if want_param is not ...:
        assert error["param"] == want_param, error


# ------------------------------------------------------------------------ load


@pytest.mark.slow  # ~10 s on a 2-core CPU
def test_32_concurrent_streams_each_get_the_story_they_get_alone(generator, live, capsys):
    # Guards: stories mixed between streams (a piece of one client's story in another's),
    # streams that never finish under load, a 429 or a 5xx below MAX_WAITING, and the
    # job counters not adding up (a job lost or counted twice).
    bodies = [story_request(i) for i in range(32)]
    expected = [alone(generator, b) for b in bodies]
    assert len(set(expected[1::2])) == 16  # the sampled stories differ: a stray piece would show
    before = wait_idle(live)["jobs"]
    results, wall = asyncio.run(many(live, bodies))
    assert [r.status for r in results] == [200] * 32
    assert [r.error for r in results] == [""] * 32
    assert [r.text for r in results] == expected
    assert [(r.tokens, r.done) for r in results] == [(16, True)] * 32
    after = wait_idle(live)["jobs"]
    assert after["started"] - before["started"] == after["finished"] - before["finished"] == 32
    assert after["tokens"] - before["tokens"] == 32 * 16
    ttft, total = [r.ttft for r in results], [r.seconds for r in results]
    with capsys.disabled():  # the figures, for the record (-s not needed)
        print(f"\n32 streams x 16 tokens: ttft p50 {percentile(ttft, 50):.2f} s p99 {percentile(ttft, 99):.2f} s, "
              f"total p50 {percentile(total, 50):.2f} s p99 {percentile(total, 99):.2f} s, "
              f"{32 * 16 / wall:.0f} tok/s aggregate, "
              f"{sorted(16 / r.seconds for r in results)[16]:.1f} tok/s per client (median)")


def test_clients_that_hang_up_stop_their_story_and_free_their_place(generator, capfd):
    # Guards: a generation that goes on after its client left (the model busy for nobody,
    # everyone behind it waiting), a queued job that runs although its client is gone,
    # a place in the queue never given back, and a server that is wrong afterwards.
    import httpx

    asked = 400  # 4 s a story at 10 ms a token: a leak shows as thousands of tokens
    body = {"prompt": PROMPTS[0], "max_tokens": asked, "min_tokens": asked, "seed": 1, "stream": True}

    async def hang_up_mid_stream(http: httpx.AsyncClient, url: str) -> int:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    return seen  # leaving the block closes the connection: the client is gone
        return seen

    async def give_up_while_queued(http: httpx.AsyncClient, url: str) -> str:
        try:
            await http.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        except httpx.ReadTimeout:
            return "gave up"
        return "answered"

    async def crowd(url: str) -> list[Any]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=16)) as http:
            leavers = [hang_up_mid_stream(http, url) for _ in range(8)]
            quitters = [give_up_while_queued(http, url) for _ in range(4)]
            return list(await asyncio.gather(*leavers, *quitters))

    with serve_in_thread(PacedGenerator(generator, delay=0.01), DEFAULTS) as url:
        assert asyncio.run(crowd(url)) == [2] * 8 + ["gave up"] * 4
        t0 = time.monotonic()
        jobs = wait_idle(url, timeout=5)["jobs"]
        idle_after = time.monotonic() - t0
        assert jobs["started"] == jobs["finished"] == 12  # every job taken and done, none left in the queue
        assert jobs["tokens"] < 12 * asked / 10, jobs  # each stopped within a few tokens of its client leaving
        # the place is free and the model is whole: the next story is the one it gets alone
        good = {"prompt": PROMPTS[1], "max_tokens": 8, "min_tokens": 8, "temperature": 0}
        status, _, answer = send(url, "POST", "/v1/completions", json.dumps(good).encode(),
                                 {"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer)["choices"][0]["text"] == alone(generator, good)
        assert health(url)["jobs"] == {"started": 13, "finished": 13, "tokens": jobs["tokens"] + 8}
    assert idle_after < 3
    err = capfd.readouterr().err
    assert len(re.findall(r"200 stream: \d+ tokens .* ended by client disconnected", err)) == 8, err
    assert "Traceback" not in err and "Exception in ASGI application" not in err


# ------------------------------------------------------------------------ fuzz

# Values of any JSON type, nested a little; `null` is left out where it means "omitted".
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    max_size=12)
JSON = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                         max_size=3), max_leaves=6)
HUGE = st.integers(min_value=2**64, max_value=10**400) | st.integers(min_value=-(10**400), max_value=-(2**64))
GOOD_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON"]


def _not(*ok_types: type) -> st.SearchStrategy[Any]:
    """JSON values of none of `ok_types` (bool is never an int here), null excluded."""
    return JSON.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, ok_types)))


def _outside(lo: float, hi: float, lo_open: bool = False) -> st.SearchStrategy[Any]:
    """Numbers outside [lo, hi] ((lo, hi] when lo_open), huge integers included."""
    below = st.floats(max_value=lo, allow_nan=False, allow_infinity=False).filter(
        lambda x: x < lo or (lo_open and x == lo))
    above = st.floats(min_value=hi, allow_nan=False, allow_infinity=False).filter(lambda x: x > hi)
    ints = st.integers(max_value=math.floor(lo)) | st.integers(min_value=math.ceil(hi))
    return below | above | ints.filter(lambda i: i < lo or (lo_open and i == lo) or i > hi) | HUGE


def _ints_outside(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1) | HUGE


LONE = st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(["\ud800", "\udfff", "\udc41"]),
                 st.text(max_size=4))  # a string no UTF-8 encoder takes
BASE_MAX_TOKENS = 2

# field -> strategy of (bad value, the param the error must name)
BAD_FIELDS: dict[str, st.SearchStrategy[tuple[Any, str]]] = {
    "max_tokens": (_not(int) | _ints_outside(1, CONTEXT)).map(lambda v: (v, "max_tokens")),
    "min_tokens": (_not(int) | _ints_outside(0, BASE_MAX_TOKENS)).map(lambda v: (v, "min_tokens")),
    "temperature": (_not(int, float) | _outside(0, 2)).map(lambda v: (v, "temperature")),
    "top_p": (_not(int, float) | _outside(0, 1, lo_open=True)).map(lambda v: (v, "top_p")),
    "top_k": (_not(int) | st.integers(max_value=-2) | st.integers(max_value=-(10**400))).map(lambda v: (v, "top_k")),
    "repetition_penalty": (_not(int, float) | _outside(0.01, 100)).map(lambda v: (v, "repetition_penalty")),
    "seed": (_not(int) | _ints_outside(-(2**63), 2**63 - 1)).map(lambda v: (v, "seed")),
    "stream": _not(bool).map(lambda v: (v, "stream")),
    "echo": _not(bool).map(lambda v: (v, "echo")),
    "stream_options": (JSON.filter(lambda v: bool(v) and not isinstance(v, dict))
                       | st.dictionaries(st.text(max_size=6).filter(lambda k: k != "include_usage"), JSON,
                                         min_size=1, max_size=2)).map(lambda v: (v, "stream_options"))
    | _not(bool).map(lambda v: ({"include_usage": v}, "include_usage")),
    "stop": (JSON.filter(lambda v: v is not None and not isinstance(v, (str, list))) | st.just("") | LONE
             | st.lists(st.text(min_size=1, max_size=3), min_size=MAX_STOP_STRINGS + 1, max_size=8)
             | st.lists(_not(str) | st.just("") | LONE, min_size=1, max_size=3)).map(lambda v: (v, "stop")),
    "prompt": (st.just(None) | JSON.filter(lambda v: v is not None and not isinstance(v, (str, list)))
               | st.lists(st.text(max_size=4), max_size=4).filter(lambda v: len(v) != 1)
               | st.lists(_not(str), min_size=1, max_size=1) | LONE | LONE.map(lambda s: [s])
               ).map(lambda v: (v, "prompt")),
    "model": _not(str).map(lambda v: (v, "model")),
    "user": _not(str).map(lambda v: (v, "user")),
    "n": JSON.filter(lambda v: v not in (None, 1)).map(lambda v: (v, "n")),
    "best_of": JSON.filter(lambda v: v not in (None, 1)).map(lambda v: (v, "best_of")),
    "logprobs": JSON.filter(lambda v: v is not None).map(lambda v: (v, "logprobs")),
    "suffix": JSON.filter(lambda v: v not in (None, "")).map(lambda v: (v, "suffix")),
    "presence_penalty": JSON.filter(lambda v: v not in (None, 0)).map(lambda v: (v, "presence_penalty")),
    "frequency_penalty": JSON.filter(lambda v: v not in (None, 0)).map(lambda v: (v, "frequency_penalty")),
    "logit_bias": JSON.filter(lambda v: v not in (None, {})).map(lambda v: (v, "logit_bias")),
}
assert set(BAD_FIELDS) == FIELDS, "a field of /v1/completions with no bad values in the fuzz"


@dataclass(frozen=True)
class Case:
    """One malformed request and the answer it must get (`param` ... = not checked)."""

    kind: str
    method: str = "POST"
    path: str = "/v1/completions"
    body: bytes | None = None
    content_type: str | None = "application/json"
    chunks: int = 0
    status: int = 400
    param: Any = None

    def __repr__(self) -> str:  # a failing 10 MB example prints in one line
        body = None if self.body is None else self.body[:120] + (b"..." if len(self.body) > 120 else b"")
        return (f"Case({self.kind}, {self.method} {self.path}, {self.content_type!r}, chunks={self.chunks}, "
                f"{len(self.body or b'')} bytes {body!r} -> {self.status} {self.param!r})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # what hypothesis prints
        printer.text(repr(self))


def _encode(body: dict[str, Any], ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate goes as the bytes json.loads reads back as one
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def bad_field(draw: st.DrawFn) -> Case:
    """A good request with one field wrong: a 400 naming that field."""
    body = {"prompt": draw(st.text(max_size=30)), "max_tokens": BASE_MAX_TOKENS, "temperature": 0}
    field = draw(st.sampled_from(sorted(BAD_FIELDS)))
    value, param = draw(BAD_FIELDS[field])
    body[field] = value
    return Case("field", body=_encode(body, draw(st.booleans())), content_type=draw(st.sampled_from(GOOD_TYPES)),
                param=param)


@st.composite
def unknown_field(draw: st.DrawFn) -> Case:
    key = draw(st.text(max_size=20).filter(lambda k: k not in FIELDS) | st.sampled_from(
        ["max_token", "temprature", "messages", "n_predict", "ignore_eos", "model_path", "__proto__"]))
    body = {"prompt": "Once upon a time", "max_tokens": BASE_MAX_TOKENS, key: draw(JSON)}
    shown = key[:60].encode("utf-8", "backslashreplace").decode()  # how the server names it
    return Case("unknown field", body=_encode(body, draw(st.booleans())), param=shown)


def _not_an_object(raw: bytes) -> bool:
    """True unless the server's parse (NaN and Infinity refused) gives a JSON object."""
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        return not isinstance(json.loads(raw, parse_constant=refuse), dict)
    except (ValueError, RecursionError):
        return True


@st.composite
def not_json(draw: st.DrawFn) -> Case:
    """Bytes that are not a JSON object: a 400 naming no field."""
    good = b'{"prompt": "Once upon a time", "max_tokens": 2}'
    raw = draw(st.one_of(
        st.binary(max_size=64),
        st.integers(0, len(good) - 1).map(lambda k: good[:k]),  # cut short
        _not(dict).map(lambda v: json.dumps(v).encode()),  # JSON, but not an object
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
            lambda c: b'{"prompt": "x", "temperature": ' + c + b"}"),  # Python's json takes these
        st.integers(1_000, 300_000).map(lambda depth: b"[" * depth + b"]" * depth),  # nested deep
        st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)).map(
            lambda b: b'{"prompt": "' + b + b'"}'),  # not UTF-8
        st.just(b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}"),  # more digits than Python parses
    ).filter(_not_an_object))
    return Case("not json", body=raw)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def wrong_content_type(draw: st.DrawFn) -> Case:
    """A good body, not labelled application/json: a 415."""
    kind = draw(st.one_of(
        st.none(),
        st.sampled_from(["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/jsonp", "application/json-seq",
                         "application/xml", "json", "*/*", ""]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    ).filter(lambda t: t is None or t.split(";", 1)[0].strip().lower() != "application/json"))
    return Case("content type", body=b'{"prompt": "Once upon a time", "max_tokens": 2}', content_type=kind,
                status=415)


ROUTES = {"/": {"GET"}, "/health": {"GET"}, "/v1/models": {"GET"}, "/v1/completions": {"POST"}}
TRAVERSALS = ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd", "/v1/../../etc/passwd",
              "/v1/models/..%2f..%2f..%2fetc%2fpasswd", "/v1/models/../../../etc/passwd", "//etc/passwd",
              "/static/../pyproject.toml", "/web/index.html", "/index.html", "/favicon.ico", "/.env",
              "/v1/models/%00", "/v1/completions/", "/health/", "/v1/models/", "/%2e%2e%5c%2e%2e%5cwindows",
              "/v1/models/file:%2f%2f%2fetc%2fpasswd", "/docs", "/openapi.json", "/redoc", "/%0A", "/health%0A",
              "/v1/completions%0a", "/v1/models%0A"]


def expected_route_status(method: str, path: str, model: str) -> int | None:
    """404 or 405 as our routes give them; None for a request that is valid."""
    decoded = unquote(path)  # as uvicorn hands the path to the app
    if decoded.endswith("\n"):  # Starlette's `$` took /health%0A for /health: a 404, whatever the method
        return 404
    if decoded.startswith("/v1/models/"):  # /v1/models/{model_id:path}, "" included
        allowed = {"GET"}
        if decoded[len("/v1/models/"):] == model and method == "GET":
            return None
    else:
        allowed = ROUTES.get(decoded, set())
    if not allowed:
        return 404
    return None if method in allowed else 405


@st.composite
def wrong_route(draw: st.DrawFn, model: str) -> Case:
    """A path we do not serve, or a method a path does not take: a 404 or a 405."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    path = draw(st.one_of(
        st.sampled_from(TRAVERSALS),
        st.sampled_from(sorted(ROUTES)),
        st.lists(st.text(max_size=8), min_size=1, max_size=4).map(lambda parts: "/" + quote("/".join(parts))),
        st.text(max_size=12).map(lambda t: "/v1/models/" + quote(t, safe="")),
    ))
    status = expected_route_status(method, path, model)
    if status is None:  # a request we answer with 200: not malformed
        method, status = "DELETE", expected_route_status("DELETE", path, model)
    body = b'{"prompt": "x"}' if method in ("POST", "PUT", "PATCH") else None
    return Case("route", method=method, path=path, body=body, status=status)


@st.composite
def too_big(draw: st.DrawFn) -> Case:
    """A body over MAX_BODY_BYTES, with a Content-Length or chunked (none): a 413."""
    size = draw(st.integers(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 65_536))
    head = b'{"prompt": "'
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    return Case("too big", body=body, chunks=draw(st.sampled_from([0, 1, 3, 17, 64])), status=413)


def malformed(model: str) -> st.SearchStrategy[Case]:
    """Every kind of request the server must refuse with a 4xx (model: the served name)."""
    return st.one_of(bad_field(), bad_field(), unknown_field(), not_json(), wrong_content_type(), wrong_route(model),
                     too_big())


def send_case(url: str, case: Case) -> tuple[int, str, bytes]:
    headers = {} if case.content_type is None else {"Content-Type": case.content_type}
    return send(url, case.method, case.path, case.body, headers, chunks=case.chunks)


TEN_MB = b'{"prompt": "' + b"Once upon a time " * 620_000 + b'"}'


@pytest.mark.slow  # ~10 s on a 2-core CPU
def test_fuzz_every_malformed_request_gets_a_4xx_json_line_and_the_server_goes_on(generator, live):
    # Guards, each found here first as a 500 or a hang: a JSON integer too big for a float
    # (OverflowError), a temperature or repetition penalty so small the logits overflow
    # (NaN probabilities: a crash in the worker), a lone surrogate in the prompt (the
    # tokenizer's TypeError; an echo that cannot be encoded), JSON nested 100k deep
    # (RecursionError), NaN / Infinity taken as numbers, a trailing slash answered with a
    # 307 to a URL made from the Host header; and unknown fields and wrong content types
    # silently accepted. Between two bad requests a good one (a unicode prompt) must still
    # get its token.
    sent: list[str] = []

    @settings(max_examples=500, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(case=malformed(generator.name), prompt=st.text(max_size=40))
    @example(case=Case("10 MB prompt", body=TEN_MB, status=413), prompt="")
    @example(case=Case("10 MB prompt, chunked", body=TEN_MB, chunks=160, status=413), prompt="\x00\x1b[2J\u202e")
    @example(case=Case("1e999", body=b'{"prompt": "x", "temperature": 1e999}', param="temperature"), prompt="é")
    def check(case: Case, prompt: str) -> None:
        sent.append(case.kind)
        assert_error(*send_case(live, case), case.status, case.param)
        good = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
        status, _, body = send(live, "POST", "/v1/completions", json.dumps(good).encode(),
                               {"Content-Type": "application/json"})
        assert status == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == 1

    check()
    assert len(sent) >= 503
    kinds = {k: sent.count(k) for k in set(sent)}
    assert min(kinds[k] for k in ("field", "unknown field", "not json", "content type", "route", "too big")) >= 25, (
        kinds)
    h = wait_idle(live)
    assert h["status"] == "ok" and not h["busy"] and h["waiting"] == 0


@st.composite
def valid_request(draw: st.DrawFn) -> dict[str, Any]:
    """A request the server must serve: every field in its range, edges and huge values
    included, any text; min_tokens = max_tokens, so only a stop string ends one early."""
    max_tokens = draw(st.integers(1, 3))
    body: dict[str, Any] = {"prompt": draw(st.text(max_size=40) | st.lists(st.text(max_size=40), min_size=1,
                                                                           max_size=1)),
                            "max_tokens": max_tokens, "min_tokens": max_tokens}
    optional = {
        "temperature": st.floats(0, 2) | st.integers(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True) | st.just(1),
        "top_k": st.integers(-1, 10**30),
        "repetition_penalty": st.floats(0.01, 100),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.text(min_size=1, max_size=6) | st.lists(st.text(min_size=1, max_size=6), max_size=MAX_STOP_STRINGS),
        "echo": st.booleans(),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "model": st.text(max_size=20),
        "user": st.text(max_size=20),
        "n": st.just(1), "best_of": st.just(1), "logprobs": st.none(), "suffix": st.just(""),
        "presence_penalty": st.just(0), "frequency_penalty": st.just(0.0), "logit_bias": st.just({}),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(st.none() | strategy)  # null: as if left out
    return body


def test_fuzz_every_valid_request_is_served(generator, live):
    # Guards: values the API allows that crash the model: a temperature of 5e-324 made
    # logits / T overflow to inf and sampling raise on NaN probabilities (a 500; now
    # greedy below 1e-5, as vLLM does), the repetition penalty at its limits while
    # sampling, a top_k far above the vocabulary, the extreme seeds, any unicode in a
    # prompt, a stop string or the model name, echo with streaming.
    served: list[int] = []

    @settings(max_examples=100, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow])
    @given(body=valid_request())
    @example(body={"prompt": "x", "max_tokens": 2, "min_tokens": 2, "temperature": 5e-324})
    @example(body={"prompt": "x", "max_tokens": 2, "min_tokens": 2, "temperature": 2, "repetition_penalty": 0.01,
                   "top_k": 10**30, "seed": -(2**63)})
    def check(body: dict[str, Any]) -> None:
        status, content_type, raw = send(live, "POST", "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        assert status == 200, raw[:300]
        if body.get("stream"):
            assert content_type.startswith("text/event-stream")
            lines = [line for line in raw.decode().split("\n") if line]
            assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
            chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
            assert not [c for c in chunks if "error" in c]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert finish[-1] in ("stop", "length") and finish[:-1] == [None] * (len(finish) - 1)
        else:
            answer = json.loads(raw)
            choice, usage = answer["choices"][0], answer["usage"]
            assert choice["finish_reason"] in ("stop", "length")
            want = body["max_tokens"] if choice["finish_reason"] == "length" else usage["completion_tokens"]
            assert 1 <= usage["completion_tokens"] == want <= body["max_tokens"]
            prompt = body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]
            assert choice["text"].startswith(prompt if body.get("echo") else "")
        served.append(status)

    check()
    assert len(served) >= 102
    assert wait_idle(live)["status"] == "ok"


def test_a_megabyte_stop_string_does_not_stall_the_server(live):
    # Guards: the stop-string scanner looked for a partial match at every length of the
    # stop string, on the event loop, for every piece: a 900 KB stop string took minutes
    # a token, and the server answered nobody meanwhile.
    body = {"prompt": "x", "max_tokens": 4, "min_tokens": 4, "temperature": 0, "stop": ["a" * 900_000, "b" * 50_000]}
    t0 = time.monotonic()
    status, _, raw = send(live, "POST", "/v1/completions", json.dumps(body).encode(),
                          {"Content-Type": "application/json"}, timeout=30)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------- slow clients


class BulkyGenerator(PacedGenerator):
    """A real `Generator` whose every text piece comes `times` times over: a few tokens
    then make more bytes than every socket buffer between us and a client holds."""

    def __init__(self, gen: Generator, times: int) -> None:
        super().__init__(gen, delay=0.0)
        self._times = times

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        inner, times = self._gen.stream(*args, **kwargs), self._times

        class Stream:
            stats = inner.stats

            def __iter__(self):  # type: ignore[no-untyped-def]
                for piece in inner:
                    yield piece * times

        return Stream()


def test_a_stalled_reader_or_sender_holds_up_nobody(generator, capfd):
    # Guards: the model worker waiting on a client's socket (one stalled reader would then
    # stop every story), the event loop blocked on a send, a stalled upload holding the
    # queue, and a stalled reader's story arriving cut or mixed once it reads again.
    times = 20_000  # 64 tokens x ~5 characters x 20k: ~6 MB, above what the socket buffers take (4 MiB)
    slow_body = {"prompt": PROMPTS[3], "max_tokens": 64, "min_tokens": 64, "seed": 3, "stream": True}
    with serve_in_thread(BulkyGenerator(generator, times), DEFAULTS) as url:
        where = urlsplit(url)
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server must wait
        reader.connect((where.hostname, where.port))
        payload = json.dumps(slow_body).encode()
        reader.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        sender = socket.create_connection((where.hostname, where.port))
        sender.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{\"prompt\": ")  # ... and nothing more
        # the worker finishes the stalled reader's story without it reading a byte
        t0 = time.monotonic()
        while health(url)["jobs"]["finished"] < 1:
            assert time.monotonic() - t0 < 20, "the worker waits for a client that does not read"
            time.sleep(0.02)
        # meanwhile others are served, whole and on time
        others = [story_request(i, max_tokens=8) for i in range(4)]
        results, wall = asyncio.run(many(url, others))
        assert [(r.status, r.done) for r in results] == [(200, True)] * 4
        assert [r.text for r in results] == [bulky_alone(generator, b, times) for b in others]
        assert wall < 10
        log = capfd.readouterr().err
        # the stalled stream is still being sent (its log line comes at its end)
        assert len(re.findall(r"200 stream: 64 tokens", log)) == 0, log
        # now it reads: the whole story, intact
        reader.settimeout(30)
        received = bytearray()
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the end of a chunked body
            data = reader.recv(1 << 16)
            assert data, "the server closed the stalled reader's connection"
            received += data
        reader.close()
        sender.close()  # the stalled upload goes away: one log line, no traceback
        lines = _sse_lines(bytes(received))
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(line[len("data: "):])["choices"][0]["text"] for line in lines[:-1])
        assert len(text) > 4 << 20  # more than every buffer between us holds
        assert text == bulky_alone(generator, slow_body, times)
        wait_idle(url)
    err = capfd.readouterr().err
    assert "200 stream: 64 tokens" in err
    assert "POST /v1/completions 400: the client went away while sending its request" in err
    assert "Traceback" not in err and "Exception in ASGI application" not in err


def bulky_alone(generator: Generator, body: dict[str, Any], times: int) -> str:
    """What a BulkyGenerator server sends for `body`: each piece of the story alone, `times` over."""
    req = parse_completion(json.dumps(body).encode(), DEFAULTS, generator.context_length)
    return "".join(piece * times for piece in generator.stream(req.prompt, req.params, allow_empty=True))


def _sse_lines(raw: bytes) -> list[str]:
    """The event lines of a chunked HTTP/1.1 response read off a raw socket."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body = bytearray()
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2:]
    return [line for line in body.decode().split("\n") if line]


# ---------------------------------------------------------------------- limits


def test_body_limit_holds_with_and_without_content_length(live):
    # Guards: a chunked body (no Content-Length) read whole into memory before any check,
    # an endless one never answered, and the limit off by one.
    headers = {"Content-Type": "application/json"}
    good = b'{"prompt": "Once upon a time", "max_tokens": 1, "temperature": 0}'
    exactly = good + b" " * (MAX_BODY_BYTES - len(good))  # JSON allows trailing blanks
    for chunks in (0, 5):
        assert send(live, "POST", "/v1/completions", exactly, headers, chunks=chunks)[0] == 200
        assert_error(*send(live, "POST", "/v1/completions", exactly + b" ", headers, chunks=chunks), 413, None)
    # a chunked body without end: answered once past the limit, while it is still coming
    where = urlsplit(live)
    with socket.create_connection((where.hostname, where.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
        sent, answer, out = 0, b"", b""
        while b"\r\n\r\n" not in answer:
            assert sent < 256 << 20, "no answer after 256 MiB of body"
            readable, writable, _ = select.select([s], [s], [], 10)
            assert readable or writable, "the server neither reads nor answers"
            if readable:
                data = s.recv(1 << 16)
                assert data, "the server hung up without an answer"
                answer += data
            else:
                out = out or piece
                n = s.send(out)
                sent, out = sent + n, out[n:]
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert sent < 16 << 20  # answered early, not after reading some unbounded amount
    assert health(live)["status"] == "ok"


def test_token_limit_comes_from_the_model_context(generator, live):
    # Guards: max_tokens above the context accepted (the model would run past its positions),
    # and the prompt's tokens not counted against it; both refused in one line, and a
    # request that fits exactly is served.
    headers = {"Content-Type": "application/json"}
    assert generator.context_length == CONTEXT
    r = send(live, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1025}', headers)
    assert_error(*r, 400, "max_tokens")
    assert json.loads(r[2])["error"]["message"] == "max_tokens is 1025, above the model's context of 1024 tokens"
    prompt = " ".join(sample_stories("val", 20))[:3700]
    ids, cut = generator.prompt_ids(prompt)
    n = len(ids) + cut  # BOS + the prompt
    room = CONTEXT - n
    assert 0 < room < 128
    fits = {"prompt": prompt, "max_tokens": room, "min_tokens": room, "temperature": 0}
    status, _, body = send(live, "POST", "/v1/completions", json.dumps(fits).encode(), headers)
    assert status == 200 and json.loads(body)["usage"] == {"prompt_tokens": n, "completion_tokens": room,
                                                           "total_tokens": CONTEXT}
    r = send(live, "POST", "/v1/completions", json.dumps({**fits, "max_tokens": room + 1}).encode(), headers)
    assert_error(*r, 400, "max_tokens")
    assert json.loads(r[2])["error"]["message"] == (
        f"the prompt ({n} tokens) plus max_tokens ({room + 1}) is above the model's context of 1024 tokens")


# -------------------------------------------------------------------- security


def test_serve_binds_loopback_unless_told_otherwise(monkeypatch, random_run):
    # Guards: a default that exposes an unauthenticated model to the network.
    import inspect

    from tinystory.cli.app import main
    from tinystory.serve import run_server
    from tinystory.settings import load_settings

    assert load_settings(env={}).serve.host == "127.0.0.1"
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_in_thread).parameters["host"].default == "127.0.0.1"
    hosts: list[str] = []
    monkeypatch.setattr("tinystory.serve.run_server", lambda gen, defaults, host, port: hosts.append(host))
    for argv in (["serve", str(random_run)], ["serve", str(random_run), "--host", "0.0.0.0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert hosts == ["127.0.0.1", "0.0.0.0"]


_opened: list[tuple[str, Any]] = []
_watching = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching.is_set() and event in ("open", "os.listdir", "os.scandir", "glob.glob", "os.chdir"):
        _opened.append((event, args[0] if args else None))


def test_no_request_makes_the_server_read_a_file(generator, live, tmp_path):
    # Guards: a route, a path (/../, %2e%2e, %2f) or a "model" field that reaches the file
    # system (a static mount, a model loaded by name, a page read from a path in the URL).
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-c0nt3nt", encoding="utf-8")
    headers = {"Content-Type": "application/json"}
    paths = [*TRAVERSALS, f"/{secret}", f"/..{quote(str(secret))}", f"/v1/models/{quote(str(secret), safe='')}",
             f"/v1/models/..%2f..%2f..%2f..{quote(str(secret), safe='')}", "/v1/models/%2fetc%2fpasswd"]
    models = [str(secret), "/etc/passwd", "../../../../etc/passwd", f"file://{secret}", "..%2f..%2fetc%2fpasswd",
              str(generator.backend.path), str(generator.backend.path / "config.json")]  # a real model, by path

    def hostile() -> tuple[list[Any], list[Any], Any]:
        routes = [send(live, "GET", p) for p in paths]
        completions = [send(live, "POST", "/v1/completions", json.dumps(
            {"model": m, "prompt": str(secret), "max_tokens": 2, "temperature": 0}).encode(), headers) for m in models]
        return routes, completions, send(live, "GET", f"/v1/models/{quote(str(secret), safe='')}")

    hostile()  # once unwatched: what any first request loads (lazy imports, FastAPI reading an endpoint's source)
    sys.addaudithook(_audit)  # stays for the process: it records only while _watching is set
    _opened.clear()
    _watching.set()
    try:
        routes, completions, card = hostile()
    finally:
        _watching.clear()
    assert _opened == []  # nothing opened, listed or globbed while serving them
    for status, content_type, body in routes:
        assert status == 404 and content_type == "application/json", (status, body)
        assert b"s3cr3t" not in body and b"root:" not in body
    for status, _, body in completions:
        assert status == 200
        assert json.loads(body)["model"] == generator.name  # whatever the field says: the one model served
    assert card[0] == 404 and json.loads(card[2])["error"]["message"].startswith("no model ")
