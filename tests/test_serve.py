"""`tinystory serve`: the OpenAI-compatible API, the page, the queue, disconnects, the CLI.

The model is the untrained `random_run` (fast, and deterministic when greedy or seeded):
what matters here is that the server delivers exactly what `Generator` produces.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tinystory-llm[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'tinystory-llm[serve]'")

from conftest import PacedGenerator
from fastapi.testclient import TestClient

from tinystory.generation import Generator
from tinystory.sampling import SamplingParams
from tinystory.serve import StopScanner, bind, create_app, is_loopback, parse_completion, serve_in_thread

PROMPT = "Once upon a time"
DEFAULTS = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.9, seed=None)


@pytest.fixture(scope="module")
def generator(random_run: Path) -> Generator:
    return Generator.load(random_run, device="cpu", threads=1)


@pytest.fixture(scope="module")
def client(generator: Generator):
    app = create_app(generator, DEFAULTS)
    with TestClient(app) as c:
        yield c
    app.state.worker.close()


@pytest.fixture(scope="module")
def live(generator: Generator):
    with serve_in_thread(generator, DEFAULTS) as url:
        yield url


def alone(generator: Generator, prompt: str, **params) -> str:
    """What the generator writes for `prompt` with nobody else around."""
    return generator.generate(prompt, SamplingParams(**{**DEFAULTS.to_dict(), **params}), allow_empty=True)


def sse_payloads(lines) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking its framing."""
    out = []
    for line in lines:
        if line:
            assert line.startswith("data: "), line
            out.append(line[len("data: "):])
    return out


# ------------------------------------------------------------------------ the API


def test_health_and_models(client, generator):
    assert client.get("/health").json() == {"status": "ok", "model": generator.name, "busy": False, "waiting": 0,
                                            "jobs": {"started": 0, "finished": 0, "tokens": 0}}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert card["id"] == generator.name == "random_run0"
    assert card["object"] == "model" and card["owned_by"] == "tinystory"
    assert card["parameters"] == generator.num_parameters == 139_584
    assert card["size_bytes"] == 4 * 139_584
    assert card["context_length"] == 512
    assert card["defaults"] == {"max_tokens": 32, "temperature": 1.0, "top_p": 0.9, "top_k": 0}
    assert client.get(f"/v1/models/{generator.name}").json() == card
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no model 'gpt-4'; this server has 'random_run0'"


def test_non_streaming_completion_is_what_generate_writes(client, generator):
    r = client.post("/v1/completions", json={"model": "anything", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == generator.name
    assert re.fullmatch(r"cmpl-[0-9a-f]{24}", body["id"])
    assert body["choices"] == [{"text": alone(generator, PROMPT, max_new_tokens=12, greedy=True),
                                "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["choices"][0]["text"] == " time" * 12
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_streaming_completion_sends_openai_chunks_then_done(client, generator):
    req = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 7, "stream": True,
           "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    *pieces, final, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["text"] for c in pieces)
    text = "".join(c["choices"][0]["text"] for c in pieces)
    assert text == alone(generator, PROMPT, max_new_tokens=8, seed=7)
    assert final["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    # the same request without streaming gives the same story
    whole = client.post("/v1/completions", json={**req, "stream": False}).json()
    assert whole["choices"][0]["text"] == text


def test_seed_repeats_a_story_and_echo_prepends_the_prompt(client):
    def text(**kw):
        return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10,
                                                    **kw}).json()["choices"][0]["text"]

    assert text(seed=3) == text(seed=3) != text(seed=4)
    assert text(seed=3, echo=True) == PROMPT + text(seed=3)


def test_stop_string_cuts_the_story(client, generator):
    full = alone(generator, PROMPT, max_new_tokens=24, seed=11)
    stop = full[10:13]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "seed": 11, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_stop_scanner_holds_back_only_a_possible_stop():
    s = StopScanner(("THE END",))
    assert [s.feed(p) for p in ("and they", " lived. TH", "E E", "ND happily")] == ["and they", " lived. ", "", ""]
    assert s.hit
    s = StopScanner(("THE END",))
    assert [s.feed(p) for p in ("THE", " cat")] == ["", "THE cat"] and s.flush() == "" and not s.hit
    s = StopScanner(("\n\n",))
    assert s.feed("one\n") == "one" and s.flush() == "\n"


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400,
     "request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (b"[1, 2]", 400, "request body must be a JSON object"),
    (b'{"max_tokens": 5}', 400, "prompt must be a string (one prompt, as text), got nothing"),
    (b'{"prompt": [1, 2, 3]}', 400, "prompt must be a string (one prompt, as text), got [1, 2, 3]"),
    (b'{"prompt": "x", "max_tokens": 513}', 400, "max_tokens is 513, above the model's context of 512 tokens"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens must be at least 1, got 0"),
    (b'{"prompt": "x", "max_tokens": 2.5}', 400, "max_tokens must be an integer, got 2.5"),
    (b'{"prompt": "x", "temperature": -0.5}', 400, "temperature must be at least 0 and at most 2, got -0.5"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, 'temperature must be a number, got "hot"'),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p must be above 0 and at most 1, got 0"),
    (b'{"prompt": "x", "top_k": -2}', 400, "top_k must be at least -1, got -2"),
    (b'{"prompt": "x", "stream": "yes"}', 400, 'stream must be true or false, got "yes"'),
    (b'{"prompt": "x", "stop": ["a", ""]}', 400, "stop must be a non-empty string or a list of at most 4 of them"),
    (b'{"prompt": "x", "n": 2}', 400, "n=2 is not supported by tinystory serve"),
    (b'{"prompt": "x", "logprobs": 3}', 400, "logprobs=3 is not supported by tinystory serve"),
    # found by the fuzz (tests/test_serve_load.py): each of these was a 500
    (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", 400,
     "temperature must be at least 0 and at most 2, got 1" + "0" * 56 + "..."),
    (b'{"prompt": "x", "temperature": NaN}', 400, "request body is not valid JSON: NaN is not a JSON value"),
    (b'{"prompt": "x", "repetition_penalty": 1e-300}', 400,
     "repetition_penalty must be at least 0.01 and at most 100, got 1e-300"),
    (b'{"prompt": "\\ud800 tail"}', 400, "prompt holds a lone UTF-16 surrogate (such as \\ud800), which is not text"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "request body is not valid JSON: it nests too deep"),
    (b'{"prompt": "x", "max_token": 5}', 400, "unknown field \"max_token\": /v1/completions takes best_of, echo, "
     "frequency_penalty, logit_bias, logprobs, max_tokens, min_tokens, model, n, presence_penalty, prompt, "
     "repetition_penalty, seed, stop, stream, stream_options, suffix, temperature, top_k, top_p, user"),
    (b'{"prompt": "x", "model": ["/etc/passwd"]}', 400,
     'model must be a string, got ["/etc/passwd"]'),
    (b'{"prompt": "x", "seed": 18446744073709551615}', 400,
     "seed must be at least -9223372036854775808 and at most 9223372036854775807, got 18446744073709551615"),
    (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "request body is larger than 1024 KiB"),
    (b'{"prompt": "' + b"x " * 400 + b'", "max_tokens": 200}', 400,
     "the prompt (800 tokens) plus max_tokens (200) is above the model's context of 512 tokens"),
])
def test_bad_requests_get_a_4xx_with_one_line(client, body, status, message):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error",
                                  "param": r.json()["error"]["param"], "code": None}}
    assert client.get("/health").json()["busy"] is False  # and the server goes on


def test_unknown_route_and_method_are_openai_shaped(client):
    assert client.get("/v1/chat").json()["error"]["message"] == "Not Found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"


def test_a_bug_still_answers_one_json_line(generator, monkeypatch):
    # Guards: an exception of ours reaching the client as Starlette's plain-text 500.
    from tinystory.serve import ModelWorker

    app = create_app(generator, DEFAULTS)
    monkeypatch.setattr(ModelWorker, "waiting", property(lambda self: 1 / 0))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/health")
    app.state.worker.close()
    assert r.status_code == 500 and r.json() == {"error": {
        "message": "ZeroDivisionError: division by zero", "type": "server_error", "param": None, "code": None}}


def test_parse_fills_omitted_fields_from_the_server_defaults():
    d = SamplingParams(max_new_tokens=100, temperature=0.7, top_k=40, top_p=0.8, seed=5)
    c = parse_completion(b'{"prompt": "Hi"}', d, 512)
    assert c.params == d and c.stream is False and c.stop == ()
    c = parse_completion(b'{"prompt": ["Hi"], "temperature": 0, "top_k": -1, "stop": "."}', d, 64)
    assert c.params.greedy and c.params.top_k == 0 and c.params.max_new_tokens == 64 and c.stop == (".",)


def test_page_is_one_self_contained_file(client, generator):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for must in (">Once upon a time</textarea>", "Tell me a story", ">Stop<", ">Copy<", 'name="viewport"',
                 "AbortController", "/v1/completions", f'"id": "{generator.name}"'):
        assert must in html, must
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing from the internet
    assert "@import" not in html and "<script src" not in html


# --------------------------------------------------------------- a live server


def test_openai_client_streams_from_a_live_server(live, generator):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="not-needed", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list()] == [generator.name]
    stream = client.completions.create(model=generator.name, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == " time" * 16
    assert 2 <= len(pieces) <= 17  # a chunk per token (pieces that queue up go together), then the finish
    whole = client.completions.create(model=generator.name, prompt="The cat sat", max_tokens=6, temperature=0)
    assert whole.choices[0].text == "at" * 6 and whole.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError, match="temperature must be at least 0"):
        client.completions.create(model=generator.name, prompt=PROMPT, temperature=-1)


def test_concurrent_streams_each_get_their_own_story(generator, capfd):
    import httpx

    requests = [{"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0},
                {"prompt": "The cat sat", "max_tokens": 40, "temperature": 0},
                {"prompt": PROMPT, "max_tokens": 40, "seed": 1},
                {"prompt": PROMPT, "max_tokens": 40, "seed": 2}]
    expected = [alone(generator, r["prompt"], max_new_tokens=40, greedy="seed" not in r, seed=r.get("seed"))
                for r in requests]
    got: dict[int, str] = {}
    start = threading.Barrier(len(requests))

    def one(url: str, i: int) -> None:
        with httpx.Client(timeout=30) as http:
            start.wait(timeout=10)
            with http.stream("POST", f"{url}/v1/completions", json={**requests[i], "stream": True}) as r:
                payloads = sse_payloads(r.iter_lines())
        got[i] = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])

    with serve_in_thread(PacedGenerator(generator, delay=0.004), DEFAULTS) as url:  # ~0.2 s a story: they overlap
        threads = [threading.Thread(target=one, args=(url, i)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert [got.get(i) for i in range(len(requests))] == expected
    assert expected[0] == " time" * 40 and expected[1] == "at" * 40 and expected[2] != expected[3]
    waits = [float(w) for w in re.findall(r"200 stream: 40 tokens .* waited ([\d.]+) s", capfd.readouterr().err)]
    assert len(waits) == 4 and max(waits) > 0.2  # they really were queued behind each other


def test_client_disconnect_stops_its_generation(generator, capfd):
    import httpx

    slow = PacedGenerator(generator, delay=0.02)  # 400 tokens would take 8 s
    with serve_in_thread(slow, DEFAULTS) as url, httpx.Client(timeout=30) as http:
        req = {"prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "seed": 1, "stream": True}
        with http.stream("POST", f"{url}/v1/completions", json=req) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 6:  # three chunks in: hang up
                    break
        t0 = time.monotonic()
        while http.get(f"{url}/health").json()["busy"]:
            assert time.monotonic() - t0 < 3, "generation went on after the client left"
            time.sleep(0.05)
        # a non-streaming client that gives up waiting: its story stops too
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/v1/completions", json={**req, "stream": False}, timeout=0.5)
        t0 = time.monotonic()
        while http.get(f"{url}/health").json()["busy"]:
            assert time.monotonic() - t0 < 3, "generation went on after the client left"
            time.sleep(0.05)
    err = capfd.readouterr().err
    m = re.search(r"POST /v1/completions 200 stream: (\d+) tokens in .* ended by client disconnected", err)
    assert m, err
    assert 3 <= int(m.group(1)) < 60
    m = re.search(r"POST /v1/completions 200 whole: (\d+) tokens in .* ended by client disconnected", err)
    assert m, err
    assert int(m.group(1)) < 100


# ------------------------------------------------------------------------- CLI


def test_without_the_extra_serve_prints_a_hint(monkeypatch, capsys, random_run):
    from tinystory.cli.app import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # find_spec() -> None, as if not installed
    with pytest.raises(SystemExit) as e:
        main(["serve", str(random_run)])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "error: tinystory serve needs fastapi, which is not installed (pip install 'tinystory-llm[serve]')")


def test_busy_port_and_loopback_checks():
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        with pytest.raises(Exception, match=f"port {port} on 127.0.0.1 is already in use"):
            bind("127.0.0.1", port)
    finally:
        sock.close()
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.5", "example.org")] == [
        True, True, True, False, False, False]


@pytest.mark.slow
def test_cli_serves_and_stops_cleanly_on_ctrl_c(random_run):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinystory", "serve", str(random_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+)/ in a browser", line)
            url = m and m.group(1)
        assert url, "".join(lines)
        import httpx

        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0}, timeout=30)
        assert r.json()["choices"][0]["text"] == " time" * 5
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    log = "".join(lines) + err
    assert "serving random_run0: 0.14M parameters, 0.5 MiB, cpu fp32" in log
    assert re.search(r"POST /v1/completions 200 whole: 5 tokens in [\d.]+ s, [\d.]+ tok/s", log)
    assert log.rstrip().endswith("server stopped") and "Traceback" not in log
    assert out == ""
