"""Decoding speed of `tinystory generate` against plain `model.generate()`, same run.

For each preset and dtype it times our token loop (`Generator.stream`, settings defaults:
temperature 1.0, top-p 0.9) and transformers' `model.generate()` with its defaults on the
run's generation_config (temperature 1.0, top-p 0.9, and transformers' own top-k 50), both
producing exactly `--new-tokens` tokens (`min_new_tokens`: EOS cannot cut a run short)
from the same prompt. Weights are random, with the final norm scaled so that next-token
distributions are as peaked as a trained model's (see `peak`).

It reports medians of `--repeats` runs, interleaved (ours, theirs, ours, ...) so that load
from other processes hits both alike: tokens/s, time to first token, and tokens per
CPU-second of the process (`cpu`), which waiting for a busy core does not change (1
thread). The int8 model of `tinystory.quantization` is timed too when that module offers
`save_int8` (loaded back through `Generator.load`).

    python benchmarks/bench_generate.py                       # tiny, cpu-3m, tinystories-40m
    python benchmarks/bench_generate.py --presets tiny --threads 1,2 --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name

PROMPT = "Once upon a time, there was a little girl named Lily. She"
ENTROPY = 1.5  # nats: next-token entropy of a TinyStories model (its validation loss is ~1.2-1.5)
VOCAB = {"tiny": "bpe:512", "cpu-3m": "bpe:4096", "stories15m": "bpe:4096", "tinystories-40m": "mistral"}


def make_run(preset: str, folder: Path, peaked: bool = True) -> Path:
    """A run dir with a randomly initialised `preset` and its tokenizer; `peaked`: the final
    norm scaled to a trained model's next-token entropy (see `peak`)."""
    import gzip
    from importlib import resources

    import torch

    from tinystory.model import build_config, build_model
    from tinystory.tokenizer import load_mistral, parse_spec, train_bpe

    kind, size = parse_spec(VOCAB.get(preset, "bpe:4096"))
    if kind == "mistral":
        tok = load_mistral()
    else:
        raw = resources.files("tinystory.sample").joinpath("train.txt.gz").read_bytes()
        stories = gzip.decompress(raw).decode("utf-8").split("<|endoftext|>")
        tok = train_bpe(stories[:2000], size)
    torch.manual_seed(0)
    model = build_model(build_config(preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    if peaked:
        peak(model, tok)
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, 1.0, 0.9  # what a trained run carries
    path = folder / preset
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def peak(model, tok, entropy: float = ENTROPY) -> float:  # type: ignore[no-untyped-def]
    """Scale the final norm until next-token entropy is that of a trained model.

    Untrained weights give near-uniform next-token distributions, which no trained model
    has, and the cost of top-p sampling depends on how many tokens hold 90% of the mass.
    The scale changes no shape and no FLOP. Returns the mean entropy reached (nats)."""
    import torch

    ids = tok(PROMPT * 4, return_tensors="pt").input_ids
    norm = model.model.norm.weight
    with torch.no_grad():
        for _ in range(12):
            logp = model(input_ids=ids).logits.float().log_softmax(-1)  # (1, T, V)
            h = float(-(logp.exp() * logp).sum(-1).mean())
            if h <= entropy:
                break
            norm.mul_(2.0)
    return h


class FirstTokenTimer:
    """A transformers streamer that notes when `generate()` hands out its first new token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.calls = 0

    def put(self, value) -> None:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def time_ours(gen, params) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(tok/s, first-token seconds, tok per CPU-second) of one `Generator.stream`."""
    c0 = time.process_time()
    stream = gen.stream(PROMPT, params)
    for _ in stream:
        pass
    cpu = time.process_time() - c0
    return stream.stats.tokens_per_s, stream.stats.first_token_s, stream.stats.tokens / cpu


def time_hf(gen, n: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """The same for plain `model.generate()`: the model's own generation_config, nothing tuned."""
    import torch

    model, tok = gen.backend.model, gen.backend.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(model.device)  # BOS + prompt
    c0 = time.process_time()
    timer = FirstTokenTimer()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=timer)
    seconds, cpu = time.perf_counter() - timer.start, time.process_time() - c0
    new = out.shape[1] - ids.shape[1]
    return new / seconds, timer.first or 0.0, new / cpu


def int8_run(run: Path, folder: Path) -> Path | None:
    """The quantize helper's int8 model of `run` (its own save_int8), when it offers one."""
    try:
        from tinystory import quantization
    except ImportError:
        return None
    if not hasattr(quantization, "save_int8"):
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = folder / f"{run.name}-int8"
    source = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    quantization.save_int8(source, AutoTokenizer.from_pretrained(run), out)
    (out / quantization.MANIFEST).write_text(json.dumps({"method": "int8"}))
    return out


def bench(run: Path, dtype: str, threads: int, n: int, repeats: int, with_hf: bool = True,
          compile: bool = False) -> dict:
    """Median tok/s and first-token ms of ours (and of plain generate()), interleaved."""
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams

    gen = Generator.load(run, device="cpu", dtype=dtype, threads=threads, compile=compile)
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=1.0, top_p=0.9, seed=0)
    t0 = time.perf_counter()
    time_ours(gen, params)  # warm-up: first-call allocations, lazy imports (and compilation)
    warmup = time.perf_counter() - t0
    if with_hf:
        time_hf(gen, 8)
    ours, hf = [], []
    for _ in range(repeats):
        ours.append(time_ours(gen, params))
        if with_hf:
            hf.append(time_hf(gen, n))
    row = {"model": run.name, "dtype": gen.dtype, "threads": gen.threads, "compile": compile, "warmup_s": warmup,
           "params_m": round(gen.num_parameters / 1e6, 2),
           "ours_tok_s": statistics.median(r[0] for r in ours),
           "ours_ttft_ms": 1000 * statistics.median(r[1] for r in ours),
           "ours_cpu_tok_s": statistics.median(r[2] for r in ours)}
    if with_hf:
        row["hf_tok_s"] = statistics.median(r[0] for r in hf)
        row["hf_ttft_ms"] = 1000 * statistics.median(r[1] for r in hf)
        row["hf_cpu_tok_s"] = statistics.median(r[2] for r in hf)
        row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
        row["cpu_ratio"] = row["ours_cpu_tok_s"] / row["hf_cpu_tok_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,cpu-3m,tinystories-40m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", default="0", help="comma list; 0 = the Generator's own choice")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the compiled static-cache path")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {cpu_name()}, {os.cpu_count()} cores, load average {load:.2f} at start", flush=True)
    print(f"# {args.new_tokens} new tokens, median of {args.repeats}, prompt {PROMPT!r}", flush=True)
    header = (f"{'model':<26}{'dtype':<6}{'thr':>4}{'ours tok/s':>11}{'cpu':>7}{'ttft ms':>9}"
              f"{'generate()':>11}{'cpu':>7}{'ttft ms':>9}{'ratio':>7}{'cpu':>6}")
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            run = make_run(preset, Path(tmp))
            variants = [(run, d, False) for d in args.dtypes.split(",")]
            variants += [(run, d, True) for d in args.dtypes.split(",") if args.compile]
            q = int8_run(run, Path(tmp))
            variants += [(q, "auto", False)] if q else []
            for path, dtype, compiled in variants:
                for threads in (int(t) for t in args.threads.split(",")):
                    row = bench(path, dtype, threads, args.new_tokens, args.repeats, path == run and not compiled,
                                compiled)
                    row["model"] = path.name + (" compiled" if compiled else "")
                    rows.append(row)
                    hf = (f"{row['hf_tok_s']:>11.1f}{row['hf_cpu_tok_s']:>7.1f}{row['hf_ttft_ms']:>9.1f}"
                          f"{row['ratio']:>7.2f}{row['cpu_ratio']:>6.2f}" if "hf_tok_s" in row else f"{'-':>11}")
                    print(f"{row['model']:<26}{row['dtype']:<6}{row['threads']:>4}{row['ours_tok_s']:>11.1f}"
                          f"{row['ours_cpu_tok_s']:>7.1f}{row['ours_ttft_ms']:>9.1f}{hf}", flush=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load_end:.2f} at the end (2 cores shared: other processes slow both columns alike)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "load": [load, load_end], "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
