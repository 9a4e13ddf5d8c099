"""Opening a model, and the one place that decides where it runs.

`load_model(run)` opens any `Run` that holds a transformers-style model: a run dir, a
checkpoint, a hub snapshot (fp32/bf16/fp16), an `int8` folder (CPU) or a bitsandbytes
folder (CUDA). `load_gguf` opens a `.gguf` file in llama.cpp. `pick_device`, `pick_dtype`,
`pick_compile` and `set_threads` are the choices every command shares (train, eval,
generate, quantize, serve), and `device_name` is how run.json and the quantize manifest
name the hardware.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tinystory.errors import QuantizationError, RunError, SettingsError
from tinystory.int8 import load_int8
from tinystory.model import count_parameters
from tinystory.runs import Run, read_json
from tinystory.tokenizer import load_tokenizer

T = TypeVar("T")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("int8", "bnb-int8", "bnb-nf4", "gguf-f32", "gguf-f16", "gguf-q8_0")  # quantization methods
GGUF_HINT = "pip install 'tinystory-llm[gguf]' (builds llama-cpp-python, a few minutes)"


# ------------------------------------------------------------------------- device


DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """An Apple GPU that this torch can use (Metal Performance Shaders: Apple Silicon, a
    torch built with MPS, and a macOS it supports)."""
    return torch.backends.mps.is_built() and torch.backends.mps.is_available()


def device_choice(asked: str = "auto") -> tuple[str, str]:
    """(device, why) for every command: `auto` takes CUDA, then an Apple GPU (MPS), then the
    CPU; a device asked for that is not here is a one-line SettingsError."""
    if asked not in DEVICES:
        raise SettingsError(f"unknown device {asked!r}", f"use one of: {', '.join(DEVICES)}")
    if asked == "auto":
        if torch.cuda.is_available():
            return "cuda", f"auto: a CUDA GPU ({torch.cuda.get_device_name(0)}) is here"
        if mps_available():
            return "mps", "auto: no CUDA GPU, and an Apple GPU (MPS) is here"
        return "cpu", "auto: no CUDA GPU and no Apple GPU (MPS) here"
    if asked == "cuda" and not torch.cuda.is_available():
        raise SettingsError("the device is cuda but no CUDA GPU is visible", "use --device auto (or cpu)")
    if asked == "mps" and not mps_available():
        why = ("this torch was built without MPS" if not torch.backends.mps.is_built()
               else "this machine has no Apple GPU or its macOS is too old for this torch")
        raise SettingsError(f"the device is mps but {why}", "use --device auto (or cpu)")
    return asked, f"asked for {asked}"


def pick_device(asked: str = "auto") -> str:
    """The device of `device_choice` (without the why)."""
    return device_choice(asked)[0]


def mps_bf16() -> bool:
    """Whether bf16 runs on this Apple GPU: macOS 14 or newer (what accelerate checks too;
    earlier macOS versions fail with "BFloat16 is not supported on MPS")."""
    return mps_available() and torch.backends.mps.is_macos_or_newer(14, 0)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; on a Mac the chip's, e.g. "Apple M2"), else
    what `platform` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
            if name:
                return name
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's (on a Mac: the chip that holds the GPU too)."""
    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()


def device_name(device: str) -> str:
    """`cuda: <GPU name>`, `mps: <chip>` or `cpu: <model name> (N threads)`, for run.json."""
    if device in ("cuda", "mps"):
        return f"{device}: {hardware(device)}"
    return f"cpu: {hardware(device)} ({torch.get_num_threads()} threads)"


def pick_dtype(device: str, asked: str = "auto") -> str:
    """`auto`: bf16 on a CUDA GPU that has it, else fp16 there; fp32 on an Apple GPU (MPS)
    and on a CPU: exact, and the safe choice where we have measured nothing (on a CPU bf16
    decoding is only faster on some chips: see benchmarks/bench_generate.py; on MPS fp16
    is there, and bf16 from macOS 14, when asked for)."""
    if asked == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if asked == "fp16" and device == "cpu":
        raise SettingsError("fp16 on CPU is about 100x slower than fp32", "use --dtype fp32 or bf16 on CPU")
    if asked == "bf16" and device == "mps" and not mps_bf16():
        raise SettingsError("bf16 on an Apple GPU needs macOS 14 or newer", "use --dtype fp16 or fp32")
    if asked not in DTYPES:
        raise SettingsError(f"unknown dtype {asked!r}", "use auto, fp32, bf16 or fp16")
    return asked


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


def set_threads(device: str, threads: int, num_parameters: int) -> int:
    """Set torch's CPU threads for decoding (0 = `default_threads`) and return the number."""
    if device != "cpu":
        return torch.get_num_threads()
    if threads <= 0:
        threads = default_threads(num_parameters)
    torch.set_num_threads(threads)
    return threads


def parameters_of(path: Path) -> int:
    """Parameters of the model folder's config (without loading the weights); an
    architecture `count_parameters` does not know counts as big."""
    if not (path / "config.json").is_file():
        return 0
    try:
        return count_parameters(AutoConfig.from_pretrained(str(path)))
    except Exception:
        return ONE_THREAD_BELOW_PARAMS


def check_method(method: str, cuda: bool | None = None) -> None:
    """Raise a one-line QuantizationError for an unknown quantization method or one this
    machine cannot run (bitsandbytes: CUDA; int8: a torch build with int8 kernels)."""
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(METHODS)}"
        raise QuantizationError(f"unknown quantization method {method!r}", hint)
    if method.startswith("bnb-") and not (torch.cuda.is_available() if cuda is None else cuda):
        raise QuantizationError(f"{method} needs a CUDA GPU (bitsandbytes quantizes on CUDA), none is here",
                                "on this CPU use --method int8, or gguf-q8_0 for llama.cpp")
    if method == "int8" and not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm",
                                                                                              "qnnpack")):
        raise QuantizationError("this torch build has no int8 kernels (quantized engine)",
                                "use --method gguf-q8_0 for llama.cpp")


# ------------------------------------------------------------------------ loading

# Loggers that speak while transformers loads a model: torchao (imported by transformers'
# quantizers when installed) warns about CUDA kernels it cannot load on a CPU machine.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_load(load: Callable[[], T]) -> T:
    """Run `load()` without transformers' loading bars or import chatter on stderr
    (stderr is for our own lines; TINYSTORY_DEBUG=1 keeps everything)."""
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


def refuse_remote_code(folder: Path) -> None:
    """Refuse a model or tokenizer folder whose config asks for code of its own (`auto_map`):
    tinystory never runs it (transformers would ignore it without trust_remote_code, and
    would then load something other than what the folder describes)."""
    for name in ("config.json", "tokenizer_config.json"):
        if "auto_map" in read_json(folder / name):
            raise RunError(f"{folder / name} asks for remote code (auto_map), which tinystory never runs",
                           "use a model that tinystory or plain transformers wrote")


def find_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, or of the run dir above a checkpoint."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            refuse_remote_code(folder)
            return AutoTokenizer.from_pretrained(str(folder))
    raise RunError(f"no tokenizer for {path} (tokenizer.json is missing)",
                   "pass the run dir, which holds the tokenizer")


def load_model(run: Run, device: str = "auto", dtype: str = "fp32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a run, in eval mode: the one seam for model formats.

    A run dir, checkpoint or hub snapshot loads with transformers in `dtype` on `device`
    (`pick_device`). A quantized folder loads on the device its method needs (int8: CPU,
    bitsandbytes: CUDA): callers take the device from `model.device`. Every model here
    gives `model(input_ids).logits` (B, T, V) and a transformers `.generate(...)`.
    """
    if run.is_gguf:
        raise RunError(f"{run.path.name} is a GGUF file, which only llama.cpp runs",
                       "pass the run dir (or an int8 folder) instead; quantize reports the GGUF's bpb")
    refuse_remote_code(run.path)
    try:
        return _load(run, device, dtype)
    except SafetensorError as e:  # a truncated or garbled weights file
        raise RunError(f"the weights in {run.path} cannot be read ({str(e).strip()[:120]})",
                       "the file is damaged: train or quantize again, or restore it") from None


def _load(run: Run, device: str, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if run.is_quantized:
        method = run.manifest.get("method", "int8")
        if method == "int8":
            model, tokenizer = load_int8(run.path)
            return model.eval(), tokenizer
        if method.startswith("bnb-"):
            check_method(method)
            model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(run.path, device_map={"": 0}))
            return model.eval(), load_tokenizer(run.path)
        raise QuantizationError(f"{run.path} holds a {method} model, not a folder model", "pass the .gguf file")
    where = pick_device(device)
    torch_dtype = DTYPES[pick_dtype(where, dtype)]
    model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(str(run.path), dtype=torch_dtype))
    model = model.to(where)  # type: ignore[arg-type]  # transformers types .to() through a wrapper
    return model.eval(), find_tokenizer(run.path)


def llama_cpp_available() -> bool:
    """Is llama-cpp-python (the `gguf` extra) importable?"""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except ValueError:  # blocked in sys.modules (tests)
        return False


def load_gguf(path: str | Path, n_ctx: int = 512, threads: int = 0, logits_all: bool = False) -> Any:
    """A `llama_cpp.Llama` for a .gguf file (threads 0 = llama.cpp's choice), quiet."""
    try:
        import llama_cpp  # the optional `gguf` extra: imported only where a .gguf runs
    except ImportError:
        raise QuantizationError("running a .gguf needs llama-cpp-python, which is not installed",
                                GGUF_HINT) from None
    if not Path(path).is_file():
        raise QuantizationError(f"{path} does not exist", "run `tinystory quantize RUN --method gguf-q8_0`")
    kwargs: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads} if threads > 0 else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, **kwargs)
