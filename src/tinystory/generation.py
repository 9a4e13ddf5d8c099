"""Generation: sampling parameters, streaming detokenization and the model backends.

`Generator.load(run)` picks a backend for what `run` names (a run dir or checkpoint: the
transformers model here; an int8 folder or a `.gguf` file: `tinystory.quantization`),
and `Generator.stream(prompt, params)` yields decoded text pieces as tokens come.

A backend is a small class (`Backend`): it encodes and decodes text and turns prompt token
ids into new token ids (the transformers one is `tinystory.generation_hf.HFBackend`).
Everything else (BOS, empty and over-long prompts, seeds, incremental UTF-8-safe
detokenization, timing) lives once, in `Generator`, so `generate` and `serve` behave the
same on every backend.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory.errors import RunError, SettingsError, TinystoryError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tinystory.settings import Settings

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")
# Tokens of the prompt re-decoded with each new token, so that a piece gets its leading
# space (sentencepiece drops it at the start of a decode) and whole UTF-8 characters.
DETOK_CONTEXT = 5


class PromptError(TinystoryError):
    """A prompt that cannot be used (empty without allow_empty)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. `greedy` (or temperature 0) takes the likeliest one."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    greedy: bool = False
    seed: int | None = None  # None = a fresh random seed, reported in the stats
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens (benchmarks)

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random (not greedy)."""
        return not self.greedy and self.temperature > 0

    def validate(self) -> SamplingParams:
        """Raise SettingsError naming the bad value; return self."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1", "e.g. --max-new-tokens 256"),
            (self.temperature >= 0, "temperature must be 0 or more", "e.g. --temperature 1.0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be 0 (off) or more", "e.g. --top-k 40"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", "e.g. --top-p 0.9 (1.0 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be above 0", "1.0 = off, e.g. 1.1"),
            (self.min_new_tokens >= 0, "min_new_tokens must be 0 or more", "e.g. 0"),
        ]
        for ok, message, hint in checks:
            if not ok:
                raise SettingsError(message, hint)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON Lines records, logs)."""
        return asdict(self)

    def describe(self) -> str:
        """One line for stderr: what the sampler does."""
        if not self.sampling:
            how = "greedy"
        else:
            top_k = f"top-k {self.top_k}" if self.top_k else "top-k off"
            seed = "random" if self.seed is None else self.seed
            how = f"temperature {self.temperature:g}, top-p {self.top_p:g}, {top_k}, seed {seed}"
        rep = f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else ""
        return f"{how}{rep}, up to {self.max_new_tokens} new tokens"

    @classmethod
    def from_settings(
        cls, settings: Settings, run_defaults: Mapping[str, Any] | None = None, **override: Any
    ) -> SamplingParams:
        """Params from `settings.generate`, the run's generation_config.json defaults below
        what the user set (config file, environment, flags) but above field defaults and
        the hardware profile. `override` (greedy=..., seed=...) wins over both."""
        values: dict[str, Any] = {}
        for key in SAMPLING_KEYS:
            source = settings.source(f"generate.{key}")
            user_set = source != "default" and not source.startswith("profile:")
            run_value = (run_defaults or {}).get(key)
            values[key] = run_value if run_value is not None and not user_set else settings.get(f"generate.{key}")
        values["seed"] = settings.generate.seed
        values.update({k: v for k, v in override.items() if v is not None})
        return cls(**values).validate()


@dataclass
class GenerationStats:
    """What one `stream` did; filled in while it runs."""

    prompt_tokens: int = 0
    prompt_cut: int = 0  # tokens dropped from the left of an over-long prompt
    tokens: int = 0  # new tokens (EOS included when it ended the story)
    seconds: float = 0.0
    first_token_s: float = 0.0  # time to the first new token (the prompt's prefill included)
    finish_reason: str = ""  # eos | length (max_new_tokens or the context) | stop
    seed: int | None = None  # the seed actually used (drawn when params.seed is None)
    token_ids: list[int] = field(default_factory=list)

    @property
    def finished_by_eos(self) -> bool:
        return self.finish_reason == "eos"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One line for stderr."""
        return (f"{self.tokens} tokens in {self.seconds:.2f} s, {self.tokens_per_s:.1f} tok/s, "
                f"first token {self.first_token_s * 1000:.0f} ms, ended by {self.finish_reason or 'nothing'}")


class TextStream:
    """An iterator of text pieces; `stats` fills in as it runs. `close()` stops it."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats) -> None:
        self._pieces = pieces
        self.stats = stats

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- backends


class Backend:
    """What a model must offer `Generator`. Subclass it; `_load_backend` picks one.

    token_ids(prompt_ids, params, seed, stop) yields new token ids one at a time, EOS
    included when the model ends the story, and at most params.max_new_tokens of them.
    """

    name: str = ""
    path: Path | None = None
    num_parameters: int = 0
    size_bytes: int = 0  # bytes of the weights as loaded
    context_length: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    defaults: Mapping[str, Any] = {}  # the run's sampling defaults (generation_config.json)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped, bad UTF-8 as U+FFFD."""
        raise NotImplementedError

    def token_ids(
        self, prompt_ids: list[int], params: SamplingParams, seed: int, stop: threading.Event | None
    ) -> Iterator[int]:
        raise NotImplementedError


class HFTokenizerMixin:
    """encode/decode through a transformers tokenizer (shared with quantized HF models)."""

    tokenizer: PreTrainedTokenizerBase

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def run_defaults(path: Path | None) -> dict[str, Any]:
    """Sampling defaults from the run's generation_config.json (keys it actually sets)."""
    f = None if path is None else (path if path.is_dir() else path.parent) / "generation_config.json"
    if f is None or not f.is_file():
        return {}
    data = json.loads(f.read_text(encoding="utf-8"))
    return {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}


def run_name(path: Path) -> str:
    """A readable name: the run dir's name, `run/checkpoint-N`, or a hub snapshot's repo id."""
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    hub = [p for p in path.parts if p.startswith("models--")]  # models--user--name/snapshots/<sha>
    if hub:
        return hub[0].removeprefix("models--").replace("--", "/")
    return path.name


def _load_backend(path: Path, device: str = "auto", dtype: str = "auto", threads: int = 0,
                  compile: bool | str | None = None) -> Backend:
    """The registration point: pick the backend class for a resolved local path.

    `.gguf` files and folders with `quantization.json` belong to `tinystory.quantization`
    (imported only then): its `load_backend(path, device=, dtype=, threads=)` returns a
    `Backend`. Until it has one, a quantized folder that its `load_quantized(path)` reads
    as a transformers-style (model, tokenizer) runs on `HFBackend`. Everything else is a
    transformers model folder.
    """
    if path.suffix == ".gguf" or (path.is_dir() and (path / "quantization.json").is_file()):
        try:
            from tinystory import quantization
        except ImportError as e:
            raise RunError(f"cannot load {path}: {e}", "install tinystory-llm with its quantization support") from None
        loader = getattr(quantization, "load_backend", None)
        if loader is not None:
            return loader(path, device=device, dtype=dtype, threads=threads)  # compile: HF models only
        if path.is_dir() and hasattr(quantization, "load_quantized"):
            return _quantized_hf(path, quantization.load_quantized, threads)
        raise RunError(f"cannot load {path}: this tinystory has no loader for it", "pass the unquantized run dir")
    from tinystory.generation_hf import HFBackend

    return HFBackend.from_pretrained(path, device=device, dtype=dtype, threads=threads, compile=compile)


def _quantized_hf(path: Path, load_quantized: Any, threads: int) -> Backend:
    """A quantized transformers-style model on HFBackend, sized from its files and config."""
    from tinystory.generation_hf import HFBackend, quiet_load, set_threads
    from tinystory.model import count_parameters

    model, tok = quiet_load(lambda: load_quantized(path))
    n = count_parameters(model.config)
    backend = HFBackend(model, tok, run_name(path), path, set_threads(model.device.type, threads, num_parameters=n))
    backend.num_parameters = n
    backend.size_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    backend.dtype = str(json.loads((path / "quantization.json").read_text(encoding="utf-8")).get("method", "int8"))
    return backend


# --------------------------------------------------------------------------- generator


class Generator:
    """A loaded model that tells stories. Backend-agnostic; not for concurrent streams
    (serve queues requests): `last_stats` belongs to the latest one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.last_stats: GenerationStats | None = None

    @classmethod
    def load(cls, run: str | Path | None = None, device: str = "auto", dtype: str = "auto",
             threads: int = 0, compile: bool | str | None = None) -> Generator:
        """Load a run dir, checkpoint, int8 folder, .gguf file, hub id, or (None) the latest run.

        compile: a compiled decode step with a static cache (transformers models only, see
        HFBackend); None or "auto" = on CUDA, off on a CPU; "on"/"off" or a bool force it."""
        from tinystory.runs import resolve_run

        return cls(_load_backend(resolve_run(run), device=device, dtype=dtype, threads=threads, compile=compile))

    # What serve shows and the CLI logs, whatever the backend.
    name = property(lambda self: self.backend.name)
    num_parameters = property(lambda self: self.backend.num_parameters)
    size_bytes = property(lambda self: self.backend.size_bytes)
    context_length = property(lambda self: self.backend.context_length)
    device = property(lambda self: self.backend.device)
    dtype = property(lambda self: self.backend.dtype)
    threads = property(lambda self: self.backend.threads)
    defaults = property(lambda self: dict(self.backend.defaults))

    def describe(self) -> str:
        """One line for stderr: which model, how big, where it runs."""
        where = f"{self.device} {self.dtype}" + (f", {self.threads} thread{'s' * (self.threads != 1)}"
                                                 if self.device == "cpu" and self.threads else "")
        return (f"{self.name}: {self.num_parameters / 1e6:.2f}M parameters, "
                f"{self.size_bytes / 2**20:.1f} MiB, {where}")

    def prompt_ids(self, prompt: str, allow_empty: bool = False) -> tuple[list[int], int]:
        """BOS + the stripped prompt's tokens, cut from the left to leave room for one
        new token in the context; returns (ids, tokens cut)."""
        text = prompt.strip()
        if not text and not allow_empty:
            raise PromptError("the prompt is empty", 'type a beginning such as "Once upon a time", or pass --allow-empty')
        bos = [] if self.backend.bos_token_id is None else [self.backend.bos_token_id]
        body = self.backend.encode(text)
        room = self.context_length - len(bos) - 1
        cut = max(0, len(body) - room)
        return bos + body[cut:], cut

    def stream(self, prompt: str, params: SamplingParams, *, allow_empty: bool = False,
               stop: threading.Event | None = None) -> TextStream:
        """Yield the continuation of `prompt` as decoded text pieces, as tokens come.

        Stops at EOS, after params.max_new_tokens (or when the context is full), or when
        `stop` is set. Errors in the prompt or params raise here, before the first piece.
        """
        params.validate()
        ids, cut = self.prompt_ids(prompt, allow_empty)
        if cut:
            from tinystory.console import warn

            warn(f"the prompt is longer than the model's context ({self.context_length} tokens): "
                 f"its first {cut} tokens were cut")
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        room = self.context_length - len(ids)
        params = replace(params, seed=seed, max_new_tokens=min(params.max_new_tokens, room))
        stats = GenerationStats(prompt_tokens=len(ids), prompt_cut=cut, seed=seed)
        self.last_stats = stats
        return TextStream(self._pieces(ids, params, stop, stats), stats)

    def generate(self, prompt: str, params: SamplingParams, *, allow_empty: bool = False,
                 stop: threading.Event | None = None) -> str:
        """The whole continuation as one string (`"".join(stream(...))`)."""
        return "".join(self.stream(prompt, params, allow_empty=allow_empty, stop=stop))

    def _pieces(self, ids: list[int], params: SamplingParams, stop: threading.Event | None,
                stats: GenerationStats) -> Iterator[str]:
        """Incremental detokenization (as vLLM does it): re-decode a short window and emit
        the new text only once it does not end in a partial UTF-8 character."""
        eos = self.backend.eos_token_id
        all_ids = list(ids)
        prefix, read = max(0, len(ids) - DETOK_CONTEXT), len(ids)
        start = time.perf_counter()
        stats.finish_reason = "length"
        try:
            for token in self.backend.token_ids(ids, params, params.seed or 0, stop):
                if stats.tokens == 0:
                    stats.first_token_s = time.perf_counter() - start
                stats.tokens += 1
                stats.token_ids.append(token)
                stats.seconds = time.perf_counter() - start
                if token == eos:
                    stats.finish_reason = "eos"
                    break
                all_ids.append(token)
                before = self.backend.decode(all_ids[prefix:read])
                after = self.backend.decode(all_ids[prefix:])
                if len(after) > len(before) and not after.endswith("\ufffd"):
                    yield after[len(before):]
                    prefix, read = read, len(all_ids)
                if stop is not None and stop.is_set():
                    stats.finish_reason = "stop"
                    break
            # flush what a cut-off multi-byte character left behind
            tail = self.backend.decode(all_ids[prefix:])[len(self.backend.decode(all_ids[prefix:read])):]
            if tail:
                yield tail
        finally:
            stats.seconds = time.perf_counter() - start


def records(gen: Generator, prompts: list[str], params: SamplingParams, num_samples: int = 1,
            allow_empty: bool = False) -> Iterator[dict[str, Any]]:
    """One JSON-ready record per story (`--prompts-file`): prompt, story (the prompt and its
    continuation, as `generate` prints it), settings (seed + i for sample i), tokens."""
    for prompt in prompts:
        for i in range(num_samples):
            p = params if params.seed is None else replace(params, seed=params.seed + i)
            stream = gen.stream(prompt, p, allow_empty=allow_empty)
            story = prompt.strip() + "".join(stream)
            st = stream.stats
            settings = {**replace(p, seed=st.seed if p.sampling else p.seed).to_dict(),
                        "model": gen.name, "device": gen.device, "dtype": gen.dtype}
            yield {"prompt": prompt, "story": story, "settings": settings, "tokens": st.tokens,
                   "finish_reason": st.finish_reason, "tokens_per_s": round(st.tokens_per_s, 1)}
