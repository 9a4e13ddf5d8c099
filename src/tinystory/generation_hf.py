"""The transformers backend of `Generator`: a token-by-token loop with a KV cache.

`HFBackend` runs any transformers causal LM (run dir, checkpoint, hub snapshot; the int8
model of `tinystory.quantization` too) in fp32/bf16/fp16 on CPU or CUDA, with
transformers' own logits processors so that greedy and seeded sampling give exactly the
tokens of `model.generate()`. Also here: the device, dtype and CPU-thread choices.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory.errors import RunError, SettingsError
from tinystory.generation import Backend, HFTokenizerMixin, SamplingParams, run_defaults, run_name

if TYPE_CHECKING:
    import torch
    from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """transformers' own processors, in the order `generate()` applies them (top-p: the
    same tokens as its TopPLogitsWarper, found without sorting the whole vocabulary)."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

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
        import torch

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
    import inspect

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
    import torch

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
                scores = procs(seen, scores)
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
                 path: Path | None = None, threads: int = 0, compile: bool = False) -> None:
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
        self.defaults = run_defaults(path) if path else {}
        self.compile = compile
        self._cache_kw = cache_kwarg(model)
        self._static: Any = None  # (StaticCache, its kwargs, compiled step), built on first use

    @classmethod
    def from_pretrained(cls, path: Path, device: str = "auto", dtype: str = "auto", threads: int = 0,
                        name: str | None = None, compile: bool | str | None = None) -> HFBackend:
        """Load a model folder (config.json + safetensors) and the tokenizer beside it.
        compile: see `pick_compile` (None/"auto": on CUDA only)."""
        import torch
        from transformers import AutoModelForCausalLM

        device = pick_device(device)
        compile = pick_compile(device, compile)
        dtype = pick_dtype(device, dtype)
        threads = set_threads(device, threads, path)
        tokenizer = find_tokenizer(path)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)).to(device)
        return cls(model, tokenizer, name or run_name(path), path, threads, compile)

    def token_ids(self, prompt_ids, params, seed, stop):  # type: ignore[no-untyped-def]
        prefill, step = self._static_steps() if self.compile else self._dynamic_steps()
        return decode_loop(prefill, step, prompt_ids, params, seed, self.eos_token_id, stop, self.device)

    def _dynamic_steps(self) -> tuple[Any, Any]:
        from transformers import DynamicCache

        kw = {self._cache_kw: DynamicCache(), "use_cache": True}
        prefill = lambda ids: self.model(input_ids=ids, logits_to_keep=1, **kw).logits  # noqa: E731
        step = lambda token, pos: self.model(input_ids=token, **kw).logits  # noqa: E731
        return prefill, step

    def _static_steps(self) -> tuple[Any, Any]:
        """Eager prefill (any prompt length) and one compiled, fixed-shape decode step
        into a StaticCache reused by every stream: compiled once per process."""
        import torch
        from transformers import StaticCache

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


# ------------------------------------------------------ device, dtype, threads, files


def pick_device(device: str) -> str:
    """`auto` -> cuda when present, else cpu; `cuda` without CUDA is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("generate.device is cuda but no CUDA GPU is visible", "use --device cpu (or auto)")
    if device not in ("cpu", "cuda"):
        raise SettingsError(f"unknown device {device!r}", "use auto, cpu or cuda")
    return device


def pick_compile(device: str, compile: bool | str | None) -> bool:
    """`generate.compile`: "auto"/None -> on CUDA (the fastest decoding measured there),
    off on a CPU (compiling takes longer than a story); "on"/"off" or a bool as given."""
    if compile is None or compile == "auto":
        return device == "cuda"
    if isinstance(compile, bool):
        return compile
    if compile not in ("on", "off"):
        raise SettingsError(f"unknown generate.compile {compile!r}", "use auto, on or off")
    return compile == "on"


def pick_dtype(device: str, dtype: str) -> str:
    """`auto`: bf16 on a CUDA GPU that has it, else fp16 there; fp32 on CPU (exact, and
    bf16 decoding is only faster on some CPUs: see benchmarks/bench_generate.py)."""
    import torch

    if dtype == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if dtype == "fp16" and device == "cpu":
        raise SettingsError("fp16 on CPU is about 100x slower than fp32", "use --dtype fp32 or bf16 on CPU")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise SettingsError(f"unknown dtype {dtype!r}", "use auto, fp32, bf16 or fp16")
    return dtype


# Measured on 2-core CPUs (benchmarks/bench_generate.py, docs/notes/generate.md): one
# thread decodes the small presets fastest, quiet machine or not. A second thread can help
# the 40M model, but on a busy machine (other processes on the cores) extra threads wait
# on each other and decoding collapses (40M: 19 tok/s with 1 thread, 1.2 with 2): so only
# the cores that are idle now are used.
ONE_THREAD_BELOW_PARAMS = 20_000_000
MAX_THREADS = 4


def default_threads(num_parameters: int) -> int:
    """Torch threads for decoding a model this big on this machine, now."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_parameters < ONE_THREAD_BELOW_PARAMS or cores == 1:
        return 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(MAX_THREADS, cores - int(busy + 0.5)))


def set_threads(device: str, threads: int, path: Path | None = None, num_parameters: int | None = None) -> int:
    """Set torch's CPU threads for decoding (0 = `default_threads`) and return the number."""
    import torch

    if device != "cpu":
        return torch.get_num_threads()
    if threads <= 0:
        threads = default_threads(num_parameters if num_parameters is not None else _params_from_config(path))
    torch.set_num_threads(threads)
    return threads


def _params_from_config(path: Path | None) -> int:
    if path is None or not (path / "config.json").is_file():
        return 0
    from transformers import AutoConfig

    from tinystory.model import count_parameters

    try:
        return count_parameters(AutoConfig.from_pretrained(str(path)))
    except Exception:  # an architecture count_parameters does not know: treat as big
        return ONE_THREAD_BELOW_PARAMS


# Loggers that speak while transformers loads a model: torchao (imported by transformers'
# quantizers when installed) warns about CUDA kernels it cannot load on a CPU machine.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_load(load: Any) -> Any:
    """Run `load()` without transformers' loading bars or import chatter on stderr
    (stderr is for our own lines; TINYSTORY_DEBUG=1 keeps everything)."""
    import logging

    from transformers.utils import logging as hf_logging

    if os.environ.get("TINYSTORY_DEBUG", "").strip() not in ("", "0"):
        return load()
    bars = hf_logging.is_progress_bar_enabled()
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    hf_logging.disable_progress_bar()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return load()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def find_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, or of the run dir above a checkpoint."""
    from transformers import AutoTokenizer

    for folder in (path, path.parent, path.parent.parent):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
    raise RunError(f"no tokenizer for {path} (tokenizer.json is missing)", "pass the run dir, which holds the tokenizer")
