"""Generation: a loaded model that tells stories, whatever runs it.

`Generator.load(run)` picks a backend for what `run` names (`tinystory.backends`: the
transformers model of a run dir, checkpoint, int8 or bitsandbytes folder, or llama.cpp for a
`.gguf` file), and `Generator.stream(prompt, params)` yields decoded text pieces as tokens
come. Everything else (BOS, empty and over-long prompts, seeds, incremental UTF-8-safe
detokenization, timing) lives once, here, so `generate` and `serve` behave the same on
every backend.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from tinystory.backends import load_backend
from tinystory.console import warn
from tinystory.runs import Run
from tinystory.sampling import Backend, GenerationStats, PromptError, SamplingParams, TextStream

# Tokens of the prompt re-decoded with each new token, so that a piece gets its leading
# space (sentencepiece drops it at the start of a decode) and whole UTF-8 characters.
DETOK_CONTEXT = 5


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
        return cls(load_backend(Run.open(run), device=device, dtype=dtype, threads=threads, compile=compile))

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
            raise PromptError("the prompt is empty",
                              'type a beginning such as "Once upon a time", or pass --allow-empty')
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
