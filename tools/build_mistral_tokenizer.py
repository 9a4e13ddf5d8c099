"""Build the Mistral v1 tokenizer that tinystory ships: src/tinystory/mistral/tokenizer.json.gz.

    python tools/build_mistral_tokenizer.py [--check-text FILE_OR_FOLDER ...]

Run it when transformers' conversion or `tokenizers` changes; it needs the dev extra
(transformers' converter reads the sentencepiece model through protobuf). The users of
tinystory never convert anything: they load the file this writes.

From `tokenizer.model` beside it (Mistral-7B-v0.1's sentencepiece model, as shipped by the
mistral-common package), it:

1. converts it with transformers (`LlamaTokenizer`, the tokenizers backend);
2. makes it tokenize exactly as sentencepiece does, in two places where the conversion
   does not:
   - merge priority: sentencepiece merges the pair whose result has the highest score;
     the conversion ranks the 15 pieces made only of `▁` (score -1e9, merged last by
     sentencepiece) first, so "said.  And" gave "▁▁", "And" instead of "▁", "▁And"
     (25 of the 8,704 shared TinyStories stories differed). The merges are re-ranked by
     the score of the piece they make (ties: the lower id first).
   - the dummy prefix: sentencepiece puts a `▁` in front of every text; the conversion's
     Metaspace pre-tokenizer skips it when the text already starts with a space or `▁`
     (" x" gave "▁x", sentencepiece "▁▁x"). A Prepend + Replace normalizer (the form of
     Mistral-7B-v0.1's own tokenizer.json on the Hub) adds it always;
3. saves it as a plain `PreTrainedTokenizerFast` (transformers' `LlamaTokenizer` class
   would rebuild the Metaspace on load) and checks the ids against sentencepiece on every
   story of the bundled sample, of any `--check-text` files (e.g. the TinyStories text),
   and on awkward strings; any difference stops the build;
4. writes tokenizer.json gzip'd (no timestamp, so the same input gives the same bytes)
   and tokenizer_config.json.

(Texts that contain the strings `<s>`, `</s>` or `<unk>` still differ: a transformers
tokenizer reads those as the special tokens, sentencepiece as text.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "src" / "tinystory" / "mistral"
SEP = "<|endoftext|>"
AWKWARD = [
    "", " ", "  ", "   a", "a  b", "a   b", "\n", "\n\n", " \n ", "end.\n\nThe", "Hello\tworld", "trailing   ",
    "  leading", "▁", "▁ ▁ ▁ ▁ ▁", "▁x", " ▁x", "日本語のテキスト", "emoji 😀🎉", "🐈‍⬛", "\x00\x01", "ÿþ", "a\r\nb",
    "It's 3.14159!", "Ünïcödé", "\u200b", "x" * 1000, "said.  And then", "\"Hi!\"  she said.   \n  Then.",
]


def convert(model: Path) -> dict:
    """transformers' conversion of the sentencepiece model, as a tokenizer.json dict."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False, legacy=False)
    return json.loads(tok.backend_tokenizer.to_str())


def make_exact(data: dict, sp) -> dict:
    """The two changes of step 2 (see the module docstring)."""
    score = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    vocab = data["model"]["vocab"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in data["model"]["merges"]]
    data["model"]["merges"] = sorted(merges, key=lambda m: (-score[m[0] + m[1]], vocab[m[0] + m[1]]))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}
    data["pre_tokenizer"] = None
    return data


def stories(path: Path) -> list[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    out = []
    for f in files:
        raw = f.read_bytes()
        text = (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("utf-8")
        out += [s.strip() for s in text.split(SEP) if s.strip()]
    return out


def check(folder: Path, sp, texts: list[str]) -> None:
    """The saved tokenizer gives sentencepiece's ids on every text, else SystemExit."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    theirs = sp.encode(texts)
    bad = [t for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    if bad:
        sys.exit(f"{len(bad)} of {len(texts)} texts differ from sentencepiece, e.g. {bad[0][:80]!r}")
    assert tok("Once upon a time")["input_ids"][0] == tok.bos_token_id == 1
    print(f"identical ids on {len(texts):,} texts", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-text", type=Path, action="append", default=[],
                    help="more text to compare with sentencepiece (.txt with <|endoftext|> lines, or a folder)")
    args = ap.parse_args()
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    model = FOLDER / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    core = Tokenizer.from_str(json.dumps(make_exact(convert(model), sp)))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>", model_max_length=1 << 30, clean_up_tokenization_spaces=False)
    texts = stories(FOLDER.parent / "sample" / "train.txt.gz") + stories(FOLDER.parent / "sample" / "valid.txt.gz")
    for path in args.check_text:
        texts += stories(path)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        check(Path(tmp), sp, texts + AWKWARD)
        raw = Path(tmp, "tokenizer.json").read_bytes()
        (FOLDER / "tokenizer.json.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        shutil.copyfile(Path(tmp, "tokenizer_config.json"), FOLDER / "tokenizer_config.json")
    print(f"wrote {FOLDER / 'tokenizer.json.gz'} ({len(raw) / 1e6:.2f} MB -> "
          f"{(FOLDER / 'tokenizer.json.gz').stat().st_size / 1e6:.2f} MB) and tokenizer_config.json")


if __name__ == "__main__":
    main()
