"""llama2.c's best TinyStories recipe for a CPU, as a plain PyTorch loop over its own model.

    python benchmarks/llama2c_baseline.py --out RESULT.json [--minutes 15] [--train GLOB] [--valid FILE]

The baseline of `bench_train.py --time-to-target`. Everything llama2.c does for this model
is kept: its `model.py` (benchmarks/llama2c/, MIT licence, unchanged), a sentencepiece
BPE 4096 trained on the training text with the settings of its `tinystories.py
train_vocab`, each story encoded as BOS + ids (no EOS), the tokens of all stories in one
stream cut into non-overlapping 257-token chunks read in a shuffled order (its
`PretokDataset`), dim 192, 6 layers, 6 heads, batch 16, AdamW (0.9, 0.95) with weight
decay 0.1 on 2-D tensors (its `configure_optimizers`), lr 2e-3 after 100 warmup steps,
cosine to 0 over the wall-time budget (its `get_lr`, with time in place of iterations),
gradient clipping at 1.0, 2 threads. The precision is the faster of fp32 and bf16
autocast in a short probe, as `tinystory train` picks it.

After the budget: bits per byte on the whole validation file, each story BOS + ids in one
stream cut into non-overlapping 256-token blocks (as tinystory's eval scores its own
val.bin; the last, shorter block scored too): the nats of the text targets (not BOS) over
the UTF-8 bytes of the stories as the file holds them, the denominator tinystory's bits
per byte has on the same file.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "llama2c"))
from model import ModelArgs, Transformer  # llama2.c's model.py

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
SEQ, BATCH, LR, WARMUP, WD, CLIP = 256, 16, 2e-3, 100, 0.1, 1.0


def stories(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]


def train_tokenizer(texts: list[str], folder: Path) -> spm.SentencePieceProcessor:
    """tinystories.py train_vocab(4096): its sentencepiece settings, on these stories."""
    corpus = folder / "tiny.txt"
    corpus.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tok4096"), model_type="bpe", vocab_size=4096,
        self_test_sample_size=0, input_format="text", character_coverage=1.0, num_threads=2, split_digits=True,
        allow_whitespace_only_pieces=True, byte_fallback=True, unk_surface=r" \342\201\207 ",
        normalization_rule_name="identity", minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "tok4096.model"))


def encode(sp: spm.SentencePieceProcessor, texts: list[str]) -> np.ndarray:
    """BOS + ids of each story, one stream (tinystories.py process_shard)."""
    ids: list[int] = []
    for enc in sp.encode(texts):
        ids += [sp.bos_id(), *enc]
    return np.asarray(ids, dtype=np.int64)


def piece_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """UTF-8 bytes each id decodes to (control tokens 0, byte-fallback pieces 1)."""
    out = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def batches(stream: np.ndarray, rng: random.Random):  # type: ignore[no-untyped-def]
    """PretokDataset: non-overlapping SEQ+1 chunks in a shuffled order, epoch after epoch."""
    n = (len(stream) - 1) // SEQ
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for first in range(0, n - BATCH + 1, BATCH):
            chunk = np.stack([stream[i * SEQ: i * SEQ + SEQ + 1] for i in order[first:first + BATCH]])
            t = torch.from_numpy(chunk)
            yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


def lr_at(step: int, elapsed: float, budget: float) -> float:
    """train.py get_lr, with the fraction of the wall-time budget in place of iterations."""
    if step < WARMUP:
        return LR * step / WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / budget))) * LR


def probe_precision(model: Transformer, data) -> str:  # type: ignore[no-untyped-def]
    """fp32 or bf16 autocast, whichever steps faster (3 timed steps after 2 warm-up ones)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    times = {}
    for name in ("fp32", "bf16"):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16")
        for i in range(5):
            if i == 2:
                t0 = time.perf_counter()
            x, y = next(data)
            with ctx:
                model(x, y)
            model.last_loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times[name] = time.perf_counter() - t0
    return min(times, key=times.__getitem__)


def bits_per_byte(model: Transformer, stream: np.ndarray, text_bytes: int, bos: int, precision: str) -> dict:
    """The whole stream in SEQ-token blocks (the last one shorter), targets 2..T of each;
    nats of the non-BOS targets over the UTF-8 bytes of the stories as written in the file.
    (sentencepiece's normalisation drops some whitespace, newlines among it, so the bytes
    its tokens decode to are fewer: dividing by those would flatter llama2.c's figure.)"""
    nats = text_nats = 0.0
    tokens = 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        starts = list(range(0, len(stream) - 1, SEQ))
        full = [i for i in starts if i + SEQ <= len(stream)]
        groups = [full[j:j + BATCH] for j in range(0, len(full), BATCH)] + [[i] for i in starts if i not in full]
        for group in groups:
            x = torch.from_numpy(np.stack([stream[i:i + SEQ] for i in group]))
            logits = model(x, x).float()  # with targets: logits at every position
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                   reduction="none").double()
            text = x[:, 1:].reshape(-1) != bos
            nats += loss.sum().item()
            text_nats += loss[text].sum().item()
            tokens += loss.numel()
    return {"loss": nats / tokens, "bpb": text_nats / math.log(2) / text_bytes, "tokens": len(stream),
            "bytes": text_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--train", default=str(SHARED / "train-*.txt"))
    ap.add_argument("--valid", type=Path, default=SHARED / "valid.txt")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    train_texts = [s for f in sorted(glob.glob(args.train)) for s in stories(Path(f))]
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tokenizer(train_texts, Path(tmp))
    stream = encode(sp, train_texts)
    valid = encode(sp, stories(args.valid))
    prep_s = time.monotonic() - t_start
    model = Transformer(ModelArgs(dim=192, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096, multiple_of=32,
                                  max_seq_len=SEQ, dropout=0.0))
    params = sum(p.numel() for p in model.parameters())
    data = batches(stream, random.Random(args.seed))
    precision = probe_precision(model, data)
    model = Transformer(ModelArgs(dim=192, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096, multiple_of=32,
                                  max_seq_len=SEQ, dropout=0.0))  # fresh weights after the probe
    opt = model.configure_optimizers(WD, LR, (0.9, 0.95), "cpu")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    budget = args.minutes * 60
    step, t0 = 0, time.monotonic()
    model.train()
    while (elapsed := time.monotonic() - t0) < budget:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, elapsed, budget)
        x, y = next(data)
        with ctx:
            model(x, y)
        model.last_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 500 == 0:
            print(f"llama2.c step {step}: loss {model.last_loss.item():.4f}, {elapsed:.0f} s", file=sys.stderr)
    train_s = time.monotonic() - t0
    valid_bytes = sum(len(t.encode("utf-8")) for t in stories(args.valid))
    scores = bits_per_byte(model, valid, valid_bytes, sp.bos_id(), precision)
    decoded = int(piece_bytes(sp)[valid].sum())  # what its tokens decode to, for the record
    result = {"recipe": "llama2.c model.py, dim 192, 6 layers, 6 heads, BPE 4096 (sentencepiece), batch 16 x 256, "
                        "lr 2e-3, 100 warmup steps, cosine over the budget, AdamW (0.9, 0.95), wd 0.1, clip 1.0",
              "parameters": params, "precision": precision, "minutes": args.minutes, "steps": step,
              "tokens_seen": step * BATCH * SEQ, "tok_per_s": step * BATCH * SEQ / train_s, "train_s": train_s,
              "prepare_s": prep_s, "train_tokens": len(stream), "valid": args.valid.name,  # no paths of this machine
              "valid_bytes_tokens_decode_to": decoded, **{f"valid_{k}": v for k, v in scores.items()}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"llama2.c: {step} steps in {train_s:.0f} s ({result['tok_per_s']:,.0f} tok/s, {precision}); "
          f"bpb {scores['bpb']:.4f} on {args.valid.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
