"""A language model as the judge of stories, the way the TinyStories paper graded its models.

Eldan and Li (2023, section 3) gave GPT-4 the beginning of a story and a model's
completion, separated by `***`, and asked for grades of grammar, creativity,
consistency with the beginning and plot, and for a guess of the writer's age. Here the
judge is any OpenAI-compatible server (OpenAI, llama.cpp, ollama, vLLM, `tinystory
serve`); `tinystory.evaluation` asks the model for the completions and calls this module.

The openings (`judge_openings.json`, version `OPENINGS_VERSION`) are cut from the
validation stories of the bundled sample (`tinystory/sample/valid.txt.gz`, TinyStories,
CDLA-Sharing-1.0) by this rule, which `build_openings` applies and a test re-checks:

    1. Split the file at `<|endoftext|>`, strip each story, keep the non-empty ones in
       file order (story index = position in that list).
    2. Keep the stories of 120 to 250 whitespace-separated words whose text is ASCII.
    3. Take the first 50 of them.
    4. Cut each before word number floor(2/5 x words) (0-based); while the word before the
       cut ends a sentence (`.`, `!` or `?`, then closing quotes or brackets), cut one word
       later, so that the opening stops mid-sentence, as the paper's prompts do.
    5. beginning = the text before the cut, without trailing whitespace; ending = the rest
       (beginning + ending == the story). The ending is the reference: the same judge
       grades the real endings, so the model's grades read against real stories.

The rubric (version `RUBRIC_VERSION`) is the paper's prompt, in one turn, with the
answer asked for as one JSON object (assessment first, so the judge reasons before it
grades): through `response_format` json_schema where the server takes it, else
json_object, else plain text; `parse_grades` also reads JSON inside prose and lines such
as "Grammar: 7/10". An answer without the four grades counts as unparsed, never as an
error. The client talks to `/chat/completions`, or to `/completions` where a server has
no chat endpoint (a `tinystory serve` judge); it retries 429, 5xx and timeouts with
exponential backoff (Retry-After honoured), keeps `concurrency` requests in flight, and
caches every answer under `<cache dir>/judge/`, keyed by the story, the judge model, the
rubric version, the repeat and the judge's temperature, so a rerun pays nothing twice.
The API key is read from an environment variable and goes only into the Authorization
header: never into messages, logs, eval.json or the cache.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import re
import statistics
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from tinystory.console import info, warn
from tinystory.errors import SettingsError, TinystoryError
from tinystory.paths import cache_dir, write_atomic
from tinystory.progress import bar

if TYPE_CHECKING:
    from tinystory.settings import Settings

RUBRIC_VERSION = 1
OPENINGS_VERSION = 1
OPENINGS_FILE = "judge_openings.json"
CRITERIA = ("grammar", "creativity", "consistency", "plot")
# The start of each name in an answer: "Grammatical correctness", "creative", "consistent with ...".
STEMS = {"grammar": "gramma", "creativity": "creativ", "consistency": "consisten", "plot": "plot"}
# The paper's age groups, and the age (years, the middle of the group) that `age` averages.
AGE_GROUPS = {"A": ("3 or under", 3.0), "B": ("4-5", 4.5), "C": ("6-7", 6.5), "D": ("8-9", 8.5),
              "E": ("10-12", 11.0), "F": ("13-16", 14.5)}
FORMATS = ("json_schema", "json_object", "text")  # each falls back to the next where a server refuses it
BACKOFF_S = 1.0  # first wait before a retry; doubles at each one
MAX_WAIT_S = 60.0  # longest wait between two tries, whatever Retry-After says
FAIL_LIMIT = 3  # requests failing in a row (after their retries) before the judge gives up
CHECK_TIMEOUT_S = 10.0  # the checks before grading: a dead host fails in seconds
Z95 = 1.96  # normal quantile of a two-sided 95% interval

PROMPT = """In the following exercise, the student is given a beginning of a story. The student needs to \
complete it into a full story. The exercise tests the student's language abilities and creativity. The symbol \
*** marks the separator between the prescribed beginning and the student's completion:

{beginning}***{completion}

Please provide your general assessment about the part written by the student (the one after the *** symbol). \
Is it grammatically correct? Is it consistent with the beginning of the story? Pay special attention to whether \
the student manages to complete the sentence which is split in the middle by the separator ***.

Then grade the student's completion in terms of grammar, creativity, consistency with the story's beginning and \
whether the plot makes sense, each on a scale from 1 to 10. Moreover, please provide your best guess of what the \
age of the student might be, as reflected from the completion. Choose from possible age groups: A: 3 or under. \
B: 4-5. C: 6-7. D: 8-9. E: 10-12. F: 13-16.

Answer with one JSON object and nothing else, in this form:
{{"assessment": "<your general assessment>", "grammar": <1-10>, "creativity": <1-10>, "consistency": <1-10>, \
"plot": <1-10>, "age_group": "<A-F>"}}"""

SCHEMA = {
    "type": "object",
    "properties": {"assessment": {"type": "string"}, **{c: {"type": "integer"} for c in CRITERIA},
                   "age_group": {"type": "string", "enum": list(AGE_GROUPS)}},
    "required": ["assessment", *CRITERIA, "age_group"],
    "additionalProperties": False,
}


class JudgeError(TinystoryError):
    """The judge cannot be used: no key, an unreachable or refusing server, a wrong model."""


# ---------------------------------------------------------------------------- openings


@dataclass(frozen=True)
class Opening:
    """The beginning of a real validation story and its real ending."""

    id: int
    story: int  # index in the bundled validation sample
    beginning: str
    ending: str


SENTENCE_END = re.compile(r"""[.!?]['")\]]*$""")


def build_openings(limit: int = 50) -> list[dict[str, Any]]:
    """The openings by the rule in the module docstring, from the bundled validation sample."""
    raw = resources.files("tinystory.sample").joinpath("valid.txt.gz").read_bytes()
    stories = [s.strip() for s in gzip.decompress(raw).decode("utf-8").split("<|endoftext|>") if s.strip()]
    out: list[dict[str, Any]] = []
    for index, story in enumerate(stories):
        words = list(re.finditer(r"\S+", story))
        if not (story.isascii() and 120 <= len(words) <= 250):
            continue
        cut = len(words) * 2 // 5
        while SENTENCE_END.search(words[cut - 1].group()):
            cut += 1
        beginning = story[: words[cut].start()].rstrip()
        out.append({"id": len(out), "story": index, "beginning": beginning, "ending": story[len(beginning):]})
        if len(out) == limit:
            break
    return out


def openings_document() -> dict[str, Any]:
    """What `judge_openings.json` holds; to write it again after a change of the rule (with
    a new OPENINGS_VERSION): python -c "import json, tinystory.judge as j;
    print(json.dumps(j.openings_document(), indent=1))" > src/tinystory/judge_openings.json"""
    return {"version": OPENINGS_VERSION,
            "source": "tinystory/sample/valid.txt.gz: TinyStories validation stories by Ronen Eldan and Yuanzhi Li",
            "license": "CDLA-Sharing-1.0 (tinystory/sample/LICENSE-CDLA-Sharing-1.0.txt); changes: each story cut "
                       "in two by the rule in tinystory.judge (build_openings)",
            "openings": build_openings()}


def load_openings(limit: int | None = None) -> list[Opening]:
    """The first `limit` shipped openings (all when None)."""
    data = json.loads(resources.files("tinystory").joinpath(OPENINGS_FILE).read_text(encoding="utf-8"))
    openings = [Opening(o["id"], o["story"], o["beginning"], o["ending"]) for o in data["openings"]]
    return openings[:limit] if limit else openings


# ----------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Story:
    """What the judge reads: an opening and a completion (the model's, or the real ending)."""

    opening: int
    sample: int
    beginning: str
    completion: str


@dataclass
class Answer:
    """One grading of one story: the grades (None when the answer held none) or why not."""

    grades: dict[str, float] | None = None
    age_group: str | None = None
    error: str | None = None  # unparsed: ...; refused: ...; failed: ...
    failed: bool = False  # no answer came back (after the retries), as opposed to an unusable one

    def value(self, key: str) -> float | None:
        """A criterion's grade, or (`age`) the age in years of the guessed group."""
        if key == "age":
            return AGE_GROUPS[self.age_group][1] if self.age_group else None
        return self.grades.get(key) if self.grades else None

    def to_json(self) -> dict[str, Any]:
        if self.grades is None:
            return {"error": self.error}
        return {**self.grades, "age_group": self.age_group}


def judge_prompt(story: Story) -> str:
    """The rubric with the beginning and the completion filled in."""
    return PROMPT.format(beginning=story.beginning, completion=story.completion)


def _grade(value: Any) -> float | None:
    """A 1-10 grade from 7, 7.5, "7", "7/10" or {"score": 7}; None otherwise."""
    if isinstance(value, Mapping):
        value = next((v for k, v in value.items() if str(k).lower() in ("score", "grade", "value")), None)
    if isinstance(value, str):
        m = re.match(r"\s*(\d+(?:\.\d+)?)", value)
        value = float(m.group(1)) if m else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 1 <= value <= 10 else None


def _age_group(value: Any) -> str | None:
    """The age group letter of "B", "b", "B: 4-5" or "4-5" (all "B"); None otherwise."""
    text = str(value or "").strip()
    if text[:1].upper() in AGE_GROUPS and (len(text) == 1 or not text[1].isalpha()):
        return text[0].upper()
    return next((g for g, (span, _) in AGE_GROUPS.items() if span in text), None)


def _from_mapping(data: Mapping[str, Any]) -> tuple[dict[str, float], str | None]:
    """Grades and age group from a JSON object, keys matched loosely ("Grammar",
    "consistency_with_beginning", {"plot": {"score": 7}}, nested {"grades": {...}})."""
    grades: dict[str, float] = {}
    age = None
    for key, value in data.items():
        k = str(key).lower()
        crit = next((c for c in CRITERIA if k.startswith(STEMS[c])), None)
        if crit is None and isinstance(value, Mapping):
            inner, inner_age = _from_mapping(value)
            grades, age = {**inner, **grades}, age or inner_age
        elif crit is not None and crit not in grades and (g := _grade(value)) is not None:
            grades[crit] = g
        elif k.startswith("age") and age is None:
            age = _age_group(value)
    return grades, age


# "Grammar: 7", "**Consistency with the beginning**: 8/10", "'plot': 6": a name, at most a few
# words, a separator, the number. "creativity ... 6/10": a name, then a number out of 10.
AFTER_NAME = r"\w*['\"]?[ \w]{0,40}?['\"]?\s*[:=\-\u2013]\s*['\"]?(\d+(?:\.\d+)?)"
OUT_OF_10 = r"\w*[^\d\n]{0,40}?(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10"
AGE_LINE = re.compile(r"(?i:age[ _a-z]{0,12}?)['\"]?\s*[:=\-]\s*['\"]?\(?([A-F]\b|\d{1,2} ?- ?\d{1,2}|3 or under)")


def parse_grades(text: str) -> tuple[dict[str, float], str | None] | None:
    """(grades of the four criteria, age group or None) from a judge's answer, or None
    when it does not grade all four. Tried in order: the whole answer as JSON (``` fences
    and <think> blocks removed), the first JSON object inside it that holds grades, then
    "Name: N" / "Name ... N/10" in the prose (the last of each, as grades follow the
    assessment)."""
    text = re.sub(r"<think>.*?</think>", "", text or "", flags=re.S).strip()
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text).strip()
    candidates: list[Any] = []
    try:
        candidates.append(json.loads(text))
    except ValueError:
        decoder = json.JSONDecoder()
        for m in re.finditer(r"\{", text):
            try:
                candidates.append(decoder.raw_decode(text, m.start())[0])
            except ValueError:
                continue
    for data in candidates:
        if isinstance(data, Mapping):
            grades, age = _from_mapping(data)
            if len(grades) == len(CRITERIA):
                return {c: grades[c] for c in CRITERIA}, age
    plain = re.sub(r"[*_#`]", "", text)
    grades = {}
    for crit in CRITERIA:
        found = [(m.start(), m.group(1)) for pattern in (AFTER_NAME, OUT_OF_10)
                 for m in re.finditer(STEMS[crit] + pattern, plain, flags=re.I)]
        values = [g for _, v in sorted(found) if (g := _grade(v)) is not None]
        if values:
            grades[crit] = values[-1]
    if len(grades) < len(CRITERIA):
        return None
    ages = [_age_group(re.sub(r" ?- ?", "-", a)) for a in AGE_LINE.findall(plain)]
    return {c: grades[c] for c in CRITERIA}, (ages[-1] if ages else None)


# ------------------------------------------------------------------------------ client


@dataclass
class JudgeStats:
    """What grading cost: requests, their retries and the tokens the server reported."""

    requests: int = 0
    retries: int = 0
    cached: int = 0
    unparsed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class _Status(Exception):
    """An HTTP answer that is not a success and not worth a retry."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Gone(Exception):
    """No answer after every retry: why, in words ("did not answer within 60 s (5 tries)")."""


def _message(response: httpx.Response) -> str:
    """The server's error message (OpenAI's {"error": {"message"}} or others), one line."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200]
    err = body.get("error", body) if isinstance(body, dict) else body
    msg = err.get("message") or err.get("detail") or err if isinstance(err, dict) else err
    return " ".join(str(msg).split())[:200]


def _loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def base_url(url: str) -> str:
    """The API base: http(s)://host[:port]/path, `/v1` added when there is no path, an
    endpoint left at the end (/chat/completions) dropped; SettingsError for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"judge URL {url!r} is not an http(s) URL",
                            "pass --judge-url such as http://localhost:11434/v1 or https://api.openai.com/v1")
    path = re.sub(r"/(chat/completions|completions|models)/?$", "", parts.path).rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def shown_url(url: str) -> str:
    """The URL as messages and eval.json show it: without a user:password@."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


@dataclass
class Judge:
    """An OpenAI-compatible server that grades stories (see the module docstring)."""

    url: str
    model: str
    key: str | None = field(default=None, repr=False)
    key_env: str = ""
    timeout: float = 60.0
    retries: int = 4
    concurrency: int = 4
    max_tokens: int = 800
    temperature: float = 1.0
    format: str = "json_schema"
    seed: int = 1234
    backoff_s: float = BACKOFF_S
    cache: bool = True
    endpoint: str | None = None  # "chat" or "completions", once known
    stats: JudgeStats = field(default_factory=JudgeStats)

    def __post_init__(self) -> None:
        self.url = base_url(self.url)
        self.shown = shown_url(self.url)
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._fails_in_row = 0
        self._listed: list[str] = []  # the models /models lists (check)
        self._max_key = "max_tokens"

    @classmethod
    def from_settings(cls, settings: Settings, env: Mapping[str, str] | None = None) -> Judge:
        """The judge of `settings.eval`, its key read from the environment; JudgeError in one
        line when a key is needed and missing. Without a key a loopback server is fine
        (llama.cpp, ollama, `tinystory serve` need none), unless a variable was named."""
        ev = settings.eval
        if not ev.judge_url or not ev.judge_model:
            raise SettingsError("--metrics judge needs a judge server and a model",
                                "pass --judge-url URL --judge-model NAME (e.g. http://localhost:11434/v1 llama3.1)")
        url = base_url(ev.judge_url)
        for name, value, lo in (("judge_openings", ev.judge_openings, 1), ("judge_samples", ev.judge_samples, 1),
                                ("judge_repeats", ev.judge_repeats, 1), ("judge_concurrency", ev.judge_concurrency, 1),
                                ("judge_retries", ev.judge_retries, 0), ("judge_max_tokens", ev.judge_max_tokens, 0)):
            if value < lo:
                raise SettingsError(f"eval.{name} must be at least {lo}, got {value}", f"e.g. --set eval.{name}={lo}")
        shipped = len(load_openings())
        if ev.judge_openings > shipped:
            raise SettingsError(f"eval.judge_openings is {ev.judge_openings}, but {shipped} openings ship with "
                                "tinystory", f"use at most {shipped}")
        if ev.judge_timeout <= 0:
            raise SettingsError(f"eval.judge_timeout must be above 0 s, got {ev.judge_timeout:g}", "e.g. 60")
        env = os.environ if env is None else env
        key = env.get(ev.judge_key_env, "").strip() if ev.judge_key_env else ""
        named = settings.source("eval.judge_key_env") != "default"
        if ev.judge_key_env and not key and (named or not _loopback(urlsplit(url).hostname or "")):
            raise JudgeError(f"{ev.judge_key_env} is not set: the judge at {shown_url(url)} needs an API key from it",
                             f"export {ev.judge_key_env}=..., or pass --judge-key-env '' for a server that needs "
                             "no key")
        return cls(url, ev.judge_model, key or None, ev.judge_key_env, ev.judge_timeout, ev.judge_retries,
                   ev.judge_concurrency, ev.judge_max_tokens, ev.judge_temperature, ev.judge_format, ev.seed)

    # ----------------------------------------------------------------- HTTP

    def _client(self, timeout: float) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        local = _loopback(urlsplit(self.url).hostname or "")  # a local server is never behind a proxy
        return httpx.Client(headers=headers, timeout=timeout, trust_env=not local,
                            limits=httpx.Limits(max_connections=self.concurrency + 1))

    def _scrub(self, text: str) -> str:
        """`text` with the key masked (servers echo parts of a wrong key in their errors)."""
        return text.replace(self.key, "***") if self.key else text

    def _fatal(self, status: int, message: str) -> JudgeError:
        if status in (401, 403):  # the server's words may quote part of the key: left out
            return JudgeError(f"the judge at {self.shown} refused the API key (HTTP {status})",
                              f"check the key in {self.key_env}" if self.key_env else
                              "the server needs a key: name its variable with --judge-key-env")
        if status == 404:
            listed = f"one of: {', '.join(self._listed[:10])}" if self._listed else "a model the server has"
            return JudgeError(f"the judge at {self.shown} has no model {self.model!r} (HTTP 404: "
                              f"{self._scrub(message)})", f"pass --judge-model with {listed}")
        return JudgeError(f"the judge at {self.shown} answered HTTP {status}: {self._scrub(message)}",
                          "check --judge-url and --judge-model")

    def _unreachable(self, e: Exception) -> JudgeError:
        why = "timed out" if isinstance(e, httpx.TimeoutException) else self._scrub(str(e)) or type(e).__name__
        return JudgeError(f"cannot reach the judge at {self.shown}: {why}", "start the server, or check --judge-url")

    def _post(self, http: httpx.Client, path: str, body: dict[str, Any], retries: int) -> dict[str, Any]:
        """POST with `retries` retries on 429, 5xx and transport errors (exponential backoff,
        or Retry-After when longer); _Status for another failure, _Gone when every try failed."""
        why = ""
        for attempt in range(retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            wait_s = self.backoff_s * 2**attempt
            try:
                r = http.post(self.url + path, json=body)
            except httpx.TimeoutException:
                why = f"did not answer within {self.timeout:g} s"
            except httpx.TransportError as e:
                why = f"failed: {self._scrub(str(e)) or type(e).__name__}"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                    except ValueError:
                        raise _Status(200, "the answer is not JSON") from None
                    if isinstance(data, dict):
                        return data
                    raise _Status(200, "the answer is not a JSON object")
                if r.status_code != 429 and r.status_code < 500:
                    raise _Status(r.status_code, _message(r))
                why = f"answered HTTP {r.status_code}: {self._scrub(_message(r))}"
                with contextlib.suppress(ValueError):  # Retry-After in seconds (an HTTP date is ignored)
                    wait_s = max(wait_s, float(r.headers.get("retry-after", "")))
            if attempt == retries or self._abort.wait(min(wait_s, MAX_WAIT_S)):
                break
        tries = attempt + 1
        raise _Gone(f"{why} ({tries} tr{'ies' if tries > 1 else 'y'})")

    def _body(self, prompt: str, seed: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "temperature": self.temperature, "seed": seed}
        if max_tokens:
            body[self._max_key] = max_tokens
        if self.endpoint == "completions":
            return "/completions", {**body, "prompt": prompt + "\n\nAnswer:\n"}
        if self.format == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "story_grades", "strict": True, "schema": SCHEMA}}
        elif self.format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}

    def _ask(self, http: httpx.Client, prompt: str, seed: int, max_tokens: int,
             retries: int | None = None) -> dict[str, Any]:
        """One answer of the judge, finding on the way what the server takes: no chat
        endpoint -> /completions; response_format refused -> the next of FORMATS;
        max_tokens refused (OpenAI's newer models) -> max_completion_tokens. A refused key or
        a missing model or endpoint raise JudgeError; other failures _Status or _Gone."""
        while True:
            path, body = self._body(prompt, seed, max_tokens)
            try:
                data = self._post(http, path, body, self.retries if retries is None else retries)
                self.endpoint = self.endpoint or "chat"
                return data
            except _Status as e:
                about_model = "model" in e.message.lower() or self.model in e.message
                if e.status in (401, 403) or (e.status == 404 and about_model):
                    raise self._fatal(e.status, e.message) from None
                if e.status in (404, 405, 501) and self.endpoint is None:
                    self.endpoint = "completions"  # no chat endpoint (a `tinystory serve` judge)
                    continue
                if e.status in (404, 405, 501):
                    raise JudgeError(f"the judge at {self.shown} has no /chat/completions or /completions endpoint "
                                     f"(HTTP {e.status})", "check --judge-url (it usually ends in /v1)") from None
                if e.status in (400, 422) and "max_completion_tokens" in e.message and self._max_key == "max_tokens":
                    self._max_key = "max_completion_tokens"
                    continue
                refused = e.status in (400, 422) and re.search(r"response_format|json_schema|json_object|schema",
                                                               e.message, re.I)
                if refused and path == "/chat/completions" and self.format != "text":
                    self.format = FORMATS[FORMATS.index(self.format) + 1]
                    continue
                raise

    def check(self) -> None:
        """Fail in one line, within seconds and before any model is loaded, when the judge
        cannot grade: the server unreachable, the key refused, the model unknown. Reads
        /models; a model it does not list is asked for one token (llama.cpp lists only its
        alias but answers to any name; ollama and vLLM answer 404)."""
        with self._client(min(self.timeout, CHECK_TIMEOUT_S)) as http:
            try:
                r = http.get(self.url + "/models")
            except httpx.TransportError as e:
                raise self._unreachable(e) from None
            if r.status_code in (401, 403):
                raise self._fatal(r.status_code, "")
            if r.status_code == 200:
                try:
                    self._listed = [str(m["id"]) for m in r.json()["data"] if isinstance(m, dict) and "id" in m]
                except (ValueError, KeyError, TypeError):
                    self._listed = []
            if self.model in self._listed:
                return
            saved, self.format = self.format, "text"
            try:
                self._ask(http, "Reply with OK.", self.seed, 1, retries=0)
            except (_Status, _Gone):
                pass  # not a missing model: grading will say more
            finally:
                self.format = saved

    # --------------------------------------------------------------- grading

    def _cache_key(self, story: Story, repeat: int) -> str:
        key = {"rubric": RUBRIC_VERSION, "model": self.model, "beginning": story.beginning,
               "completion": story.completion, "repeat": repeat, "temperature": self.temperature}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()

    def _read_answer(self, data: Mapping[str, Any]) -> Answer:
        if data.get("refusal"):
            return Answer(error=f"refused: {' '.join(str(data['refusal']).split())[:120]}")
        parsed = parse_grades(str(data.get("answer") or ""))
        if parsed is None:
            return Answer(error=f"unparsed: {' '.join(str(data.get('answer') or '').split())[:120]!r}")
        return Answer(grades=parsed[0], age_group=parsed[1])

    def _one(self, http: httpx.Client, story: Story, repeat: int) -> Answer:
        """Grade one story once (a failure after its retries is an Answer, not an error,
        until FAIL_LIMIT of them come in a row)."""
        if self._abort.is_set():
            return Answer(error="failed: cancelled", failed=True)
        try:
            with self._lock:
                self.stats.requests += 1
            data = self._ask(http, judge_prompt(story), self.seed + repeat, self.max_tokens)
        except (_Status, _Gone) as e:
            why = f"answered HTTP {e.status}: {self._scrub(e.message)}" if isinstance(e, _Status) else str(e)
            with self._lock:
                self.stats.failed += 1
                self._fails_in_row += 1
                if self._fails_in_row >= FAIL_LIMIT:
                    self._abort.set()
                    raise JudgeError(f"the judge at {self.shown} {why}, {FAIL_LIMIT} times in a row",
                                     "the grades so far are cached: check the server, then run eval again") from None
            return Answer(error=f"failed: {why}", failed=True)
        with self._lock:
            self._fails_in_row = 0
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        choices = data.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        choice = choice if isinstance(choice, dict) else {}
        message: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
        record = {"answer": message.get("content") if self.endpoint == "chat" else choice.get("text"),
                  "refusal": message.get("refusal"), "usage": usage, "model": self.model,
                  "rubric": RUBRIC_VERSION, "endpoint": self.endpoint}
        with self._lock:
            for k in ("prompt_tokens", "completion_tokens"):
                setattr(self.stats, k, getattr(self.stats, k) + (usage.get(k) or 0))
        if self.cache:
            write_atomic(cache_dir() / "judge" / f"{self._cache_key(story, repeat)}.json", json.dumps(record))
        return self._read_answer(record)

    def _cached(self, story: Story, repeat: int) -> Answer | None:
        if not self.cache:
            return None
        f = cache_dir() / "judge" / f"{self._cache_key(story, repeat)}.json"
        try:
            return self._read_answer(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            return None

    def grade_all(self, stories: Sequence[Story], repeats: int = 1, what: str = "judging") -> list[list[Answer]]:
        """`repeats` answers per story, in order: from the cache, else from the server (the
        first uncached one alone, which settles the endpoint and format, then the rest
        `concurrency` at a time). JudgeError when the first request fails, or FAIL_LIMIT
        in a row do."""
        out: list[list[Answer]] = [[Answer() for _ in range(repeats)] for _ in stories]
        todo = []
        for i, story in enumerate(stories):
            for k in range(repeats):
                hit = self._cached(story, k)
                if hit is None:
                    todo.append((i, k))
                else:
                    out[i][k] = hit
                    self.stats.cached += 1
        self._abort.clear()
        with self._client(self.timeout) as http, bar(len(todo), what) as advance:
            if todo:
                i, k = todo[0]
                first = out[i][k] = self._one(http, stories[i], k)
                if first.failed:
                    raise JudgeError(f"the judge at {self.shown} {(first.error or '')[len('failed: '):]}",
                                     "check the server (or raise --set eval.judge_timeout=SECONDS)")
                advance(1)
            pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="tinystory-judge")
            try:
                futures: dict[Future[Answer], tuple[int, int]] = {
                    pool.submit(self._one, http, stories[i], k): (i, k) for i, k in todo[1:]}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        i, k = futures[f]
                        out[i][k] = f.result()
                        advance(1)
            finally:
                self._abort.set()  # on an error or Ctrl-C: no new request, no retry
                pool.shutdown(wait=True, cancel_futures=True)
        answers = [a for story in out for a in story]
        self.stats.unparsed += sum(1 for a in answers if a.grades is None and not a.failed)
        return out

    def describe(self) -> str:
        """One line for stderr: what grading cost."""
        s = self.stats
        return (f"judge {self.model}: {s.requests} requests, {s.cached} answers from the cache, {s.retries} retries, "
                f"{s.unparsed} unparsed, {s.failed} failed; tokens used: {s.prompt_tokens:,} prompt + "
                f"{s.completion_tokens:,} completion")


# ----------------------------------------------------------------------------- summary


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% confidence interval (normal approximation, mean +- 1.96 sd/sqrt(n))."""
    n = len(values)
    if not n:
        return {"mean": None, "ci95": None, "n": 0}
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return {"mean": round(mean, 4), "ci95": None if half is None else [round(mean - half, 4), round(mean + half, 4)],
            "n": n}


def summarize(answers: Sequence[Sequence[Answer]]) -> dict[str, dict[str, Any]]:
    """Per criterion (and `age`): mean and 95% interval over stories (each story's grades
    averaged over its repeats), and `judge_sd`, the judge's own spread: the square root of
    the mean variance of a story's repeated grades (None with one grading per story)."""
    out = {}
    for key in (*CRITERIA, "age"):
        per_story, within = [], []
        for story in answers:
            values = [v for a in story if (v := a.value(key)) is not None]
            if values:
                per_story.append(statistics.fmean(values))
            if len(values) > 1:
                within.append(statistics.variance(values))
        sd = round(math.sqrt(statistics.fmean(within)), 4) if within else None
        out[key] = {**interval(per_story), "judge_sd": sd}
    return out


def report(judge: Judge, stories: Sequence[Story], reference: Sequence[Story], repeats: int,
           settings: Mapping[str, Any]) -> dict[str, Any]:
    """Grade the model's stories and the reference (real endings); the `judge` section of
    eval.json: who judged, scores, reference, counts and every story's grades."""
    graded = judge.grade_all([*stories, *reference], repeats)
    mine, real = graded[: len(stories)], graded[len(stories):]
    info(judge.describe())
    if judge.stats.unparsed:
        warn(f"{judge.stats.unparsed} of {sum(len(g) for g in graded)} judge answers held no grades; "
             "eval.json's judge.stories say why")

    def records(group: Sequence[Story], answers: Sequence[Sequence[Answer]]) -> list[dict[str, Any]]:
        return [{"opening": s.opening, "sample": s.sample, "completion": s.completion,
                 "grades": [a.to_json() for a in a_list]} for s, a_list in zip(group, answers, strict=True)]

    return {
        "judge": {"model": judge.model, "url": judge.shown, "rubric": RUBRIC_VERSION,
                  "openings_version": OPENINGS_VERSION, "endpoint": judge.endpoint,
                  "format": judge.format if judge.endpoint == "chat" else "text",
                  "temperature": judge.temperature, "repeats": repeats, **settings},
        "scores": summarize(mine), "reference": summarize(real) if reference else {},
        "counts": {"stories": len(stories), "reference_stories": len(reference), **judge.stats.to_json()},
        "stories": records(stories, mine), "reference_stories": records(reference, real),
    }


def flat(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The means as eval.json metric keys: judge-grammar, ..., judge-age (those with a value)."""
    return {f"judge-{k}": v["mean"] for k, v in scores.items() if v.get("mean") is not None}
