"""Quantize a run: int8 for CPU (torch.ao dynamic int8 Linear), bitsandbytes int8/nf4 for
CUDA, GGUF f32/f16/q8_0 for llama.cpp; load the results again; compare them with the
unquantized model (file size, validation bits per byte, tokens/s, greedy agreement).

Each method is a well-kept library's own path:

- `int8`: `torch.ao.quantization.quantize_dynamic` with per-channel int8 weights and
  dynamic int8 activations (fbgemm/x86 kernels), measured the fastest int8 path on our
  CPUs (see docs/notes/quantize.md). Saved as `model-int8.safetensors` (int8 weights +
  per-row scales, norms in fp32; no pickle) + config + tokenizer; `load_int8` rebuilds
  the same modules. Plain `from_pretrained` cannot read it (transformers has no loader for
  torch.ao dynamic modules).
- `bnb-int8` / `bnb-nf4`: transformers' `BitsAndBytesConfig`, saved with `save_pretrained`
  (loads again with plain `from_pretrained`, on CUDA).
- `gguf-*`: `tinystory.gguf_export` (the `gguf` package), run with llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tinystory.errors import QuantizationError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tinystory.settings import Settings

METHODS = ("int8", "bnb-int8", "bnb-nf4", "gguf-f32", "gguf-f16", "gguf-q8_0")
MANIFEST = "quantization.json"
INT8_WEIGHTS = "model-int8.safetensors"
GGUF_HINT = "pip install 'tinystory-llm[gguf]' (builds llama-cpp-python, a few minutes)"
GEN_TOKENS = 128  # tokens decoded for the tokens/s column


# ------------------------------------------------------------------------- checks


def check_method(method: str, cuda: bool | None = None) -> None:
    """Raise a one-line QuantizationError for an unknown method or one this device cannot run."""
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(METHODS)}"
        raise QuantizationError(f"unknown quantization method {method!r}", hint)
    if method.startswith("bnb-"):
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            raise QuantizationError(f"{method} needs a CUDA GPU (bitsandbytes quantizes on CUDA), none is here",
                                    "on this CPU use --method int8, or gguf-q8_0 for llama.cpp")
    if method == "int8":
        import torch

        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
            raise QuantizationError("this torch build has no int8 kernels (quantized engine)",
                                    "use --method gguf-q8_0 for llama.cpp")


def default_output(run: Path, method: str) -> Path:
    """`<run>/quantized/int8/`, `<run>/quantized/bnb-nf4/`, `<run>/quantized/<run>-q8_0.gguf`
    (for a hub download, `./quantized/...` instead of the read-only cache)."""
    hub = [p for p in run.parts if p.startswith("models--")]
    base, name = (Path.cwd(), hub[0].split("--")[-1]) if hub else (run, run.name)
    if method.startswith("gguf-"):
        return base / "quantized" / f"{name}-{method[5:]}.gguf"
    return base / "quantized" / method


def _output(run: Path, method: str, out: str | Path | None) -> Path:
    if not out:
        return default_output(run, method)
    out = Path(out).expanduser()
    if method.startswith("gguf-") and out.suffix != ".gguf":
        return out / default_output(run, method).name  # --out names a folder
    if not method.startswith("gguf-") and out.suffix == ".gguf":
        raise QuantizationError(f"--out {out} is a .gguf file but {method} writes a folder", "pass a folder")
    return out


# --------------------------------------------------------------------------- int8


def int8_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Per-channel int8 weights of every Linear (+ an untied embedding), fp32 for the rest.

    The int8 values and scales are exactly those `quantize_dynamic` with
    `per_channel_dynamic_qconfig` puts in its modules: `<name>.weight` (int8, (out, in)),
    `<name>.weight_scale` (fp32, (out,)); zero points are 0 (symmetric).
    """
    import copy

    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    from torch.ao.quantization import default_per_channel_weight_observer, per_channel_dynamic_qconfig
    from torch.ao.quantization import quantize_dynamic

    with _quiet():
        qmodel = quantize_dynamic(copy.deepcopy(model).float().eval(), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                  dtype=torch.qint8)
    state: dict[str, torch.Tensor] = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, DynLinear):
            w, b = mod._weight_bias()  # quantized (out, in), fp32 bias or None
            state.update(_int8_entry(name, w))
            if b is not None:
                state[f"{name}.bias"] = b.detach().float().contiguous()
    tied = model.config.tie_word_embeddings
    for name, p in qmodel.named_parameters():
        if name.endswith("embed_tokens.weight"):
            if not tied:  # an untied embedding gets the same per-row int8 scheme
                obs = default_per_channel_weight_observer()
                obs(p.detach())
                scale, zero = obs.calculate_qparams()
                with _quiet():
                    q = torch.quantize_per_channel(p.detach(), scale, zero, 0, torch.qint8)
                state.update(_int8_entry(name.removesuffix(".weight"), q))
        elif name not in state:
            state[name] = p.detach().float().contiguous()  # RMSNorm weights (tiny)
    return state


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (the path is deprecated but the fastest here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(deprecated|quantized tensor).*")
        yield


def _int8_entry(name: str, q: torch.Tensor) -> dict[str, torch.Tensor]:
    assert int(q.q_per_channel_zero_points().abs().max()) == 0, "symmetric int8 expected"
    return {f"{name}.weight": q.int_repr().contiguous(),
            f"{name}.weight_scale": q.q_per_channel_scales().float().contiguous()}


def _int8_embedding_class():  # type: ignore[no-untyped-def]
    import torch

    class Int8Embedding(torch.nn.Module):
        """Embedding lookup from per-row int8 weights (the tied output head's own int8 rows)."""

        def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
            super().__init__()
            self.num_embeddings, self.embedding_dim = weight.shape
            self.register_buffer("weight_int8", weight, persistent=False)  # (V, H) int8
            self.register_buffer("scale", scale, persistent=False)  # (V,) fp32

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
            rows = torch.nn.functional.embedding(ids, self.weight_int8).float()
            return rows * self.scale[ids].unsqueeze(-1)

    return Int8Embedding


@functools.cache
def full_range_activations() -> bool:
    """Whether dynamic int8 Linear may use all 8 bits for activations on this CPU.

    fbgemm quantizes activations to 7 bits by default (`reduce_range`), because its
    AVX2 kernels multiply u8 x s8 pairs into int16, which can saturate. CPUs with VNNI
    (avx512_vnni, avx_vnni) accumulate into int32 instead, so the 8th bit is free there:
    measured on a cpu-profile model after 15 minutes of training, +0.60% validation bpb
    against fp32 instead of +2.01%, at the same speed (docs/notes/quantize.md). The
    GELU output that feeds `down_proj` is where the lost bit hurt."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni"))


def _dyn_linear_class(reduce_range: bool):  # type: ignore[no-untyped-def]
    """torch.ao's dynamic int8 Linear, calling its op with the given `reduce_range`."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    if reduce_range:
        return DynLinear

    class FullRangeDynLinear(DynLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
            return y.to(x.dtype)

    return FullRangeDynLinear


def build_int8(config: Any, state: dict[str, torch.Tensor], reduce_range: bool | None = None) -> PreTrainedModel:
    """The HF model of `config` with torch.ao dynamic int8 Linear layers holding `state`;
    activations in 8 bits where this CPU allows it (`full_range_activations`), unless
    `reduce_range` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # shapes only: every weight comes from `state`
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linear = _dyn_linear_class(not full_range_activations() if reduce_range is None else reduce_range)
    if any(f"{n}.weight" not in state for n, _ in linears):
        raise QuantizationError("int8 weights do not fit the config", "quantize the run again")
    with _quiet():
        for name, mod in linears:
            w, s = state[f"{name}.weight"], state[f"{name}.weight_scale"]  # (out, in) int8, (out,)
            q = torch._make_per_channel_quantized_tensor(w, s.double(), torch.zeros(len(s), dtype=torch.int64), 0)
            new = linear(mod.in_features, mod.out_features, bias_=mod.bias is not None, dtype=torch.qint8)
            new.set_weight_bias(q, state.get(f"{name}.bias"))
            model.set_submodule(name, new)
    src = "lm_head" if config.tie_word_embeddings else "model.embed_tokens"
    model.set_input_embeddings(_int8_embedding_class()(state[f"{src}.weight"], state[f"{src}.weight_scale"]))
    with torch.no_grad():
        for k, p in model.named_parameters():  # what is left in fp32: the RMSNorm weights
            p.copy_(state[k])
    return model.eval()


def save_int8(model: PreTrainedModel, tok: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write config, generation config, tokenizer and `model-int8.safetensors` into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tok.save_pretrained(folder)
    tmp = folder / (INT8_WEIGHTS + ".tmp")
    save_file(int8_state(model), str(tmp), metadata={"format": "pt", "quantization": "tinystory-int8"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / INT8_WEIGHTS)


def load_int8(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of an `int8` folder: an HF causal LM (generate, KV cache) on CPU."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig

    from tinystory import tokenizer as tokmod

    path = Path(path)
    if not (path / INT8_WEIGHTS).is_file():
        raise QuantizationError(f"{path} holds no int8 model ({INT8_WEIGHTS} is missing)",
                                "run `tinystory quantize RUN --method int8`")
    model = build_int8(AutoConfig.from_pretrained(path), load_file(str(path / INT8_WEIGHTS)))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokmod.load(path)


def load_quantized(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of any quantized folder (its quantization.json names the method)."""
    path = Path(path)
    manifest = read_manifest(path)
    method = manifest.get("method", "int8")
    if method == "int8":
        return load_int8(path)
    if method.startswith("bnb-"):
        check_method(method)
        from transformers import AutoModelForCausalLM

        from tinystory import tokenizer as tokmod
        from tinystory.generation_hf import quiet_load

        model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}))
        return model.eval(), tokmod.load(path)
    raise QuantizationError(f"{path} holds a {method} model, not a folder model", "pass the .gguf file")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """quantization.json of a quantized folder, or the `<name>.json` beside a .gguf file."""
    path = Path(path)
    f = path.with_suffix(".json") if path.suffix == ".gguf" else path / MANIFEST
    if not f.is_file():
        raise QuantizationError(f"{path} is not a quantized model ({f.name} is missing)", "quantize the run again")
    return json.loads(f.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------- bnb, gguf


def save_bnb(run: Path, method: str, folder: Path) -> PreTrainedModel:
    """Quantize with bitsandbytes on CUDA and save serialized (reloads with from_pretrained)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tinystory import tokenizer as tokmod

    check_method(method)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if method == "bnb-int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                bnb_4bit_use_double_quant=True)
    from tinystory.generation_hf import quiet_load

    model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(run, quantization_config=qc, dtype=compute,
                                                                     device_map={"": 0}))
    folder.mkdir(parents=True, exist_ok=True)
    quiet_load(lambda: model.save_pretrained(folder))  # safetensors with the bnb quant state: from_pretrained reloads it
    tokmod.load(run).save_pretrained(folder)
    return model.eval()


def load_gguf(path: str | Path, n_ctx: int = 512, threads: int = 0, logits_all: bool = False) -> Any:
    """A `llama_cpp.Llama` for a .gguf file (threads 0 = llama.cpp's choice), quiet."""
    try:
        import llama_cpp
    except ImportError:
        raise QuantizationError("running a .gguf needs llama-cpp-python, which is not installed",
                                GGUF_HINT) from None
    if not Path(path).is_file():
        raise QuantizationError(f"{path} does not exist", "run `tinystory quantize RUN --method gguf-q8_0`")
    kwargs: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads} if threads > 0 else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, **kwargs)


def llama_cpp_available() -> bool:
    """Is llama-cpp-python importable (the GGUF rows of the table need it)?"""
    import importlib.util

    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except ValueError:  # blocked in sys.modules (tests)
        return False


# -------------------------------------------------------------------- comparison


@dataclass
class Row:
    """One line of the comparison table (None = not measured, `note` says why)."""

    model: str
    size_bytes: int
    bpb: float | None = None
    tok_s: float | None = None
    greedy_match: int | None = None  # leading greedy tokens equal to the unquantized model's
    greedy_len: int | None = None  # tokens the unquantized model produced (<= compare_tokens)
    note: str = ""


@dataclass
class Scorer:
    """What the table needs from one variant: logits of id blocks and greedy decoding."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) -> logits (B, T, V), as eval scores
    greedy: Callable[[list[int], int, bool], list[int]]  # (ids, n, stop_at_eos) -> new ids


def torch_scorer(model: PreTrainedModel, eos_id: int | None) -> Scorer:
    """A Scorer over an HF causal LM (fp32, int8 or bnb), on the model's device."""
    import torch
    from transformers import GenerationConfig

    from tinystory.evaluation import model_logits

    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    logits = model_logits(model)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return logits(x.to(device))

    @torch.inference_mode()
    def greedy(ids: list[int], n: int, stop: bool) -> list[int]:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0 if stop else n,
                              eos_token_id=eos_id, pad_token_id=eos_id)
        out = model.generate(torch.tensor([ids], device=device), generation_config=gc)
        return out[0, len(ids):].tolist()

    return Scorer(forward, greedy)


def llama_scorer(llm: Any, eos_id: int | None) -> Scorer:
    """A Scorer over a `llama_cpp.Llama` made with logits_all=True (n_ctx >= the block size)."""
    import numpy as np
    import torch

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for ids in x.tolist():
            llm.reset()
            llm.eval(ids)
            rows.append(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (T, V)
        return torch.from_numpy(np.stack(rows))  # (B, T, V)

    def greedy(ids: list[int], n: int, stop: bool) -> list[int]:
        new: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            new.append(int(t))
            if len(new) >= n or (stop and t == eos_id):
                break
        return new

    return Scorer(forward, greedy)


@dataclass
class ValData:
    """The validation tokens every variant is scored on, the way `tinystory eval` scores."""

    tokens: np.ndarray  # the first `val_tokens` of the stream
    block_size: int  # training's block size (eval's)
    byte_lengths: np.ndarray
    source: str  # where the tokens come from (recorded in quantization.json)


def val_data(run: Path, model: Any, tok: PreTrainedTokenizerBase, settings: Settings, max_tokens: int) -> ValData:
    """The run's prepared val.bin (the data `tinystory eval` scores) capped at `max_tokens`,
    in training's block size; when that data is gone or uses another tokenizer, the bundled
    sample's validation stories, read and cleaned as `prepare` does, stored as it stores them
    (BOS + text + EOS)."""
    import numpy as np

    from tinystory import cleaning, sources
    from tinystory.errors import TinystoryError
    from tinystory.evaluation import block_size_of, open_data, run_data_path
    from tinystory.tokenizer import token_byte_lengths

    lengths = token_byte_lengths(tok)
    block = block_size_of(run, settings, model)
    path = run_data_path(run)
    try:
        prepared = open_data(run, tok, path) if path else None
    except TinystoryError:
        prepared = None
    if prepared is not None:
        tokens = np.asarray(prepared.tokens("val")[:max_tokens], dtype=np.int64)
        return ValData(tokens, block, lengths, f"{prepared.path}/val.bin")
    (val,) = [src for src in sources.resolve("sample") if src.role == "val"]
    stream: list[int] = []
    counts = cleaning.new_counts()
    for story in cleaning.cleaned(sources.read(val, "text", "strict", counts), counts):
        if len(stream) >= max_tokens:
            break
        stream += tok(story)["input_ids"] + [tok.eos_token_id]
    return ValData(np.asarray(stream[:max_tokens], dtype=np.int64), block, lengths, "bundled sample valid.txt.gz")


def bits_per_byte(scorer: Scorer, val: ValData, batch_size: int = 8) -> float:
    """Validation bits per byte of one variant: `evaluation.score_blocks` over `val`, then
    `metrics.bits_per_byte` (specials left out), exactly what `tinystory eval` reports
    for the same tokens."""
    from tinystory import metrics as M
    from tinystory.evaluation import score_blocks

    s = score_blocks(scorer.forward, val.tokens, val.block_size, batch_size, val.byte_lengths)
    return M.bits_per_byte(s["text_nats"], s["bytes"])


def tokens_per_second(scorer: Scorer, ids: list[int], n: int = GEN_TOKENS, reps: int = 3) -> float:
    """Median tokens/s of decoding `n` tokens after `ids` (prompt included, warm-up excluded)."""
    import statistics

    scorer.greedy(ids, 4, False)  # warm-up: first-call allocations, lazy kernels
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        scorer.greedy(ids, n, False)
        times.append(n / (time.perf_counter() - t))
    return statistics.median(times)


def leading_match(a: list[int], b: list[int]) -> int:
    """How many leading tokens of `a` and `b` are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def measure(name: str, size: int, scorer: Scorer, val: ValData, prompt: list[int], reference: list[int] | None,
            compare_tokens: int, gen_tokens: int, reps: int = 3) -> tuple[Row, list[int]]:
    """One table row (and this variant's greedy continuation of `prompt`)."""
    greedy = scorer.greedy(prompt, compare_tokens, True)
    ref = greedy if reference is None else reference
    row = Row(name, size, bits_per_byte(scorer, val),
              tokens_per_second(scorer, prompt, gen_tokens, reps) if gen_tokens else None,
              leading_match(ref, greedy), len(ref))
    return row, greedy


def format_table(rows: list[Row]) -> str:
    """The comparison as a Markdown table (first row = the unquantized reference)."""
    base = rows[0]
    lines = ["| model | size MB | size | val bpb | bpb vs ref | tok/s | speed | greedy = ref |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        size = f"{r.size_bytes / 1e6:.2f} | {100 * r.size_bytes / base.size_bytes:.0f}%"
        bpb = "n/a | n/a" if r.bpb is None else f"{r.bpb:.4f} | {100 * (r.bpb / base.bpb - 1):+.2f}%"
        speed = "n/a | n/a" if r.tok_s is None else f"{r.tok_s:.1f} | {r.tok_s / base.tok_s:.2f}x" if base.tok_s \
            else f"{r.tok_s:.1f} | n/a"
        greedy = "n/a" if r.greedy_match is None else f"{r.greedy_match}/{r.greedy_len}"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.model}{note} | {size} | {bpb} | {speed} | {greedy} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- quantize


def _versions(method: str) -> dict[str, str]:
    import importlib.metadata as md

    names = ["tinystory-llm", "torch", "transformers"]
    names += ["gguf", "llama-cpp-python"] if method.startswith("gguf-") else []
    names += ["bitsandbytes"] if method.startswith("bnb-") else []
    found = {}
    for n in names:
        try:
            found[n] = md.version(n)
        except md.PackageNotFoundError:
            found[n] = "not installed"
    return found


LIBRARY = {
    "int8": "torch.ao.quantization.quantize_dynamic: per-channel int8 Linear weights, dynamic int8 activations",
    "bnb-int8": "transformers BitsAndBytesConfig(load_in_8bit=True) (LLM.int8)",
    "bnb-nf4": "transformers BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', double quant)",
    "gguf-f32": "gguf package writer, llama.cpp arch gemma (exact fold), f32",
    "gguf-f16": "gguf package writer, llama.cpp arch gemma (exact fold), f16 matrices",
    "gguf-q8_0": "gguf package writer, llama.cpp arch gemma (exact fold), q8_0 matrices",
}
LOAD = {
    "int8": "tinystory generate/eval DIR, or tinystory.quantization.load_int8(DIR); "
            "plain from_pretrained cannot load it",
    "bnb-int8": "AutoModelForCausalLM.from_pretrained(DIR) on a CUDA GPU with bitsandbytes",
    "bnb-nf4": "AutoModelForCausalLM.from_pretrained(DIR) on a CUDA GPU with bitsandbytes",
}
GGUF_LOAD = "llama.cpp / ollama / LM Studio / llama_cpp.Llama(FILE); tinystory generate FILE. "
WINDOW = ("llama.cpp ignores the sliding window: identical up to {w} tokens of context, beyond it "
          "every earlier token is attended to (the HF model sees only the last {w})")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def quantize(run: Path, settings: Settings, out: str | Path | None = None, val_tokens: int | None = None,
             gen_tokens: int = GEN_TOKENS, reps: int = 3) -> tuple[Path, list[Row]]:
    """Quantize `run` with `settings.quantize.method`, write it with its quantization.json
    (method, library, versions, settings, source, comparison table) and return (path, rows).

    val_tokens: validation tokens scored per variant (default `quantize.val_tokens`);
    `tinystory eval --max-tokens N` of the unquantized run reports the same bpb."""
    import torch
    from rich.markup import escape
    from transformers import AutoModelForCausalLM

    from tinystory import tokenizer as tokmod
    from tinystory.console import info
    from tinystory.generation_hf import quiet_load

    q = settings.quantize
    check_method(q.method)
    if run.is_file() or not (run / "config.json").is_file() or (run / MANIFEST).is_file():
        raise QuantizationError(f"{run} is not an unquantized run dir", "pass the run dir that training wrote")
    target = _output(run, q.method, out or q.out or None)
    tok = tokmod.load(run)
    source = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)).eval()
    val = val_data(run, source, tok, settings, val_tokens or q.val_tokens)
    # One thread unless generate.threads says otherwise: the steadiest decoding timing on small
    # shared CPUs, and the same count for torch and llama.cpp.
    threads = settings.generate.threads or 1
    info(escape(f"quantizing {run} with {q.method} -> {target}"))
    quantized: Scorer | None = None
    llm = None
    if q.method == "int8":
        save_int8(source, tok, target)
        quantized = torch_scorer(load_int8(target)[0], tok.eos_token_id)  # measure what reloads
    elif q.method.startswith("bnb-"):
        model = save_bnb(run, q.method, target)
        source = source.to(device=model.device, dtype=model.dtype)  # compare against fp16/bf16 on the GPU
        quantized = torch_scorer(model, tok.eos_token_id)
    else:
        from tinystory.gguf_export import write_gguf

        write_gguf(source, tok, target, q.method[5:], name=run.name,
                   extra={"tinystory.source_run": str(run), "tinystory.method": q.method})
        if llama_cpp_available():
            n_ctx = max(512, val.block_size, len(tok(q.prompt)["input_ids"]) + gen_tokens + 8)
            llm = load_gguf(target, n_ctx=n_ctx, threads=threads, logits_all=True)
            quantized = llama_scorer(llm, tok.eos_token_id)
    if target.is_dir():  # the run's settings and data record travel with the folder: eval finds both
        for name in ("settings.toml", "run.json"):
            if (run / name).is_file():
                shutil.copy2(run / name, target / name)
    torch.set_num_threads(threads)
    try:
        rows = compare(run, source, tok, target, quantized, settings, val, gen_tokens, reps)
    finally:
        if llm is not None:
            llm.close()  # free llama.cpp's memory now, not at interpreter exit
    _write_manifest(run, target, settings, rows, val, gen_tokens)
    return target, rows


def compare(run: Path, source: PreTrainedModel, tok: PreTrainedTokenizerBase, target: Path,
            quantized: Scorer | None, settings: Settings, val: ValData,
            gen_tokens: int = GEN_TOKENS, reps: int = 3) -> list[Row]:
    """[reference row, quantized row] on the same validation blocks, prompt and threads."""
    import torch

    q = settings.quantize
    prompt = tok(q.prompt)["input_ids"]
    src_size = _size(run / "model.safetensors") if (run / "model.safetensors").is_file() else _size(run)
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(source.dtype, str(source.dtype))
    ref, greedy = measure(f"unquantized {dtype}", src_size,
                          torch_scorer(source, tok.eos_token_id), val, prompt, None,
                          q.compare_tokens, gen_tokens, reps)
    name = {"int8": "int8 (torch.ao dynamic)"}.get(q.method, q.method)
    if quantized is None:
        row = Row(name, _size(target), note=f"llama-cpp-python not installed: {GGUF_HINT}")
    else:
        row, _ = measure(name if not q.method.startswith("gguf-") else f"{name} (llama.cpp)", _size(target),
                         quantized, val, prompt, greedy, q.compare_tokens, gen_tokens, reps)
    return [ref, row]


def _write_manifest(run: Path, target: Path, settings: Settings, rows: list[Row], val: ValData,
                    gen_tokens: int) -> None:
    import dataclasses
    import platform

    import torch

    method = settings.quantize.method
    window = None
    cfg = run / "config.json"
    if cfg.is_file():
        window = json.loads(cfg.read_text(encoding="utf-8")).get("sliding_window")
    load = LOAD.get(method) or GGUF_LOAD + (WINDOW.format(w=window) if window else "no sliding window: same attention")
    manifest = {
        "method": method,
        "library": LIBRARY[method],
        "versions": _versions(method),
        "settings": dataclasses.asdict(settings.quantize),
        "source_run": str(run),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": [target.name] if target.is_file() else sorted(p.name for p in target.iterdir()),
        "load": load,
        "comparison": {
            "device": _device_name(),
            "threads": torch.get_num_threads(),
            "val_data": val.source,
            "val_tokens": len(val.tokens),
            "block_size": val.block_size,
            "gen_tokens": gen_tokens,
            "python": platform.python_version(),
            **({"int8_activations": "8-bit (VNNI CPU)" if full_range_activations() else "7-bit (fbgemm reduce_range)"}
               if method == "int8" else {}),
            "rows": [asdict(r) for r in rows],
            "table": format_table(rows),
        },
    }
    f = target.with_suffix(".json") if target.suffix == ".gguf" else target / MANIFEST
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, f)


def _device_name() -> str:
    """The CUDA device's name, else the CPU's model name."""
    import torch

    from tinystory.rundir import cpu_model

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_model()


# ------------------------------------------------------------- generation backends


def load_backend(path: str | Path, device: str = "auto", dtype: str = "auto", threads: int = 0) -> Any:
    """A `tinystory.generation.Backend` for a quantized folder or a .gguf file.

    Folders (int8, bnb) run on the transformers backend; a .gguf runs in llama.cpp
    through llama-cpp-python (`pip install 'tinystory-llm[gguf]'`).
    """
    from tinystory.generation import _quantized_hf

    path = Path(path)
    if path.suffix != ".gguf":
        return _quantized_hf(path, load_quantized, threads)
    return GGUFBackend(path, threads)


def _gguf_backend_class() -> type:
    from tinystory.generation import Backend

    class _GGUFBackend(Backend):
        """llama.cpp decoding of a GGUF written by `gguf_export` (tokenizer inside the file)."""

        def __init__(self, path: Path, threads: int) -> None:
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

        def token_ids(self, prompt_ids: list[int], params: Any, seed: int, stop: Any) -> Iterator[int]:
            self.llm.set_seed(seed)
            sampling = dict(temp=0.0, top_k=1) if params.greedy else dict(
                temp=params.temperature, top_k=params.top_k or 0, top_p=params.top_p)
            n = 0
            for tok in self.llm.generate(prompt_ids, reset=True, repeat_penalty=params.repetition_penalty, **sampling):
                yield tok
                n += 1
                if tok == self.eos_token_id or n >= params.max_new_tokens or (stop is not None and stop.is_set()):
                    return

    return _GGUFBackend


def GGUFBackend(path: Path, threads: int = 0) -> Any:  # noqa: N802 - a class built lazily
    """The llama.cpp backend (its class imports tinystory.generation only when used)."""
    return _gguf_backend_class()(path, threads)
