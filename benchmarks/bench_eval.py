"""Evaluation throughput: loss scoring (tokens/s) and story sampling (stories/s, tokens/s)
for the `tiny` and `cpu-3m` presets with random weights, at 1 and 2 torch threads.

    python benchmarks/bench_eval.py [--repeats 3] [--presets tiny,cpu-3m] [--threads 1,2]

Shapes follow the profiles: tiny = BPE 512, blocks of 64, stories of <= 48 tokens;
cpu-3m = BPE 4096, blocks of 256, stories of <= 200 tokens; batch 8 for both. Random
weights almost never sample EOS, so every story runs to the limit: stories/s is the
worst case, tokens/s the figure that carries over. Each number is the median of
`--repeats` runs. Results go to benchmarks/results/bench_eval.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from importlib import resources
from pathlib import Path

from _common import cpu_name

SHAPES = {  # preset: (bpe vocab, block size, max new tokens)
    "tiny": (512, 64, 48),
    "cpu-3m": (4096, 256, 200),
}
LOSS_TOKENS = 32768
STORIES = 16
BATCH = 8


def sample(split: str, limit: int) -> list[str]:
    name = "valid" if split == "val" else split
    text = gzip.decompress(resources.files("tinystory.sample").joinpath(f"{name}.txt.gz").read_bytes()).decode()
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:limit]


def bench_preset(preset: str, threads: list[int], repeats: int) -> list[dict]:
    import numpy as np
    import torch

    from tinystory.evaluation import generate, score_stream
    from tinystory.model import build_config, build_model, count_parameters
    from tinystory.settings import load_settings
    from tinystory.tokenizer import token_byte_lengths, train_bpe

    vocab, block, new_tokens = SHAPES[preset]
    tok = train_bpe(sample("train", 2000), vocab)
    stream: list[int] = []
    for s in sample("val", 1000):
        stream += [tok.bos_token_id, *tok(s, add_special_tokens=False).input_ids, tok.eos_token_id]
        if len(stream) >= LOSS_TOKENS:
            break
    tokens = np.asarray(stream[:LOSS_TOKENS], dtype=np.uint16)
    torch.manual_seed(0)
    config = build_config(preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = build_model(config).eval()
    ev = load_settings(profile="tiny", env={}).replace(
        eval__max_new_tokens=new_tokens, eval__batch_size=BATCH, eval__num_samples=STORIES).eval
    lengths = token_byte_lengths(tok)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        score_stream(model, tokens[: block * BATCH], block, BATCH, lengths)  # warm-up
        loss_s, gen_s, gen_tokens = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            s = score_stream(model, tokens, block, BATCH, lengths)
            loss_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = generate(model, tok, [[tok.bos_token_id]] * STORIES, ev)
            gen_s.append(time.perf_counter() - t)
            # a story that hit the limit has exactly max_new_tokens; an ended one is re-tokenized (+ EOS)
            gen_tokens.append(sum(len(tok(text, add_special_tokens=False).input_ids) + 1 if ended else new_tokens
                                  for text, ended in out))
        scored = s["blocks"] * block
        rows.append({
            "preset": preset, "parameters": count_parameters(config), "vocab": len(tok), "threads": n,
            "block_size": block, "batch": BATCH, "loss_tokens": scored,
            "loss_tokens_per_s": scored / statistics.median(loss_s),
            "stories": STORIES, "max_new_tokens": new_tokens,
            "stories_per_s": STORIES / statistics.median(gen_s),
            "ended_share": sum(e for _, e in out) / len(out),
            "gen_tokens_per_s": statistics.median(gen_tokens) / statistics.median(gen_s),
            "runs_loss_s": loss_s, "runs_gen_s": gen_s,
        })
        r = rows[-1]
        print(f"{preset:7s} threads={n}  loss {r['loss_tokens_per_s']:10,.0f} tok/s   "
              f"generate {r['stories_per_s']:6.2f} stories/s ({r['gen_tokens_per_s']:7,.0f} tok/s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="tiny,cpu-3m")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    import torch

    from tinystory import __version__

    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, load average before: {' '.join(load)}")
    rows = [r for p in args.presets.split(",") for r in bench_preset(p, [int(t) for t in args.threads.split(",")],
                                                                     args.repeats)]
    result = {"cpu": cpu_name(), "torch": torch.__version__, "tinystory": __version__, "repeats": args.repeats,
              "load_average_before": load, "rows": rows}
    out = Path(__file__).parent / "results" / "bench_eval.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
