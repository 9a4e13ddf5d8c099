"""Sampling: what a story is drawn with (`SamplingParams`), what a stream reports
(`GenerationStats`, `TextStream`), and what a model must offer to be sampled from
(`Backend`: encode, decode and new token ids; the backends are in `tinystory.backends`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory.errors import SettingsError, TinystoryError
from tinystory.settings import SAMPLING_KEYS
from tinystory.tokenizer import decode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tinystory.settings import Settings


class PromptError(TinystoryError):
    """A prompt that cannot be used (empty without allow_empty)."""


# Below this temperature sampling is greedy anyway, and logits / 1e-308 overflow to inf
# (NaN probabilities: a crash); vLLM switches to greedy below the same 1e-5.
GREEDY_BELOW = 1e-5
# A repetition penalty outside this range overflows seen tokens' logits to inf or wipes
# them out; 1.0-1.3 is the useful part.
PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. `greedy` (or a temperature below GREEDY_BELOW, such as 0)
    takes the likeliest one."""

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
        return not self.greedy and self.temperature >= GREEDY_BELOW

    def validate(self) -> SamplingParams:
        """Raise SettingsError naming the bad value; return self."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1", "e.g. --max-new-tokens 256"),
            (self.temperature >= 0, "temperature must be 0 or more", "e.g. --temperature 1.0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be 0 (off) or more", "e.g. --top-k 40"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", "e.g. --top-p 0.9 (1.0 = off)"),
            (PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1],
             f"repetition_penalty must be between {PENALTY_RANGE[0]:g} and {PENALTY_RANGE[1]:g}",
             "1.0 = off, e.g. 1.1"),
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
    """What a model must offer `Generator`. Subclass it; `backends.load_backend` picks one.

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
        return decode(self.tokenizer, ids)
