"""Tokenizers: the Mistral v1 32k vocab, or a byte-level BPE trained on the data.

Both come out as transformers fast tokenizers with unk 0, bos 1, eos 2 (pad = eos), that
add BOS in front of a text by default (so a plain `AutoTokenizer` user of a run dir feeds
the model what it was trained on: every story is BOS + text + EOS in the token stream).

- `mistral`: Mistral-7B-v0.1's vocab, shipped in the package (`tinystory/mistral/`: the
  sentencepiece `tokenizer.model` and the `tokenizer.json` built from it by
  tools/build_mistral_tokenizer.py, which gives sentencepiece's ids exactly). Nothing is
  converted on the user's machine, and nothing is fetched.
- `bpe:N`: `tokenizers` byte-level BPE, ByteLevel pre-tokenizer without prefix space (so a
  GGUF `gpt2` vocab with the `gpt-2` pre-tokenizer reproduces it in llama.cpp).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, cast

from tinystory.errors import SettingsError, TinystoryError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase

SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in both vocabularies
BPE_MIN_VOCAB = 256 + len(SPECIALS) + 1


def parse_spec(spec: str) -> tuple[str, int | None]:
    """`mistral` -> ("mistral", None); `bpe:4096` -> ("bpe", 4096); else SettingsError."""
    spec = spec.strip().lower()
    if spec == "mistral":
        return "mistral", None
    m = re.fullmatch(r"bpe:(\d+)", spec)
    if m:
        n = int(m.group(1))
        if n < BPE_MIN_VOCAB or n > 1 << 20:
            raise SettingsError(f"bpe vocab size {n} is out of range",
                                f"use bpe:N with {BPE_MIN_VOCAB} <= N <= 1048576")
        return "bpe", n
    raise SettingsError(f"unknown tokenizer {spec!r}", "use `mistral` or `bpe:N` (e.g. bpe:4096)")


def mistral_model_file() -> Path:
    """Mistral-7B-v0.1's sentencepiece model, shipped in the package (`tinystory/mistral/`):
    what the GGUF export reads the vocab's scores and token types from."""
    return Path(str(resources.files("tinystory.mistral").joinpath("tokenizer.model")))


def load_mistral() -> PreTrainedTokenizerBase:
    """The Mistral v1 tokenizer, as shipped in the package (see `mistral_folder`)."""
    tok = load_tokenizer(mistral_folder())
    tok.name_or_path = "mistral"
    return tok


@functools.cache
def mistral_version() -> str:
    """Which shipped Mistral tokenizer this is: the first 16 hex digits of the sha256 of
    its packed tokenizer.json (~2 ms)."""
    packed = resources.files("tinystory.mistral").joinpath("tokenizer.json.gz").read_bytes()
    return hashlib.sha256(packed).hexdigest()[:16]


def mistral_folder() -> Path:
    """The shipped Mistral tokenizer's files (tokenizer.json, tokenizer_config.json) in the
    cache, unpacked on first use (~0.02 s): `prepare` keeps its description and a copy that
    loads sooner beside them, which the package folder (maybe read-only) could not hold.
    Keyed by the sha256 of the shipped tokenizer.json.gz, so a new release unpacks anew.
    Reading it back needs only `tokenizers`: `prepare` with the Mistral tokenizer starts
    without importing transformers. (tools/build_mistral_tokenizer.py makes the shipped
    file from the sentencepiece model: no conversion, protobuf or sentencepiece at run time.)"""
    from tinystory.paths import cache_dir

    shipped = resources.files("tinystory.mistral")
    folder = cache_dir() / "tokenizers" / f"mistral-v1-{mistral_version()}"
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    packed = shipped.joinpath("tokenizer.json.gz").read_bytes()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        (tmp / "tokenizer.json").write_bytes(gzip.decompress(packed))
        (tmp / "tokenizer_config.json").write_bytes(shipped.joinpath("tokenizer_config.json").read_bytes())
        try:
            tmp.rename(folder)  # whole, or not at all
        except OSError:  # another process made it first
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def quick_load_file(folder: Path) -> Path:
    """The folder's tokenizer.json written to load sooner, for `prepare`'s encoders: merges
    as "a b" strings and no indentation (the Mistral vocab loads in ~0.06 s instead of ~0.09 s
    in a new process, and every worker loads it before its first block). Made once beside
    tokenizer.json, named by a hash of its bytes (so it never outlives them); used only when
    it loads into the very same tokenizer (same serialization), else tokenizer.json itself
    is the answer."""
    path = folder / "tokenizer.json"
    raw = path.read_bytes()
    dest = folder / f"tokenizer.quick-{hashlib.sha256(raw).hexdigest()[:16]}.json"
    if dest.is_file():
        return dest
    data = json.loads(raw)
    merges = (data.get("model") or {}).get("merges")
    if not merges or not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return path  # nothing to gain, or a token with a space ("a b" would be ambiguous)
    data["model"]["merges"] = [" ".join(m) for m in merges]
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    from tokenizers import Tokenizer

    if Tokenizer.from_str(text).to_str() != Tokenizer.from_str(raw.decode("utf-8")).to_str():
        return path
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest)  # whole, or not at all
    except OSError:  # a read-only or full cache: load the original, as before
        with contextlib.suppress(OSError):
            tmp.unlink()
        return path
    return dest


@dataclass(frozen=True)
class TokenizerFiles:
    """What `prepare` records of a saved tokenizer, read from its JSON files alone."""

    folder: Path
    sha256: str  # = fingerprint() of the loaded tokenizer
    vocab_size: int  # = len() of the loaded tokenizer (added tokens included)
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chunking: str | None = None  # how `encoder.ChunkEncoder` may cut text for it (`chunk_kind`)

    @property
    def dtype(self) -> str:
        """The token dtype of a prepared stream: uint16 when every id fits."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


DESCRIPTION = "tinystory-description.json"  # describe_files(memo=True) keeps its answer here
DESCRIPTION_VERSION = 3  # bump when TokenizerFiles or chunk_kind changes


def describe_files(folder: str | Path, memo: bool = False) -> TokenizerFiles:
    """A `TokenizerFiles` for a folder written by `save` (or `save_pretrained`), from the JSON
    alone (no tokenizer is built: `prepare` starts its workers sooner).

    memo: keep the answer in the folder (a cache folder such as `mistral_folder`'s), keyed by
    the sha256 of the two files' bytes, and reuse it while they are unchanged: parsing and
    hashing the Mistral tokenizer.json costs ~0.2 s at every `prepare`, hashing its bytes
    ~5 ms."""
    folder = Path(folder)
    raw = (folder / "tokenizer.json").read_bytes()
    raw_config = (folder / "tokenizer_config.json").read_bytes()
    key = f"{DESCRIPTION_VERSION}-" + hashlib.sha256(hashlib.sha256(raw).digest() + raw_config).hexdigest()
    if memo:
        try:
            kept = json.loads((folder / DESCRIPTION).read_text(encoding="utf-8"))
            if kept.pop("key") == key:
                return TokenizerFiles(folder, **kept)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # none yet, or unreadable: work it out again
    files = _describe(folder, json.loads(raw), json.loads(raw_config))
    if memo:
        _keep(folder / DESCRIPTION, {"key": key, **{k: v for k, v in vars(files).items() if k != "folder"}})
    return files


def _describe(folder: Path, data: dict, config: dict) -> TokenizerFiles:
    from tinystory.encoder import chunk_kind

    vocab = data["model"].get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {piece: i for i, (piece, _) in enumerate(vocab)}  # BPE | Unigram
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})

    def token_id(name: str) -> int | None:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return ids.get(token) if token else None

    return TokenizerFiles(folder, _sha256_of(data), len(ids), token_id("unk_token"), token_id("bos_token"),
                          token_id("eos_token"), token_id("pad_token"), chunk_kind(data))


def _keep(path: Path, value: dict) -> None:
    """Write `value` as JSON to `path` through a temp file and a rename; a read-only folder
    only costs the time saved."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on `texts` (deterministic for the same texts in the same order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer, length=length)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=1 << 30,
    )
    tok.name_or_path = f"bpe:{vocab_size}"
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by `save` (a run dir or a prepared-data folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise TinystoryError(f"no tokenizer in {path} (tokenizer.json is missing)", "prepare or train again")
    return AutoTokenizer.from_pretrained(str(path))


def decode(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> str:
    """The text of `ids`, special tokens left out (`tokenizer.decode` of one sequence)."""
    return cast(str, tokenizer.decode(list(ids), skip_special_tokens=True))


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's canonical JSON: equal iff the two tokenize the same way."""
    return _sha256_of(json.loads(tokenizer.backend_tokenizer.to_str()))


def _sha256_of(data: object) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for a byte-level BPE (GPT-2 style), False for a sentencepiece-style vocab."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """UTF-8 bytes each token id stands for (specials 0): the denominator of bits per byte.
    Byte-level BPE pieces spell one byte per character; sentencepiece pieces spell
    text with `▁` for a space and `<0xNN>` for a raw byte.
    """
    import numpy as np

    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=np.int64)
    byte_level = is_byte_level(tokenizer)
    specials = set(tokenizer.all_special_ids)
    for piece, idx in vocab.items():
        if idx in specials:
            continue
        if byte_level:
            lengths[idx] = len(piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            lengths[idx] = 1
        else:
            lengths[idx] = len(piece.replace("▁", " ").encode("utf-8"))
    return lengths
