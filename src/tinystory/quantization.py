"""Quantize a run: int8 for CPU (torch.ao dynamic int8 Linear), bitsandbytes int8/nf4 for
CUDA, GGUF f32/f16/q8_0 for llama.cpp; then compare the result with the unquantized model
(file size, validation bits per byte, tokens/s, greedy agreement).

Each method is a well-kept library's own path:

- `int8`: `torch.ao.quantization.quantize_dynamic`, written and read by `tinystory.int8`.
- `bnb-int8` / `bnb-nf4`: transformers' `BitsAndBytesConfig`, saved with `save_pretrained`
  (loads again with plain `from_pretrained`, on CUDA).
- `gguf-*`: `tinystory.gguf_export` (the `gguf` package), run with llama-cpp-python.

Loading any of them again is `tinystory.loading`'s business.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rich.markup import escape
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tinystory import cleaning, sources
from tinystory import metrics as M
from tinystory.console import info
from tinystory.errors import QuantizationError, TinystoryError
from tinystory.gguf_export import write_gguf
from tinystory.int8 import full_range_activations, load_int8, save_int8
from tinystory.loading import (
    GGUF_HINT,
    check_method,
    hardware,
    llama_cpp_available,
    load_gguf,
    load_model,
    pick_device,
    quiet_load,
)
from tinystory.paths import atomic_dir, write_atomic
from tinystory.runs import MANIFEST, Run
from tinystory.scoring import model_logits, score_blocks
from tinystory.settings import Settings
from tinystory.tokenizer import load_tokenizer, token_byte_lengths

GEN_TOKENS = 128  # tokens decoded for the tokens/s column


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


# ---------------------------------------------------------------------- bnb, gguf


def save_bnb(run: Path, method: str, folder: Path) -> PreTrainedModel:
    """Quantize with bitsandbytes on CUDA and save serialized (reloads with from_pretrained)."""
    check_method(method)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if method == "bnb-int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                bnb_4bit_use_double_quant=True)
    model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(run, quantization_config=qc, dtype=compute,
                                                                     device_map={"": 0}))
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors with the bnb quant state: from_pretrained reloads it
    quiet_load(lambda: model.save_pretrained(folder))
    load_tokenizer(run).save_pretrained(folder)
    return model.eval()


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
    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    logits = model_logits(model)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return logits(x.to(device))

    @torch.inference_mode()
    def greedy(ids: list[int], n: int, stop: bool) -> list[int]:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0 if stop else n,
                              eos_token_id=eos_id, pad_token_id=eos_id)
        generate = cast(Any, model).generate  # typed as a tensor attribute by transformers' stubs
        out = generate(torch.tensor([ids], device=device), generation_config=gc)
        return out[0, len(ids):].tolist()
    return Scorer(forward, greedy)


def llama_scorer(llm: Any, eos_id: int | None) -> Scorer:
    """A Scorer over a `llama_cpp.Llama` made with logits_all=True (n_ctx >= the block size)."""
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


def val_data(run: Path, model: Any, tokenizer: PreTrainedTokenizerBase, settings: Settings,
             max_tokens: int) -> ValData:
    """The run's prepared val.bin (the data `tinystory eval` scores) capped at `max_tokens`,
    in training's block size; when that data is gone or uses another tokenizer, the bundled
    sample's validation stories, read and cleaned as `prepare` does, stored as it stores them
    (BOS + text + EOS)."""
    the_run = Run(run)
    lengths = token_byte_lengths(tokenizer)
    block = the_run.block_size(settings.train.block_size, getattr(getattr(model, "config", None),
                                                                  "max_position_embeddings", None))
    try:
        prepared = the_run.data(tokenizer) if the_run.data_path else None
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
        stream += tokenizer(story)["input_ids"] + [tokenizer.eos_token_id]
    return ValData(np.asarray(stream[:max_tokens], dtype=np.int64), block, lengths, "bundled sample valid.txt.gz")


def bits_per_byte(scorer: Scorer, val: ValData, batch_size: int = 8) -> float:
    """Validation bits per byte of one variant: `evaluation.score_blocks` over `val`, then
    `metrics.bits_per_byte` (specials left out), exactly what `tinystory eval` reports
    for the same tokens."""
    s = score_blocks(scorer.forward, val.tokens, val.block_size, batch_size, val.byte_lengths)
    return M.bits_per_byte(s["text_nats"], s["bytes"])


def tokens_per_second(scorer: Scorer, ids: list[int], n: int = GEN_TOKENS, reps: int = 3) -> float:
    """Median tokens/s of decoding `n` tokens after `ids` (prompt included, warm-up excluded)."""
    scorer.greedy(ids, 4, False)  # warm-up: first-call allocations, lazy kernels
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        scorer.greedy(ids, n, False)
        times.append(n / (time.perf_counter() - t))
    return statistics.median(times)


def leading_match(a: list[int], b: list[int]) -> int:
    """How many leading tokens of `a` and `b` are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # the shorter one decides
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
        bpb = ("n/a | n/a" if r.bpb is None or not base.bpb
               else f"{r.bpb:.4f} | {100 * (r.bpb / base.bpb - 1):+.2f}%")
        speed = "n/a | n/a" if r.tok_s is None else f"{r.tok_s:.1f} | {r.tok_s / base.tok_s:.2f}x" if base.tok_s \
            else f"{r.tok_s:.1f} | n/a"
        greedy = "n/a" if r.greedy_match is None else f"{r.greedy_match}/{r.greedy_len}"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.model}{note} | {size} | {bpb} | {speed} | {greedy} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- quantize


def _versions(method: str) -> dict[str, str]:
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
    "int8": "tinystory generate/eval DIR, or tinystory.int8.load_int8(DIR); "
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
    q = settings.quantize
    check_method(q.method)
    if run.is_file() or not (run / "config.json").is_file() or (run / MANIFEST).is_file():
        raise QuantizationError(f"{run} is not an unquantized run dir", "pass the run dir that training wrote")
    target = _output(run, q.method, out or q.out or None)
    tok = load_tokenizer(run)
    source = load_model(Run(run), "cpu", "fp32")[0]  # the checks of every load: no remote code, damaged weights
    val = val_data(run, source, tok, settings, val_tokens or q.val_tokens)
    # One thread unless generate.threads says otherwise: the steadiest decoding timing on small
    # shared CPUs, and the same count for torch and llama.cpp.
    threads = settings.generate.threads or 1
    info(escape(f"quantizing {run} with {q.method} -> {target}"))
    if q.method.startswith("gguf-"):  # one file, written whole (write_gguf), then its manifest
        write_gguf(source, tok, target, q.method[5:], name=run.name,
                   extra={"tinystory.source_run": str(run), "tinystory.method": q.method})
        llm = None
        if llama_cpp_available():
            n_ctx = max(512, val.block_size, len(tok(q.prompt)["input_ids"]) + gen_tokens + 8)
            llm = load_gguf(target, n_ctx=n_ctx, threads=threads, logits_all=True)
        torch.set_num_threads(threads)
        try:
            rows = compare(run, source, tok, target, llama_scorer(llm, tok.eos_token_id) if llm else None,
                           settings, val, gen_tokens, reps)
        finally:
            if llm is not None:
                llm.close()  # free llama.cpp's memory now, not at interpreter exit
        _write_manifest(run, target, target, settings, rows, val, gen_tokens)
        return target, rows
    with atomic_dir(target) as folder:  # a folder: made aside, renamed into place when complete
        if q.method == "int8":
            save_int8(source, tok, folder)
            quantized = torch_scorer(load_int8(folder)[0], tok.eos_token_id)  # measure what reloads
        else:
            model = save_bnb(run, q.method, folder)
            # compare against fp16/bf16 on the GPU (`.to` is typed through a wrapper mypy misreads)
            source = source.to(device=model.device, dtype=model.dtype)  # type: ignore[call-arg]
            quantized = torch_scorer(model, tok.eos_token_id)
        for name in ("settings.toml", "run.json"):  # they travel with the folder: eval finds both
            if (run / name).is_file():
                shutil.copy2(run / name, folder / name)
        torch.set_num_threads(threads)
        rows = compare(run, source, tok, folder, quantized, settings, val, gen_tokens, reps)
        _write_manifest(run, target, folder, settings, rows, val, gen_tokens)
    return target, rows


def compare(run: Path, source: PreTrainedModel, tok: PreTrainedTokenizerBase, target: Path,
            quantized: Scorer | None, settings: Settings, val: ValData,
            gen_tokens: int = GEN_TOKENS, reps: int = 3) -> list[Row]:
    """[reference row, quantized row] on the same validation blocks, prompt and threads."""
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


def _write_manifest(run: Path, target: Path, written: Path, settings: Settings, rows: list[Row], val: ValData,
                    gen_tokens: int) -> None:
    """quantization.json into the folder `written` (to become `target`), or the `<name>.json`
    beside a .gguf file."""
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
        "files": [target.name] if written.is_file() else sorted([*(p.name for p in written.iterdir()), MANIFEST]),
        "load": load,
        "comparison": {
            "device": hardware(pick_device()),
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
    f = written.with_suffix(".json") if written.suffix == ".gguf" else written / MANIFEST
    write_atomic(f, json.dumps(manifest, indent=2) + "\n")
