"""Scoring a token stream: the sums behind loss, perplexity and bits per byte.

Training's evaluation, `tinystory eval` and `tinystory quantize` all score through
`score_blocks`, so their numbers agree on the same tokens: the stream is cut into
non-overlapping blocks of training's block size, and in each block tokens 2..T are the
targets. `forward` is any ids (B, T) -> logits (B, T, V): a transformers model
(`model_logits`) or llama.cpp's scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinystory.errors import DataError
from tinystory.progress import bar

Forward = Callable[[torch.Tensor], torch.Tensor]  # ids (B, T) -> logits (B, T, V)


def model_logits(model: Any) -> Forward:
    """A causal LM as a `forward` for `score_blocks`."""
    return lambda x: model(input_ids=x, use_cache=False).logits


def score_blocks(
    forward: Forward, tokens: np.ndarray, block_size: int, batch_size: int,
    byte_lengths: np.ndarray, device: Any = "cpu", what: str | None = None, bpb_se: bool = False,
) -> dict[str, float]:
    """Sums of nats over a token stream cut into non-overlapping `block_size` blocks (the
    ragged tail dropped), as training sees it.

    Returns nats/tokens over all targets, and text_nats/text_tokens/bytes over the text
    targets (those with UTF-8 bytes: specials are left out of both sums of bits per
    byte), plus the number of blocks. `what` names a transient progress bar. `bpb_se`: also
    `bpb_se`, the standard error of bits per byte from its spread over the blocks (how far
    a sample of blocks may sit from the stream it was drawn from).
    """
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise DataError(f"only {len(tokens)} validation tokens, fewer than one block of {block_size}",
                        "use more validation data or raise --max-tokens")
    nbytes = torch.from_numpy(np.asarray(byte_lengths, dtype=np.int64))
    sums: dict[str, float] = dict(nats=0.0, tokens=0, text_nats=0.0, text_tokens=0, bytes=0, blocks=n_blocks)
    block_nats, block_bytes = [], []  # per block, for bpb_se
    with torch.no_grad(), bar(n_blocks, what or "") as advance:
        for first in range(0, n_blocks, batch_size):
            B = min(batch_size, n_blocks - first)
            chunk = np.asarray(tokens[first * block_size : (first + B) * block_size], dtype=np.int64)
            x = torch.from_numpy(chunk).view(B, block_size).to(device)  # (B, T)
            logits = forward(x).float()  # (B, T, V)
            targets = x[:, 1:].reshape(-1)  # (B*(T-1),)
            nats = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.to(logits.device),
                                   reduction="none").cpu().double()  # (B*(T-1),) (no float64 on MPS)
            b = nbytes[targets.cpu()]  # (B*(T-1),) 0 for specials
            text = b > 0
            sums["nats"] += nats.sum().item()
            sums["tokens"] += targets.numel()
            sums["text_nats"] += nats[text].sum().item()
            sums["text_tokens"] += int(text.sum())
            sums["bytes"] += int(b.sum())
            if bpb_se:
                block_nats += (nats * text).view(B, -1).sum(1).tolist()
                block_bytes += b.view(B, -1).sum(1).tolist()
            advance(B)
    if bpb_se:
        sums["bpb_se"] = _ratio_se(np.array(block_nats), np.array(block_bytes)) / math.log(2)
    return sums


def _ratio_se(num: np.ndarray, den: np.ndarray) -> float:
    """Standard error of sum(num) / sum(den) over n sampled units (the ratio estimator's
    linearised variance), 0 with fewer than two units."""
    n = len(num)
    if n < 2 or den.sum() <= 0:
        return 0.0
    r = num.sum() / den.sum()
    resid = num - r * den
    return float(np.sqrt(resid.var(ddof=1) / n) / den.mean())


def score_stream(
    model: Any, tokens: np.ndarray, block_size: int, batch_size: int,
    byte_lengths: np.ndarray, device: Any = "cpu", what: str | None = "scoring", bpb_se: bool = False,
) -> dict[str, float]:
    """`score_blocks` over a causal LM, in eval mode (its train/eval mode restored after)."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return score_blocks(model_logits(model), tokens, block_size, batch_size, byte_lengths, device, what, bpb_se)
    finally:
        model.train(was_training)
