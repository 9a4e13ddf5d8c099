"""Quantization on this CPU: file size, validation bits per byte, decoding tokens/s and greedy
agreement for fp32, bf16, every int8 path (torch.ao dynamic = `tinystory quantize --method
int8`; torchao's int8 configs when torchao is installed) and GGUF f32/f16/q8_0 in llama.cpp.

Models: the tinystories-40m preset with the Mistral vocab (random weights unless --train-steps:
speed and size do not depend on what it learned, bpb does) and cpu-3m with a BPE 4096 trained
on the bundled sample, briefly trained with a plain torch loop (or pass --run DIR for real runs).
Timings are interleaved (variant after variant, `--repeats` rounds) and reported as the
median; `cpu tok/s` divides by the process CPU time (1 thread), which waiting for a busy
core does not change, so ratios stay meaningful on a shared machine.

    python benchmarks/bench_quantize.py                          # both models, 1 and 2 threads
    python benchmarks/bench_quantize.py --models cpu-3m --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name

PROMPT = "Once upon a time"
SETUP = {"tinystories-40m": ("mistral", 0), "cpu-3m": ("bpe:4096", 300)}  # tokenizer, default train steps


def sample(split: str, limit: int) -> list[str]:
    import gzip
    from importlib import resources

    raw = resources.files("tinystory.sample").joinpath(f"{'valid' if split == 'val' else split}.txt.gz").read_bytes()
    return [s.strip() for s in gzip.decompress(raw).decode().split("<|endoftext|>") if s.strip()][:limit]


def make_run(preset: str, folder: Path, steps: int) -> Path:
    """A run dir: `preset` with its tokenizer, trained `steps` plain AdamW steps on the sample."""
    import torch

    from tinystory.model import build_config, build_model
    from tinystory.tokenizer import load_mistral, train_bpe

    spec, _ = SETUP[preset]
    tok = load_mistral() if spec == "mistral" else train_bpe(sample("train", 4000), int(spec.split(":")[1]))
    torch.manual_seed(0)
    model = build_model(build_config(preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    if steps:
        torch.set_num_threads(1)  # a 2-core shared machine: one thread trains this size fastest
        stream = [t for s in sample("train", 6000) for t in tok(s)["input_ids"] + [tok.eos_token_id]]
        data = torch.tensor(stream[: len(stream) // 256 * 256]).view(-1, 256)  # (N, 256)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
        for step in range(steps):
            batch = data[torch.randint(len(data), (16,))]  # (16, 256)
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"  {preset} step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    run = folder / preset
    model.eval().save_pretrained(run)
    tok.save_pretrained(run)
    return run


def variants(run: Path, out: Path, threads: int) -> dict:
    """name -> (size bytes or None, Scorer, closer) for every path measured."""
    import torch
    from transformers import AutoModelForCausalLM

    from tinystory import int8 as I8
    from tinystory import loading as L
    from tinystory import quantization as Q
    from tinystory import tokenizer as T
    from tinystory.gguf_export import write_gguf

    tok = T.load_tokenizer(run)
    eos = tok.eos_token_id
    fp32 = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    v = {"fp32 (transformers)": ((run / "model.safetensors").stat().st_size, Q.torch_scorer(fp32, eos))}
    v["bf16 (transformers)"] = (None, Q.torch_scorer(copy.deepcopy(fp32).to(torch.bfloat16), eos))
    I8.save_int8(fp32, tok, out / "int8")
    v["int8 torch.ao dynamic (ours)"] = (Q._size(out / "int8"), Q.torch_scorer(I8.load_int8(out / "int8")[0], eos))
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for name, cfg in (("int8 torchao weight-only", Int8WeightOnlyConfig()),
                          ("int8 torchao dyn-act", Int8DynamicActivationInt8WeightConfig())):
            m = copy.deepcopy(fp32)
            quantize_(m, cfg)
            v[name] = (None, Q.torch_scorer(m, eos))
    except ImportError:
        print("  torchao not installed: its int8 configs are not measured", file=sys.stderr)
    if L.llama_cpp_available():
        for qtype in ("f32", "f16", "q8_0"):
            path = write_gguf(fp32, tok, out / f"m-{qtype}.gguf", qtype)
            llm = L.load_gguf(path, n_ctx=512, threads=threads, logits_all=True)
            v[f"gguf {qtype} (llama.cpp)"] = (path.stat().st_size, Q.llama_scorer(llm, eos))
    else:
        print(f"  llama-cpp-python missing: {Q.GGUF_HINT}", file=sys.stderr)
    return v


def bench(run: Path, threads: int, repeats: int, gen_tokens: int, val_tokens: int) -> list[dict]:
    """Rows for one model at one thread count."""
    import torch

    from tinystory import quantization as Q
    from tinystory import tokenizer as T

    torch.set_num_threads(threads)
    from tinystory.settings import load_settings

    tok = T.load_tokenizer(run)
    val = Q.val_data(run, None, tok, load_settings(profile="cpu", env={}), val_tokens)
    prompt = tok(PROMPT)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        vs = variants(run, Path(tmp), threads)
        ref = vs["fp32 (transformers)"][1].greedy(prompt, 32, True)
        rows = {}
        for name, (size, sc) in vs.items():
            sc.greedy(prompt, 4, False)  # warm-up
            rows[name] = {"model": name, "size_bytes": size, "bpb": Q.bits_per_byte(sc, val),
                          "greedy32": Q.leading_match(ref, sc.greedy(prompt, 32, True)), "wall": [], "cpu": []}
        for _ in range(repeats):  # interleaved: contention hits every variant alike
            for name, (_, sc) in vs.items():
                w, c = time.perf_counter(), time.process_time()
                sc.greedy(prompt, gen_tokens, False)
                rows[name]["wall"].append(gen_tokens / (time.perf_counter() - w))
                rows[name]["cpu"].append(gen_tokens / max(time.process_time() - c, 1e-9))
    out = list(rows.values())
    for r in out:
        r["tok_s"], r["cpu_tok_s"] = statistics.median(r.pop("wall")), statistics.median(r.pop("cpu"))
        r["threads"] = threads
    b = out[0]  # fp32
    for r in out:
        r["speed_vs_fp32"] = r["tok_s"] / b["tok_s"]
        r["cpu_speed_vs_fp32"] = r["cpu_tok_s"] / b["cpu_tok_s"]
        r["size_vs_fp32"] = r["size_bytes"] / b["size_bytes"] if r["size_bytes"] else None
        r["bpb_vs_fp32"] = r["bpb"] / b["bpb"] - 1
    return out


def table(model: str, rows: list[dict]) -> str:
    lines = [f"\n{model}, {rows[0]['threads']} thread(s)",
             "| path | size MB | size | val bpb | bpb | tok/s | speed | cpu tok/s | cpu speed | greedy 32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "n/a | n/a" if not r["size_bytes"] else f"{r['size_bytes'] / 1e6:.1f} | {100 * r['size_vs_fp32']:.0f}%"
        lines.append(f"| {r['model']} | {size} | {r['bpb']:.4f} | {100 * r['bpb_vs_fp32']:+.2f}% | {r['tok_s']:.1f} | "
                     f"{r['speed_vs_fp32']:.2f}x | {r['cpu_tok_s']:.1f} | {r['cpu_speed_vs_fp32']:.2f}x | "
                     f"{r['greedy32']}/32 |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tinystories-40m,cpu-3m")
    ap.add_argument("--run", action="append", default=[], help="MODEL=RUN_DIR: use a real run for MODEL")
    ap.add_argument("--train-steps", type=int, default=None, help="override the brief training steps")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--val-tokens", type=int, default=8192)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.run)
    result = {"cpu": cpu_name(), "gen_tokens": args.gen_tokens, "val_tokens": args.val_tokens,
              "repeats": args.repeats, "models": {}}
    print(f"CPU: {result['cpu']}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            steps = SETUP[model][1] if args.train_steps is None else args.train_steps
            run = Path(runs[model]) if model in runs else make_run(model, Path(tmp), steps)
            result["models"][model] = {"run": str(run) if model in runs else f"{steps} steps", "rows": []}
            for th in (int(t) for t in args.threads.split(",")):
                rows = bench(run, th, args.repeats, args.gen_tokens, args.val_tokens)
                result["models"][model]["rows"] += rows
                print(table(model, rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
