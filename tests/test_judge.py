"""`tinystory eval --metrics judge` and tinystory.judge: the shipped openings, the tolerant
parser, the client against a scripted stand-in server (grades, malformed JSON, a refusal,
429, 500, a hang), the cache, the numbers it reports, the CLI's one-line errors, and a
`tinystory serve` model playing the judge end to end."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tinystory import judge as J
from tinystory.cli.app import main
from tinystory.judge import Judge, JudgeError, Story, parse_grades

pytestmark = pytest.mark.usefixtures("one_thread")

GRADES = {"grammar": 6.0, "creativity": 6.0, "consistency": 6.0, "plot": 6.0}  # the stand-in's default answer
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
SECRET = "sk-test-0123456789abcdef"


# --------------------------------------------------------------- a stand-in judge server


class StandIn(ThreadingHTTPServer):
    """An OpenAI-compatible judge on 127.0.0.1 whose answer is scripted by a marker in the
    story it reads: [grades G,C,K,P AGE], [prose], [malformed], [refuse], [429 once],
    [500 once], [500], [hang once], [hang], [seeded BASE]; anything else gets GRADES.
    Every request is recorded (method, path, headers, body)."""

    daemon_threads = True

    def __init__(self, models: tuple[str, ...] = ("judge-1",), key: str | None = None, chat: bool = True,
                 schema: bool = True, hang_s: float = 3.0) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.models, self.key, self.chat, self.schema, self.hang_s = models, key, chat, schema, hang_s
        self.requests: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client gave up waiting (the hang cases)
            self.wfile.write(raw)

    def error(self, status: int, message: str, **extra: Any) -> None:
        self.send(status, {"error": {"message": message, "type": "invalid_request_error", **extra}})

    def record(self, body: dict[str, Any] | None) -> bool:
        """Record the request; False (after a 401) when the key is wrong."""
        with self.server.lock:
            self.server.requests.append({"method": self.command, "path": self.path,
                                         "headers": dict(self.headers), "body": body})
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self.error(401, f"Incorrect API key provided: {self.headers.get('Authorization', '')[7:12]}***")
            return False
        return True

    def do_GET(self) -> None:
        if not self.record(None):
            return
        if self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})
        else:
            self.error(404, "Not Found")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.record(body):
            return
        chat = self.path == "/v1/chat/completions"
        if not (chat and self.server.chat) and self.path != "/v1/completions":
            return self.error(404, "Not Found")
        if body["model"] not in self.server.models:
            return self.error(404, f"The model `{body['model']}` does not exist", code="model_not_found")
        if chat and not self.server.schema and body.get("response_format", {}).get("type") == "json_schema":
            return self.error(400, "response_format json_schema is not supported by this server")
        text = body["messages"][0]["content"] if chat else body["prompt"]
        marker = (re.findall(r"\[(?:grades|seeded|prose|malformed|refuse|429|500|hang)[^\]]*\]", text) or [""])[0]
        with self.server.lock:
            self.server.seen[marker] += 1
            first = self.server.seen[marker] == 1
        if marker == "[429 once]" and first:
            return self.send(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "1"})
        if marker == "[500]" or (marker == "[500 once]" and first):
            return self.send(500, {"error": {"message": "boom"}})
        if marker == "[hang]" or (marker == "[hang once]" and first):
            time.sleep(self.server.hang_s)
            return self.send(500, {"error": {"message": "too late"}})
        message: dict[str, Any] = {"role": "assistant", "content": answer(marker, body.get("seed", 0))}
        if marker == "[refuse]":
            message = {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that."}
        choice = {"index": 0, "message": message} if chat else {"index": 0, "text": message["content"]}
        self.send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice],
                        "usage": USAGE})


def answer(marker: str, seed: int) -> str:
    if m := re.fullmatch(r"\[grades (\d+),(\d+),(\d+),(\d+) ([A-F])\]", marker):
        g = dict(zip(J.CRITERIA, map(int, m.groups()[:4]), strict=True))
        return json.dumps({"assessment": "Fine.", **g, "age_group": m.group(5)})
    if m := re.fullmatch(r"\[seeded (\d+)\]", marker):  # the judge's own noise: base + seed % 3
        g = {c: int(m.group(1)) + seed % 3 for c in J.CRITERIA}
        return json.dumps({"assessment": "Hm.", **g, "age_group": "B"})
    if marker == "[prose]":
        return ("The student completes the sentence well.\n\n**Grammar:** 8/10\nCreativity: 6/10\n"
                "Consistency with the beginning: 7\n- Plot - 9 out of 10\nAge group: C (6-7)")
    if marker == "[malformed]":
        return '{"assessment": "The story is", "grammar": 7, "creativity": 6, "consistency": '  # cut off
    return json.dumps({"assessment": "OK.", **{c: int(v) for c, v in GRADES.items()}, "age_group": "C"})


@pytest.fixture
def server():
    srv = StandIn()
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def start(**kw: Any) -> StandIn:
    srv = StandIn(**kw)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    return srv


def story(completion: str, opening: int = 0) -> Story:
    return Story(opening, 0, "Once upon a time, Lily saw a", " big dog. " + completion)


def judge(url: str, **kw: Any) -> Judge:
    return Judge(url, "judge-1", **{"backoff_s": 0.01, "retries": 2, "concurrency": 2, "timeout": 5.0,
                                    "cache": False, **kw})


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ------------------------------------------------------------------------- openings


def test_shipped_openings_follow_the_documented_rule():
    # guards judge_openings.json: regenerated by the rule in the module docstring, it must
    # be byte for byte the shipped file (a changed rule needs a new version and a new file)
    shipped = resources.files("tinystory").joinpath(J.OPENINGS_FILE).read_text(encoding="utf-8")
    assert shipped == json.dumps(J.openings_document(), indent=1) + "\n"
    openings = J.load_openings()
    assert len(openings) == 50 and [o.id for o in openings] == list(range(50))
    assert [o.story for o in openings[:5]] == [1, 3, 5, 6, 7]
    from conftest import sample_stories

    stories = sample_stories("val")
    for o in openings:
        assert o.beginning + o.ending == stories[o.story]
        assert 120 <= len(stories[o.story].split()) <= 250
        assert not J.SENTENCE_END.search(o.beginning) and o.ending[:1].isspace()  # cut mid-sentence
    assert openings[0].beginning.endswith("Then, she saw a little bird named Billy. Billy saw")
    assert J.load_openings(3) == openings[:3]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ('{"assessment": "ok", "grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age_group": "B"}',
     ({"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}, "B")),
    ('Sure! Here it is:\n```json\n{"Grammar": "7/10", "Creativity": 5, "Consistency with the beginning": 8, '
     '"Plot": {"score": 6}, "Age group": "C: 6-7"}\n```', ({"grammar": 7, "creativity": 5, "consistency": 8,
                                                             "plot": 6}, "C")),
    ('<think>grammar: 1</think>{"grades": {"grammar": 9, "creativity": 9.5, "consistency": 8, "plot": 7}}',
     ({"grammar": 9, "creativity": 9.5, "consistency": 8, "plot": 7}, None)),
    ("Grammar: 8/10, Creativity: 6/10, Consistency: 7/10, Plot: 9/10. Age: 4-5",
     ({"grammar": 8, "creativity": 6, "consistency": 7, "plot": 9}, "B")),
    ("{'grammar': 7, 'creativity': 6, 'consistency': 8, 'plot': 7,}",  # Python-ish, not JSON
     ({"grammar": 7, "creativity": 6, "consistency": 8, "plot": 7}, None)),
    ('{"assessment": "The story is", "grammar": 7, "creativity": 6, "consistency": ', None),  # cut off
    ("I'm sorry, but I can't help with grading this story.", None),
    ('{"grammar": 0, "creativity": 11, "consistency": 8, "plot": 7}', None),  # out of 1-10
    ("", None),
])
def test_parse_grades_is_tolerant_but_never_guesses(text, expected):
    assert parse_grades(text) == expected


def test_prompt_is_the_papers_rubric_with_the_separator():
    p = J.judge_prompt(Story(0, 0, "Lily saw a", " dog."))
    assert "Lily saw a*** dog." in p
    assert "grammar, creativity, consistency with the story's beginning and whether the plot makes sense" in p
    assert "A: 3 or under. B: 4-5. C: 6-7. D: 8-9. E: 10-12. F: 13-16." in p


def test_urls_and_when_a_key_is_needed():
    from tinystory.errors import SettingsError
    from tinystory.settings import load_settings

    assert J.base_url("http://localhost:8080") == "http://localhost:8080/v1"
    assert J.base_url(" https://api.openai.com/v1/chat/completions/ ") == "https://api.openai.com/v1"
    assert J.shown_url("http://me:pw@host:1/v1") == "http://host:1/v1"
    with pytest.raises(SettingsError, match="judge URL 'localhost:11434' is not an http"):
        J.base_url("localhost:11434")
    base = load_settings(profile="tiny", env={}).replace(eval__judge_model="m")
    local = base.replace(eval__judge_url="http://127.0.0.1:9/v1")
    assert Judge.from_settings(local, env={}).key is None  # a local server needs none
    assert Judge.from_settings(local, env={"OPENAI_API_KEY": "k"}).key == "k"
    remote = base.replace(eval__judge_url="https://judge.example/v1")
    with pytest.raises(JudgeError, match=r"^OPENAI_API_KEY is not set: the judge at https://judge\.example/v1 "):
        Judge.from_settings(remote, env={})
    assert Judge.from_settings(remote.replace(eval__judge_key_env=""), env={"OPENAI_API_KEY": "k"}).key is None
    with pytest.raises(SettingsError, match=r"eval\.judge_openings is 51, but 50 openings ship"):
        Judge.from_settings(local.replace(eval__judge_openings=51), env={})


# ----------------------------------------------------------------- scripted answers


def test_valid_grades_with_structured_output_and_usage(server):
    j = judge(server.url, key=SECRET)
    j.check()
    [[a], [b]] = j.grade_all([story("[grades 7,5,8,6 B]"), story("[grades 3,4,2,5 F]", 1)])
    assert (a.grades, a.age_group) == ({"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}, "B")
    assert (b.grades, b.age_group, b.value("age")) == ({"grammar": 3, "creativity": 4, "consistency": 2, "plot": 5},
                                                       "F", 14.5)
    assert j.stats.to_json() == {"requests": 2, "retries": 0, "cached": 0, "unparsed": 0, "failed": 0,
                                 "prompt_tokens": 200, "completion_tokens": 40}
    get, *posts = server.requests
    assert get["path"] == "/v1/models" and [p["path"] for p in posts] == ["/v1/chat/completions"] * 2
    body = posts[0]["body"]
    assert body["response_format"]["type"] == "json_schema" and body["model"] == "judge-1"
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (800, 1.0, 1234)
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in server.requests)
    assert j.endpoint == "chat" and j.format == "json_schema"


def test_malformed_json_and_a_refusal_are_counted_not_fatal(server):
    j = judge(server.url)
    out = j.grade_all([story("[grades 7,5,8,6 B]"), story("[malformed]"), story("[refuse]"), story("[prose]")])
    good, malformed, refused, prose = (a for [a] in out)
    assert good.grades is not None and malformed.grades is None and refused.grades is None
    assert malformed.error == ("unparsed: '{\"assessment\": \"The story is\", \"grammar\": 7, \"creativity\": 6, "
                               "\"consistency\":'")
    assert refused.error == "refused: I'm sorry, I can't help with that."
    assert (prose.grades, prose.age_group) == ({"grammar": 8, "creativity": 6, "consistency": 7, "plot": 9}, "C")
    assert (j.stats.unparsed, j.stats.failed, j.stats.retries, j.stats.requests) == (2, 0, 0, 4)


def test_429_is_retried_after_retry_after(server):
    j = judge(server.url)
    t0 = time.monotonic()
    [[a]] = j.grade_all([story("[429 once]")])
    assert time.monotonic() - t0 >= 1.0  # Retry-After: 1, not the 0.01 s backoff
    assert a.grades == GRADES and j.stats.retries == 1 and len(server.posts()) == 2


def test_500_is_retried_then_counted_as_failed(server):
    j = judge(server.url)
    out = j.grade_all([story("[500 once]"), story("[500]"), story("[grades 7,5,8,6 B]")])
    once, always, good = (a for [a] in out)
    assert once.grades == GRADES and good.grades is not None
    assert always.failed and always.error == "failed: answered HTTP 500: boom (3 tries)"
    assert (j.stats.retries, j.stats.failed, j.stats.unparsed, len(server.posts())) == (1 + 2, 1, 0, 2 + 3 + 1)


def test_a_judge_that_always_fails_stops_at_its_first_story(server):
    with pytest.raises(JudgeError) as e:
        judge(server.url).grade_all([story("[500]"), story("[grades 7,5,8,6 B]")])
    assert str(e.value) == (f"the judge at {server.url} answered HTTP 500: boom (3 tries) (check the server (or raise "
                            "--set eval.judge_timeout=SECONDS))")
    assert len(server.posts()) == 3  # the second story was never sent


def test_a_hang_times_out_and_is_retried():
    srv = start(hang_s=2.0)
    try:
        j = judge(srv.url, timeout=0.5, retries=1)
        [[a]] = j.grade_all([story("[hang once]")])
        assert a.grades == GRADES and j.stats.retries == 1
        t0 = time.monotonic()
        with pytest.raises(JudgeError) as e:
            j.grade_all([story("[hang]")])
        assert time.monotonic() - t0 < 1.9  # two tries of 0.5 s, not the server's 2 s
        assert e.value.message == f"the judge at {srv.url} did not answer within 0.5 s (2 tries)"
    finally:
        srv.shutdown()
        srv.server_close()


def test_fails_in_a_row_stop_the_judge(server):
    j = judge(server.url, retries=0, concurrency=1)
    with pytest.raises(JudgeError, match=r"answered HTTP 500: boom \(1 try\), 3 times in a row"):
        j.grade_all([story("[grades 7,5,8,6 B]"), *[story("[500]", i) for i in range(1, 6)]])
    assert len(server.posts()) == 1 + 3


def test_fallbacks_no_chat_endpoint_and_no_json_schema():
    srv, old = start(chat=False), start(schema=False)
    try:
        j = judge(srv.url)
        [[a]] = j.grade_all([story("[grades 7,5,8,6 B]")])
        assert a.grades is not None and j.endpoint == "completions"
        assert [p["path"] for p in srv.posts()] == ["/v1/chat/completions", "/v1/completions"]
        assert srv.posts()[1]["body"]["prompt"].endswith("\n\nAnswer:\n")
        k = judge(old.url)
        [[b]] = k.grade_all([story("[grades 7,5,8,6 B]")])
        assert b.grades is not None and (k.endpoint, k.format) == ("chat", "json_object")
        assert [p["body"]["response_format"]["type"] for p in old.posts()] == ["json_schema", "json_object"]
    finally:
        for s in (srv, old):
            s.shutdown()
            s.server_close()


# ------------------------------------------------------------------- numbers and cache


def test_repeats_report_the_mean_interval_and_the_judges_spread(server):
    j = judge(server.url)
    graded = j.grade_all([story("[seeded 4]"), story("[seeded 7]", 1)], repeats=3)
    assert [[a.grades["plot"] for a in g] for g in graded] == [[5, 6, 4], [8, 9, 7]]  # seeds 1234, 1235, 1236
    s = J.summarize(graded)["plot"]
    half = 1.96 * 2.1213203 / 2 ** 0.5  # sd of the story means 5 and 8, over sqrt(2)
    assert s["mean"] == 6.5 and s["n"] == 2 and s["judge_sd"] == 1.0  # each story's repeats: variance 1
    assert s["ci95"] == pytest.approx([6.5 - half, 6.5 + half], abs=1e-4)
    assert J.summarize(graded)["age"] == {"mean": 4.5, "ci95": [4.5, 4.5], "n": 2, "judge_sd": 0.0}
    assert J.interval([]) == {"mean": None, "ci95": None, "n": 0} and J.interval([7])["ci95"] is None


def test_the_cache_makes_a_second_run_free(server, monkeypatch):
    stories = [story("[grades 7,5,8,6 B]"), story("[malformed]"), story("[seeded 4]")]
    first = judge(server.url, cache=True, key=SECRET).grade_all(stories, repeats=2)
    assert len(server.posts()) == 6
    again = judge(server.url, cache=True, key=SECRET)
    assert again.grade_all(stories, repeats=2) == first
    assert len(server.posts()) == 6  # nothing new was asked
    assert again.stats.to_json() == {"requests": 0, "retries": 0, "cached": 6, "unparsed": 2, "failed": 0,
                                     "prompt_tokens": 0, "completion_tokens": 0}
    key = again._cache_key(stories[0], 0)  # keyed by story, judge model, rubric version (and repeat)
    assert key != Judge(server.url, "judge-2")._cache_key(stories[0], 0) != again._cache_key(stories[0], 1)
    monkeypatch.setattr(J, "RUBRIC_VERSION", J.RUBRIC_VERSION + 1)
    assert key != again._cache_key(stories[0], 0)
    from tinystory.paths import cache_dir

    files = list((cache_dir() / "judge").glob("*.json"))
    assert len(files) == 6 and not any(SECRET in f.read_text() for f in files)


# ---------------------------------------------------------------------- the CLI


@pytest.fixture
def run(tmp_path, random_run) -> Path:
    path = tmp_path / "run"
    shutil.copytree(random_run, path)
    return path


def cli(capsys, *args: str) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of `tinystory eval ...` in this process."""
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(["eval", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err, time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_grades_the_model_and_the_real_endings_and_keeps_the_key_secret(run, capsys, monkeypatch):
    srv = start(key=SECRET)
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    try:
        code, out, err, _ = cli(capsys, str(run), "-p", "tiny", "-m", "judge", "--judge-url", srv.url,
                                "--judge-model", "judge-1", "--judge-key-env", "MY_JUDGE_KEY", "--judge-repeats", "2",
                                "--set", "eval.judge_openings=3", "--json")
    finally:
        srv.shutdown()
        srv.server_close()
    assert code == 0, err
    saved = json.loads((run / "eval.json").read_text())
    assert json.loads(out) == saved
    j = saved["judge"]
    assert j["judge"] == {"model": "judge-1", "url": srv.url, "rubric": 1, "openings_version": 1, "endpoint": "chat",
                          "format": "json_schema", "temperature": 1.0, "repeats": 2, "openings": 3, "samples": 1}
    assert j["counts"] == {"stories": 3, "reference_stories": 3, "requests": 12, "retries": 0, "cached": 0,
                           "unparsed": 0, "failed": 0, "prompt_tokens": 1200, "completion_tokens": 240}
    assert j["scores"]["grammar"] == {"mean": 6.0, "ci95": [6.0, 6.0], "n": 3, "judge_sd": 0.0}
    assert saved["metrics"] == {"judge-grammar": 6.0, "judge-creativity": 6.0, "judge-consistency": 6.0,
                                "judge-plot": 6.0, "judge-age": 6.5}
    assert saved["reference"] == saved["metrics"]
    openings = J.load_openings(3)
    assert [s["opening"] for s in j["stories"]] == [0, 1, 2]
    assert [s["grades"] for s in j["stories"]] == [[{**GRADES, "age_group": "C"}] * 2] * 3
    assert j["reference_stories"][0]["completion"].startswith(openings[0].ending[:20])  # the real ending...
    assert len(j["reference_stories"][0]["completion"]) < len(openings[0].ending)  # ...cut at 48 tokens
    sent = [p["body"]["messages"][0]["content"] for p in srv.posts()]
    assert any(f"{openings[1].beginning}***{j['stories'][1]['completion']}" in s for s in sent)
    assert "judge judge-1: 12 requests, 0 answers from the cache, 0 retries, 0 unparsed, 0 failed; tokens used: " \
           "1,200 prompt + 240 completion" in err
    for text in (out, err, (run / "eval.json").read_text()):
        assert SECRET not in text


def test_model_card_carries_the_judge_scores_and_name():
    from tinystory.modelcard import eval_section

    scores = {"grammar": {"mean": 7.25, "ci95": [7.0, 7.5], "n": 40, "judge_sd": None}}
    data = {"metrics": {"bpb": 1.5, "judge-grammar": 7.25}, "reference": {"judge-grammar": 8.5},
            "judge": {"judge": {"model": "gpt-4o", "openings": 40}, "scores": scores,
                      "reference": {"grammar": {"mean": 8.5, "ci95": [8.25, 8.75]}}, "counts": {"stories": 40}}}
    text = eval_section(data)
    assert "| Judge: grammar | 7.25 ± 0.25 | 8.50 ± 0.25 | 1-10, is the completion grammatical (graded by `gpt-4o`) |" \
        in text
    assert "*Judge*: `gpt-4o` graded 40 completions of 40 story openings" in text


@pytest.mark.parametrize("case", ["unreachable", "wrong model", "missing key", "401"])
def test_bad_judge_input_is_one_line_and_exit_1_within_seconds(case, run, capsys, monkeypatch):
    srv = start(key="right-key" if case == "401" else None)
    url = f"http://127.0.0.1:{free_port()}/v1" if case == "unreachable" else srv.url
    args = [str(run), "-p", "tiny", "-m", "judge", "--judge-url", url, "--judge-model", "judge-1"]
    if case == "wrong model":
        args[-1] = "nope"
    if case in ("missing key", "401"):
        args += ["--judge-key-env", "MY_JUDGE_KEY"]
        monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    if case == "401":
        monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    try:
        code, out, err, seconds = cli(capsys, *args)
    finally:
        srv.shutdown()
        srv.server_close()
    assert (code, out) == (1, "") and seconds < 5
    [line] = err.strip().splitlines()
    expected = {
        "unreachable": f"error: cannot reach the judge at {url}: [Errno 111] Connection refused (start the server, "
                       "or check --judge-url)",
        "wrong model": f"error: the judge at {url} has no model 'nope' (HTTP 404: The model `nope` does not exist) "
                       "(pass --judge-model with one of: judge-1)",
        "missing key": f"error: MY_JUDGE_KEY is not set: the judge at {url} needs an API key from it (export "
                       "MY_JUDGE_KEY=..., or pass --judge-key-env '' for a server that needs no key)",
        "401": f"error: the judge at {url} refused the API key (HTTP 401) (check the key in MY_JUDGE_KEY)",
    }[case]
    assert line == expected and SECRET not in err
    assert not (run / "eval.json").exists()
    assert [r["method"] for r in srv.requests] == {"unreachable": [], "missing key": [], "401": ["GET"],
                                                   "wrong model": ["GET", "POST"]}[case]


def test_judge_needs_a_url_and_a_model_and_all_leaves_it_out(run, capsys):
    from tinystory.evaluation import METRICS, parse_metrics

    assert parse_metrics(["all"]) == list(METRICS) and parse_metrics(["all", "judge"]) == [*METRICS, "judge"]
    code, _, err, _ = cli(capsys, str(run), "-p", "tiny", "-m", "judge")
    assert code == 1 and err.strip() == ("error: --metrics judge needs a judge server and a model (pass --judge-url "
                                         "URL --judge-model NAME (e.g. http://localhost:11434/v1 llama3.1))")


# ------------------------------------------------------- tinystory serve as the judge


def test_a_tinystory_serve_model_plays_the_judge(run, random_run, tmp_path, capsys):
    # its grades are nonsense: every answer must be counted as unparsed, nothing may crash
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams
    from tinystory.serve import serve_in_thread

    judge_run = tmp_path / "judge-run"
    shutil.copytree(random_run, judge_run)
    config = json.loads((judge_run / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # room for the rubric (RoPE: any length runs)
    (judge_run / "config.json").write_text(json.dumps(config))
    gen = Generator.load(judge_run, device="cpu", threads=1)
    with serve_in_thread(gen, SamplingParams(max_new_tokens=16)) as url:
        code, out, err, _ = cli(capsys, str(run), "-p", "tiny", "-m", "judge", "--judge-url", url,
                                "--judge-model", gen.name, "--set", "eval.judge_openings=2",
                                "--set", "eval.judge_max_tokens=16")
    assert code == 0, err
    j = json.loads((run / "eval.json").read_text())["judge"]
    c = j["counts"]
    assert (c["stories"], c["reference_stories"], c["requests"], c["failed"]) == (2, 2, 4, 0)
    assert c["unparsed"] == 4 and c["completion_tokens"] == 4 * 16 and c["prompt_tokens"] > 4 * 300
    assert j["judge"]["endpoint"] == "completions" and j["scores"]["grammar"]["mean"] is None
    assert all(g[0]["error"].startswith("unparsed: ") for g in (s["grades"] for s in j["stories"]))
    row = next(line for line in out.splitlines() if "judge: grammar" in line)
    assert row.count(" - ") >= 1 and "judge-run: 2 stories x 1, 4 unparsed, 0 failed" in out
    assert f"judge {gen.name}: 4 requests" in err and "4 of 4 judge answers held no grades" in err
