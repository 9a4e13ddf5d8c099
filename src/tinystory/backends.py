"""The backends of `Generator`: how a loaded model turns prompt ids into new token ids.

- `HFBackend`: any transformers causal LM (run dir, checkpoint, hub snapshot, and the
  int8 and bitsandbytes folders of `quantize`) in fp32/bf16/fp16 on CPU or CUDA, a
  token-by-token loop with a KV cache and transformers' own logits processors, so greedy
  and seeded sampling give exactly the tokens of `model.generate()`.
- `GGUFBackend`: a `.gguf` file in llama.cpp (llama-cpp-python, the `gguf` extra).

`load_backend(run)` picks one for what a `Run` holds.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from tinystory.loading import (
    load_gguf,
    load_model,
    parameters_of,
    pick_compile,
    pick_device,
    pick_dtype,
    quiet_load,
    set_threads,
)
from tinystory.model import count_parameters
from tinystory.runs import Run
from tinystory.sampling import Backend, HFTokenizerMixin, SamplingParams


def load_backend(run: Run, device: str = "auto", dtype: str = "auto", threads: int = 0,
                 compile: bool | str | None = None) -> Backend:
    """The backend for what `run` holds: a .gguf file runs in llama.cpp; a quantized folder
    (int8 on CPU, bitsandbytes on CUDA) and every transformers model folder on `HFBackend`
    (compile: transformers models only)."""
    if run.is_gguf:
        return GGUFBackend(run.path, threads)
    if run.is_quantized:
        return quantized_backend(run, threads)
    return HFBackend.from_run(run, device=device, dtype=dtype, threads=threads, compile=compile)


def quantized_backend(run: Run, threads: int) -> HFBackend:
    """A quantized folder on HFBackend, sized from its files and config."""
    model, tokenizer = quiet_load(lambda: load_model(run))
    n = count_parameters(model.config)
    backend = HFBackend(model, tokenizer, run.name, run.path, set_threads(model.device.type, threads, n),
                        defaults=run.generation_defaults)
    backend.num_parameters = n
    backend.size_bytes = sum(f.stat().st_size for f in run.path.glob("*.safetensors"))
    backend.dtype = run.weights
    return backend


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """transformers' own processors, in the order `generate()` applies them (top-p: the
    same tokens as its TopPLogitsWarper, found without sorting the whole vocabulary)."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.sampling:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(TopP(params.top_p))
    return procs


class TopP:
    """Nucleus filtering that keeps exactly the tokens transformers' TopPLogitsWarper keeps
    (those whose likelier tokens hold less than `top_p` of the mass), looking first in the
    64 likeliest, where a trained model's nucleus almost always lies. transformers sorts all
    logits: 5.5 ms for a 32k vocab on our CPUs, a tenth of a 40M decoding step; topk(64)
    takes 0.1 ms."""

    def __init__(self, top_p: float, first_k: int = 64) -> None:
        self.top_p, self.first_k = top_p, first_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, V)
        vocab = scores.shape[-1]
        log_z = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, 1)
        for k in (min(self.first_k, vocab), vocab):  # a flat distribution (untrained model): all
            top, idx = torch.topk(scores, k, dim=-1)  # (B, k), likeliest first
            probs = (top - log_z).exp()  # (B, k)
            above = probs.cumsum(dim=-1)  # (B, k): mass of this token and the likelier ones
            if bool((above[:, -1] >= self.top_p).all()):
                break
        keep = (above - probs) < self.top_p  # (B, k): the likelier tokens hold less than top_p
        keep[:, 0] = True
        mask = torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, ~keep)  # (B, V): True = drop
        return scores.masked_fill(mask, -float("inf"))


def cache_kwarg(model: Any) -> str:
    """`cache` (transformers >= 5.24) or `past_key_values` (older): the forward's keyword."""
    forward = getattr(model, "forward", model)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def decode_loop(
    prefill: Any, step: Any, prompt_ids: list[int], params: SamplingParams, seed: int, eos: int | None,
    stop: threading.Event | None, device: str = "cpu",
) -> Iterator[int]:
    """Token-by-token decoding for any model that keeps its own KV cache.

    prefill(ids (1, T)) -> logits (1, 1, V) of the last prompt position;
    step(token (1, 1), position) -> logits (1, 1, V) of that token.
    Greedy and repetition penalty match `model.generate(do_sample=False)`; sampling
    draws from a `torch.Generator` seeded with `seed` (the same draws as `generate()`
    after `torch.manual_seed(seed)`).
    """
    procs = logits_processors(params)
    gen = torch.Generator(device=device).manual_seed(seed) if params.sampling else None
    seen = torch.tensor([prompt_ids], device=device)  # (1, T): what the repetition penalty sees
    with torch.inference_mode():
        logits = prefill(seen)  # (1, 1, V)
        for i in range(params.max_new_tokens):
            # a copy: a CUDA-graph step reuses its output buffer on the next call
            scores = logits[:, -1, :].to(torch.float32, copy=True)  # (1, V)
            if eos is not None and i < params.min_new_tokens:
                scores[:, eos] = -float("inf")
            if procs:
                scores = procs(cast(torch.LongTensor, seen), scores)
            if gen is None:
                nxt = scores.argmax(dim=-1, keepdim=True)  # (1, 1)
            else:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)  # (1, 1)
            token = int(nxt)
            yield token
            if token == eos or i + 1 == params.max_new_tokens or (stop is not None and stop.is_set()):
                return
            if procs:
                seen = torch.cat([seen, nxt], dim=1)  # (1, T + i + 1)
            logits = step(nxt, len(prompt_ids) + i)  # (1, 1, V)


class HFBackend(HFTokenizerMixin, Backend):
    """A transformers causal LM (run dir, checkpoint, hub snapshot) in fp32/bf16/fp16.

    compile=False: a DynamicCache and eager steps, the fastest for one story on a CPU.
    compile=True: a StaticCache as long as the context and a `torch.compile`d decode step
    (CUDA graphs on CUDA). `from_pretrained` turns it on for CUDA: on an H100 the 40M model
    decoded 69-111 tok/s eagerly (each step waits on Python and kernel launches) and
    4-6x that compiled (benchmarks/bench_gpu.py, docs/notes/gpu.md).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 path: Path | None = None, threads: int = 0, compile: bool = False,
                 defaults: Mapping[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        params = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights once
        self.num_parameters = sum(p.numel() for p in params)
        self.size_bytes = sum(p.numel() * p.element_size() for p in params)
        self.context_length = int(model.config.max_position_embeddings)
        self.device = model.device.type
        self.dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
            str(model.dtype).removeprefix("torch."), str(model.dtype))
        self.threads = threads
        self.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        self.defaults = dict(defaults or {})
        self.compile = compile
        self._cache_kw = cache_kwarg(model)
        self._static: Any = None  # (StaticCache, its kwargs, compiled step), built on first use

    @classmethod
    def from_run(cls, run: Run, device: str = "auto", dtype: str = "auto", threads: int = 0,
                 compile: bool | str | None = None) -> HFBackend:
        """A run dir, checkpoint or hub snapshot (config.json + safetensors) and the tokenizer
        beside it; compile: see `loading.pick_compile` (None/"auto": on CUDA only)."""
        device = pick_device(device)
        model, tokenizer = load_model(run, device, pick_dtype(device, dtype))
        threads = set_threads(device, threads, parameters_of(run.path))
        return cls(model, tokenizer, run.name, run.path, threads, pick_compile(device, compile),
                   run.generation_defaults)

    def token_ids(self, prompt_ids, params, seed, stop):
        prefill, step = self._static_steps() if self.compile else self._dynamic_steps()
        return decode_loop(prefill, step, prompt_ids, params, seed, self.eos_token_id, stop, self.device)

    def _dynamic_steps(self) -> tuple[Any, Any]:
        kw = {self._cache_kw: DynamicCache(), "use_cache": True}
        prefill = lambda ids: self.model(input_ids=ids, logits_to_keep=1, **kw).logits  # noqa: E731
        step = lambda token, pos: self.model(input_ids=token, **kw).logits  # noqa: E731
        return prefill, step

    def _static_steps(self) -> tuple[Any, Any]:
        """Eager prefill (any prompt length) and one compiled, fixed-shape decode step
        into a StaticCache reused by every stream: compiled once per process."""
        if self._static is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.context_length)
            kw = {self._cache_kw: cache, "use_cache": True}

            def one(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (1, 1), (1,) -> (1, 1, V)
                return self.model(input_ids=token, position_ids=pos[None], cache_position=pos, **kw).logits

            mode = "reduce-overhead" if self.device == "cuda" else "default"
            self._static = (cache, kw, torch.compile(one, mode=mode, fullgraph=True, dynamic=False))
        cache, kw, compiled = self._static
        dev = self.device

        def prefill(ids: torch.Tensor) -> torch.Tensor:  # (1, T) -> (1, 1, V)
            cache.reset()  # here, inside inference_mode, where its tensors were made
            pos = torch.arange(ids.shape[1], device=dev)
            return self.model(input_ids=ids, cache_position=pos, logits_to_keep=1, **kw).logits

        return prefill, lambda token, pos: compiled(token, torch.tensor([pos], device=dev))


class GGUFBackend(Backend):
    """llama.cpp decoding of a GGUF written by `gguf_export` (tokenizer inside the file)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.llm = load_gguf(path, n_ctx=0, threads=threads)
        self.path, self.name = path, path.name
        self.size_bytes = path.stat().st_size
        self.context_length = self.llm.n_ctx()
        manifest = path.with_suffix(".json")  # written by `quantize`; absent for a bare .gguf
        meta = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
        self.num_parameters = int(meta.get("parameters", 0) or 0)
        self.dtype, self.threads = path.stem.rsplit("-", 1)[-1], threads
        self.bos_token_id, self.eos_token_id = self.llm.token_bos(), self.llm.token_eos()
        self.defaults = {}

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def decode(self, ids: list[int]) -> str:
        specials = {self.bos_token_id, self.eos_token_id}
        return self.llm.detokenize([i for i in ids if i not in specials]).decode("utf-8", errors="replace")

    def token_ids(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                  stop: threading.Event | None) -> Iterator[int]:
        self.llm.set_seed(seed)
        sampling = dict(temp=0.0, top_k=1) if not params.sampling else dict(
            temp=params.temperature, top_k=params.top_k or 0, top_p=params.top_p)
        tokens = self.llm.generate(prompt_ids, reset=True, repeat_penalty=params.repetition_penalty, **sampling)
        for n, tok in enumerate(tokens, 1):
            yield tok
            if tok == self.eos_token_id or n >= params.max_new_tokens or (stop is not None and stop.is_set()):
                return
