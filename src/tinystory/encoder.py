"""Exact token ids for many stories, fast: a chunk cache in front of the fast tokenizer.

HF `tokenizers` spends most of its time on bookkeeping (normalized strings, alignments),
not on BPE: on TinyStories it encodes ~0.7M tokens/s on one core, slower than
sentencepiece's ~1.6M. Stories reuse a small vocabulary of words, so we cut each text into
chunks that BPE never merges across, tokenize each distinct chunk once with the real
tokenizer, and assemble the ids with one `bytes.join`. The ids are the tokenizer's own, exactly
(tests/test_prepare.py compares them on real and on awkward text):

- sentencepiece style (Metaspace pre-tokenizer without splitting, e.g. the Mistral vocab):
  no vocab piece has a `▁` right after another character, so no token crosses the start
  of a run of spaces. A chunk is that run plus the text up to the next space; the key is
  the chunk without its first space, and every key is encoded as " " + key (the same ids
  whether the chunk opens the text or not: Metaspace "first" adds no `▁` to a text that
  already starts with one). Plain texts (single spaces, no `▁`) of a batch are cut all at
  once: joined with " \x00 " (the key "\x00" stands for EOS + BOS) and split at spaces.
  When a newline is the byte piece <0x0A> and in no merge (kind "space+newline", the
  Mistral vocab), chunks are cut before every newline too ("end.\n\nThe" -> "end.", "\n",
  "\nThe"; such a key is tokenized as it is, without the ▁): ~30% fewer distinct keys on
  TinyStories. A new key goes straight to the BPE model, as it is met (`SpaceChunks`).
- byte-level BPE (GPT-2 regex pre-tokenizer): BPE runs inside each regex match anyway; a
  chunk is one match (Python's `re` for ASCII text, which is faster, `regex` otherwise).
  The same holds for a sentencepiece vocab written as a Prepend("▁") + Replace(" ", "▁")
  normalizer with no pre-tokenizer (the Mistral tokenizer we ship, kind "...+prepend"):
  it always adds the ▁ in front, so a text that starts with a space or ▁ is cut as
  " " + text (Metaspace "first" adds none to such a text); all else is the same.
- anything else, and texts that contain a special-token string (the tokenizer matches
  those before pre-tokenizing) or a NUL: the tokenizer's own `encode_batch_fast`.

Also the worker processes of `prepare` (`python -m tinystory.encoder`, see `worker_main` and
`serve`). No numpy here: a worker starts ~0.06 s sooner without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

SPACE_CHUNK = re.compile(r"[ ▁]*[^ ▁]+|[ ▁]+")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same pattern for pure-ASCII text: \p{L} = [A-Za-z], \p{N} = [0-9], and both engines'
# \s is [\t\n\v\f\r ] there.
GPT2_ASCII = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII)
BOS_KEY, EOS_KEY = None, 0  # never equal to a str chunk key
JOIN_KEY = "\x00"  # between two plain texts: EOS + BOS (texts holding a NUL are never cut)
JOINED = " \x00 "
CACHE_LIMIT = 1 << 18  # distinct chunks kept per process (~40 MB at most), then start over
TYPECODES = {"uint16": "H", "uint32": "I"}
SPACE_NEWLINE = "space+newline"  # a "space" kind that may also cut before every newline
PREPEND = "+prepend"  # suffix of a "space" kind whose ▁ comes from a Prepend normalizer
SP_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
AUTO = "auto"


def chunk_kind(spec: dict) -> str | None:
    """'space', 'space+newline' (each maybe + PREPEND), 'bytelevel' or None (no safe
    chunking) for a tokenizer.json dict."""
    model = spec.get("model") or {}
    if (model.get("type") != "BPE" or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        return None
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    normalizer = spec.get("normalizer")
    prepend = normalizer == SP_NORMALIZER and not pre
    if normalizer is not None and not prepend:
        return None
    if prepend or (pre.get("type") == "Metaspace" and pre.get("replacement") == "▁"
                   and pre.get("prepend_scheme") == "first" and not pre.get("split")):
        vocab = model.get("vocab", {})
        crossing = re.compile("[^▁]▁")
        if any(crossing.search(piece) for piece in vocab):
            return None
        # A newline is the byte piece <0x0A> in no merge (the Mistral vocab): no token
        # crosses it either.
        merges = model.get("merges") or []
        newline_byte = (model.get("byte_fallback") and "<0x0A>" in vocab
                        and not any("\n" in piece for piece in vocab)
                        and not any("<0x0A>" in (m if isinstance(m, list) else m.split(" ")) for m in merges))
        return (SPACE_NEWLINE if newline_byte else "space") + (PREPEND if prepend else "")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "bytelevel"
    return None


class ChunkEncoder:
    """BOS + ids + EOS of each text, concatenated, as bytes of `dtype` (or a numpy array).

    tokenizer: tokenizer.json as a string, or the path of the file. kind: its `chunk_kind`
    when the caller knows it already (`prepare` hands it to its workers), else worked out
    from the JSON.
    """

    def __init__(self, tokenizer: str | Path, bos_id: int, eos_id: int, dtype: str = "uint16",
                 cache_limit: int = CACHE_LIMIT, kind: str | None = AUTO) -> None:
        from tokenizers import Tokenizer

        if isinstance(tokenizer, Path):
            self.core = Tokenizer.from_file(str(tokenizer))
        else:
            self.core = Tokenizer.from_str(tokenizer)
        if kind == AUTO:
            text = tokenizer.read_text(encoding="utf-8") if isinstance(tokenizer, Path) else tokenizer
            kind = chunk_kind(json.loads(text))
        self.prepend = kind is not None and kind.endswith(PREPEND)
        kind = kind.removesuffix(PREPEND) if kind else kind
        self.newlines = kind == SPACE_NEWLINE
        self.kind = "space" if self.newlines else kind
        self.specials = tuple(t.content for t in self.core.get_added_tokens_decoder().values())
        self.bos, self.eos, self.typecode = bos_id, eos_id, TYPECODES[dtype]
        self.dtype, self.cache_limit = dtype, cache_limit
        if self.kind == "bytelevel":
            import regex

            self._gpt2 = regex.compile(GPT2_PATTERN)
        if self.kind == "space":
            self._bpe = self.core.model.tokenize  # the BPE model alone (see `SpaceChunks`)
        self._reset()

    def _reset(self) -> None:
        # chunk key -> its ids as bytes of `dtype`: assembling a text is one bytes.join
        known = {BOS_KEY: self._pack([self.bos]), EOS_KEY: self._pack([self.eos]),
                 JOIN_KEY: self._pack([self.eos, self.bos])}
        self.cache: dict = (SpaceChunks(known, self._bpe, self.typecode, self.newlines)
                            if self.kind == "space" else known)

    def _pack(self, ids: list[int]) -> bytes:
        return array(self.typecode, ids).tobytes()

    def keys(self, text: str) -> list[str]:
        """The cache keys of `text`, in order (see the module docstring)."""
        if not text:
            return []
        if self.kind == "space":
            if self.prepend and text[0] in " ▁":  # the ▁ the normalizer always adds
                text = " " + text
            if "  " in text or "▁" in text or text[:1] == " ":
                keys = [c[1:] if c[0] in " ▁" else c for c in SPACE_CHUNK.findall(text)]
                if self.newlines and "\n" in text:  # "a\nb" -> "a", "\nb" (a space run stays whole)
                    keys = [p for k in keys for p in self._lines(k)]
                return keys
            return (text.replace("\n", " \n") if self.newlines else text).split(" ")
        return GPT2_ASCII.findall(text) if text.isascii() else self._gpt2.findall(text)

    @staticmethod
    def _lines(key: str) -> list[str]:
        if "\n" not in key:
            return [key]
        head, *rest = key.split("\n")
        return [head, *("\n" + r for r in rest)]

    def encode(self, texts: list[str]) -> np.ndarray:
        """All `texts` as one token stream (BOS + ids + EOS each), a numpy array."""
        import numpy as np

        return np.frombuffer(self.encode_bytes(texts), dtype=self.dtype)

    def encode_bytes(self, texts: list[str]) -> bytes:
        """`encode`, as the raw bytes written to a .bin file."""
        if self.kind is not None:  # the usual case, checked for the whole batch at once
            whole = "".join(texts)
            if JOIN_KEY not in whole and not any(s in whole for s in self.specials):
                return self._cached(texts)
        parts: list[bytes] = []
        run: list[str] = []
        for text in texts:
            if self.kind is None or JOIN_KEY in text or any(s in text for s in self.specials):
                if run:
                    parts.append(self._cached(run))
                    run = []
                ids = self.core.encode_batch_fast([text], add_special_tokens=False)[0].ids
                parts.append(self._pack([self.bos, *ids, self.eos]))
            else:
                run.append(text)
        if run:
            parts.append(self._cached(run))
        return b"".join(parts)

    def _sequence(self, texts: list[str]) -> list:
        """The keys of BOS + text + EOS of every text, in order."""
        if self.kind != "space":
            runs = [self.keys(text) for text in texts]
        else:  # runs of plain texts are cut all at once, JOINED between them
            runs, plain = [], []
            for text in texts:
                if text and "  " not in text and "▁" not in text and text[0] != " " and text[-1] != " ":
                    plain.append(text)
                    continue
                if plain:
                    runs.append(self._cut(JOINED.join(plain)))
                    plain = []
                runs.append(self.keys(text))
            if plain:
                runs.append(self._cut(JOINED.join(plain)))
        seq: list = []
        add, extend = seq.append, seq.extend
        for keys in runs:
            add(BOS_KEY)
            extend(keys)
            add(EOS_KEY)
        return seq

    def _cut(self, joined: str) -> list[str]:
        return (joined.replace("\n", " \n") if self.newlines else joined).split(" ")

    def _cached(self, texts: list[str]) -> bytes:
        seq = self._sequence(texts)
        if len(self.cache) > self.cache_limit:  # bounded memory on any amount of text
            self._reset()
        if self.kind == "space":  # new keys are tokenized as they are met (`SpaceChunks`)
            return b"".join(map(self.cache.__getitem__, seq))
        try:
            return b"".join(map(self.cache.__getitem__, seq))
        except KeyError:  # new chunks: tokenize each distinct one once
            self._one_by_one([k for k in set(seq) if k not in self.cache], "")
            return b"".join(map(self.cache.__getitem__, seq))

    def _one_by_one(self, keys: list[str], prefix: str) -> None:
        if keys:
            encoded = self.core.encode_batch_fast([prefix + k for k in keys], add_special_tokens=False)
            self.cache.update(zip(keys, (self._pack(e.ids) for e in encoded), strict=True))


class SpaceChunks(dict):
    """The chunk cache of the "space" kinds: a key met for the first time is tokenized on
    the spot, so a block is one pass of lookups (no failed join, no set of new keys).

    What the tokenizer does with " " + key: its Metaspace (split=False) turns the spaces
    into ▁ and adds none (the text starts with one), then the BPE model runs on the result
    as one word. So the model alone (`Model.tokenize`) gives the same ids, without the
    bookkeeping of a full encode. A key cut at a newline ("\nb", see `ChunkEncoder.keys`)
    is tokenized as it is: no ▁.
    """

    def __init__(self, known: dict, bpe: Callable, typecode: str, newlines: bool) -> None:
        super().__init__(known)
        self.bpe, self.typecode, self.newlines = bpe, typecode, newlines

    def __missing__(self, key: str) -> bytes:
        word = key if self.newlines and key[:1] == "\n" else "▁" + key.replace(" ", "▁")
        ids = self[key] = array(self.typecode, [t.id for t in self.bpe(word)]).tobytes()
        return ids


# ---------------------------------------------------------------- spool and workers


def read_spool(path: str | Path, offset: int, nbytes: int) -> list[str]:
    """Stories stored by `prepare` as 4-byte little-endian length + UTF-8 text."""
    with open(path, "rb") as f:
        f.seek(offset)
        buf = f.read(nbytes)
    texts, i, n = [], 0, len(buf)
    while i < n:
        size = int.from_bytes(buf[i : i + 4], "little")
        texts.append(buf[i + 4 : i + 4 + size].decode("utf-8"))
        i += 4 + size
    return texts


def worker_main(argv: list[str]) -> None:
    """`python -m tinystory.encoder TOKENIZER_JSON BOS EOS DTYPE KIND`, a worker of `prepare`
    (`packing.Workers`; KIND: the tokenizer's `chunk_kind`, or `none`): `serve` on stdin and
    stdout, so a killed `prepare` (EOF on stdin) leaves no worker behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    kind = None if argv[4] == "none" else argv[4]
    enc = ChunkEncoder(Path(argv[0]), int(argv[1]), int(argv[2]), argv[3], kind=kind)
    serve(enc, sys.stdin.buffer, sys.stdout.buffer)
    os._exit(0)  # nothing to tear down (~0.02 s with the vocab and the chunk cache): the parent waits for this


def serve(enc: ChunkEncoder, tasks: BinaryIO, out: BinaryIO) -> None:
    """Read "spool<TAB>offset<TAB>nbytes" lines from `tasks` and answer each, in order, on
    `out` with 8 bytes of data length + 8 bytes of story count + the token bytes. Ends at
    EOF on `tasks` (also when the parent dies) or when the parent stops reading."""
    for line in tasks:
        spool, offset, nbytes = line.decode("utf-8").rstrip("\n").rsplit("\t", 2)
        texts = read_spool(spool, int(offset), int(nbytes))
        data = enc.encode_bytes(texts)
        try:
            out.write(len(data).to_bytes(8, "little") + len(texts).to_bytes(8, "little"))
            out.write(data)
            out.flush()
        except BrokenPipeError:  # the parent is gone
            return


if __name__ == "__main__":
    worker_main(sys.argv[1:])
