"""Prepared data: reading the packed token streams that `tinystory prepare` writes.

A prepared folder holds `train.bin` and `val.bin` (one token stream each, every story as
BOS + tokens + EOS, dtype from meta.json), `meta.json` and the tokenizer files. Training
and evaluation cut it into fixed-length blocks: no padding, nothing wasted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory.errors import DataError
from tinystory.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

META = "meta.json"
SPLITS = ("train", "val")
ITEMSIZE = {"uint16": 2, "uint32": 4}  # the token dtypes of a prepared stream


@dataclass(frozen=True)
class PreparedData:
    """A prepared-data folder, validated on open."""

    path: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> np.ndarray:
        """The whole token stream of `split` as a read-only memmap (no copy)."""
        import numpy as np

        return np.memmap(self.path / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.path)

    def check_ids(self, split: str, vocab_size: int, tokens: np.ndarray | None = None) -> None:
        """DataError unless every token id of `split` (or of `tokens` cut from it) is below
        `vocab_size`: a garbled .bin file, or one made with another tokenizer."""
        import numpy as np

        ids = self.tokens(split) if tokens is None else tokens
        top = int(np.max(ids)) if len(ids) else 0
        if top >= vocab_size:
            raise DataError(f"{self.path / (split + '.bin')} holds token id {top}, beyond the tokenizer's "
                            f"{vocab_size:,}: the file is damaged or was made with another tokenizer",
                            "prepare again with --force")

    @property
    def tokenizer_name(self) -> str:
        return self.meta["tokenizer"]["name"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer"]["sha256"]


def open_prepared(path: str | Path) -> PreparedData:
    """Open a prepared folder, or raise DataError saying what is missing and what to run."""
    path = Path(path).expanduser()
    fix = "run `tinystory prepare` (or pass --data to a prepared folder)"
    if not path.is_dir():
        raise DataError(f"prepared data {path} does not exist", fix)
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(f"{path} is not prepared data (no {META})", fix)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise DataError(f"{meta_path} is corrupt", "prepare again with --force") from None
    itemsize = ITEMSIZE.get(meta.get("dtype", "uint16"))  # (no numpy: `prepare` checks this at start)
    if itemsize is None:
        raise DataError(f"{meta_path} names an unknown dtype {meta.get('dtype')!r}", "prepare again with --force")
    for split in SPLITS:
        f = path / f"{split}.bin"
        expected = meta.get("splits", {}).get(split, {}).get("tokens")
        if not f.is_file() or expected is None or f.stat().st_size != expected * itemsize:
            raise DataError(f"{f} is missing or incomplete", "prepare again with --force")
    return PreparedData(path=path, meta=meta)


class BlockDataset:
    """Non-overlapping `block_size` windows of a token stream, for the HF Trainer.

    Item i is `{"input_ids": tokens[i*T:(i+1)*T], "labels": same}` as int64 tensors;
    the model shifts labels itself. The ragged tail (< T tokens) is dropped.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, limit_tokens: int = 0, vocab_size: int = 0) -> None:
        if limit_tokens:
            tokens = tokens[:limit_tokens]
        self.tokens = tokens
        self.block_size = block_size
        self.vocab_size = vocab_size  # > 0: every block is checked for ids beyond it (a damaged file)
        self.n_blocks = len(tokens) // block_size
        if self.n_blocks == 0:
            raise DataError(
                f"only {len(tokens)} tokens, fewer than one block of {block_size}",
                "use more data or a smaller train.block_size",
            )

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch

        if i < 0 or i >= self.n_blocks:
            raise IndexError(i)
        T = self.block_size
        block = torch.from_numpy(np.asarray(self.tokens[i * T : (i + 1) * T], dtype=np.int64))  # (T,)
        if self.vocab_size and int(block.max()) >= self.vocab_size:
            raise DataError(f"the training data holds token id {int(block.max())}, beyond the tokenizer's "
                            f"{self.vocab_size:,}: the file is damaged or was made with another tokenizer",
                            "prepare again with --force")
        return {"input_ids": block, "labels": block}
