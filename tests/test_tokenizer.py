"""Tokenizers: Mistral ids pinned, BPE deterministic and reloadable, byte lengths exact."""

from __future__ import annotations

import pytest
from conftest import sample_stories

from tinystory import tokenizer as T
from tinystory.errors import SettingsError

SENTENCE = "Once upon a time, there was a little girl."
# Mistral-7B-v0.1 / sentencepiece ids for SENTENCE, with BOS (DESIGN.md)
MISTRAL_IDS = [1, 5713, 3714, 264, 727, 28725, 736, 403, 264, 1628, 2746, 28723]


@pytest.fixture(scope="module")
def mistral():
    return T.load_mistral()


def test_mistral_ids_are_pinned(mistral):
    assert mistral(SENTENCE)["input_ids"] == MISTRAL_IDS
    assert (mistral.unk_token_id, mistral.bos_token_id, mistral.eos_token_id) == (0, 1, 2)
    assert len(mistral) == 32000


# Strings where a plain conversion of the sentencepiece model goes wrong (leading spaces, a
# literal ▁, runs of spaces: see tools/build_mistral_tokenizer.py) and other awkward text,
# with sentencepiece's ids (no BOS), pinned.
AWKWARD = {
    " ": [259],
    "  ": [2287],
    "   a": [2287, 264],
    "a  b": [264, 28705, 287],
    "said.  And then": [773, 28723, 28705, 1015, 868],
    " \n ": [259, 13, 28705],
    "  leading": [259, 5374],
    "▁ ▁ ▁ ▁ ▁": [756],
    "▁x": [28705, 1318],
    "end.\n\nThe": [948, 28723, 13, 13, 1014],
    "Hello\tworld": [22557, 12, 9471],
    "trailing   ": [27166, 2287],
    "emoji 😀": [877, 27813, 28705, 30575],
    "\x00": [28705, 3],
    "Ünïcödé": [13156, 28711, 28920, 28717, 14697, 28797],
}


def test_mistral_matches_sentencepiece_on_all_the_shared_text(mistral):
    """Every story of the shared TinyStories text (and the bundled sample) and the awkward
    strings give sentencepiece's ids exactly: the shipped tokenizer.json was built for it."""
    import sentencepiece as spm
    from conftest import SHARED

    sp = spm.SentencePieceProcessor(model_file=str(T.mistral_model_file()))
    stories = sample_stories("train") + sample_stories("val")
    for f in sorted(SHARED.glob("*.txt")):
        stories += [s.strip() for s in f.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    assert len(stories) > 17000
    ours = mistral(stories, add_special_tokens=False)["input_ids"]
    theirs = sp.encode(stories)
    assert sum(a != b for a, b in zip(ours, theirs, strict=True)) == 0
    texts = list(AWKWARD)
    assert sp.encode(texts) == list(AWKWARD.values())
    assert mistral(texts, add_special_tokens=False)["input_ids"] == list(AWKWARD.values())


def test_mistral_reads_special_token_strings_as_specials(mistral):
    # the one known difference from sentencepiece (which reads "</s>" as text): a transformers
    # tokenizer matches its special tokens in the text
    assert mistral("a</s>", add_special_tokens=False)["input_ids"] == [264, 2]


def test_mistral_survives_save_and_auto_load(mistral, tmp_path):
    mistral.save_pretrained(tmp_path)
    back = T.load_tokenizer(tmp_path)
    assert back(SENTENCE)["input_ids"] == MISTRAL_IDS
    assert T.fingerprint(back) == T.fingerprint(mistral)


def test_bpe_is_deterministic_and_reloads(tmp_path):
    texts = sample_stories("train", 300)
    a, b = T.train_bpe(texts, 600), T.train_bpe(texts, 600)
    assert T.fingerprint(a) == T.fingerprint(b)
    assert len(a) == 600
    assert (a.unk_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    a.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path)
    ids = back(SENTENCE)["input_ids"]
    assert ids[0] == 1 and ids == a(SENTENCE)["input_ids"]
    assert back.decode(ids, skip_special_tokens=True) == SENTENCE


@pytest.mark.parametrize("which", ["mistral", "bpe"])
def test_token_byte_lengths_add_up_to_the_text(which, mistral, bpe_tokenizer):
    tok = mistral if which == "mistral" else bpe_tokenizer
    lengths = T.token_byte_lengths(tok)
    assert lengths[tok.bos_token_id] == 0 and lengths[tok.eos_token_id] == 0
    for story in sample_stories("val", 20):
        ids = tok(story, add_special_tokens=False)["input_ids"]
        n = int(lengths[ids].sum())
        # sentencepiece adds one dummy-prefix space at the start of a text
        assert n == len(story.encode()) + (1 if which == "mistral" else 0)


@pytest.mark.parametrize(
    "spec,expected", [("mistral", ("mistral", None)), ("bpe:4096", ("bpe", 4096)), ("BPE:512", ("bpe", 512))]
)
def test_parse_spec(spec, expected):
    assert T.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["gpt2", "bpe:10", "bpe:x"])
def test_parse_spec_rejects(spec):
    with pytest.raises(SettingsError):
        T.parse_spec(spec)


@pytest.mark.parametrize("which", ["mistral", "bpe"])
def test_describe_files_agrees_with_the_loaded_tokenizer(which, mistral, bpe_tokenizer, tmp_path):
    tok = mistral if which == "mistral" else bpe_tokenizer
    tok.save_pretrained(tmp_path)
    files = T.describe_files(tmp_path)  # `tokenizers` only: what `prepare` records
    assert files.sha256 == T.fingerprint(tok) == T.fingerprint(T.load_tokenizer(tmp_path))
    assert files.vocab_size == len(tok) == {"mistral": 32000, "bpe": 512}[which]
    assert (files.unk_id, files.bos_id, files.eos_id, files.pad_id) == (0, 1, 2, 2)
    assert files.dtype == "uint16"
    assert files.chunking == {"mistral": "space+newline+prepend", "bpe": "bytelevel"}[which]
    assert not (tmp_path / T.DESCRIPTION).exists()  # a prepared folder gets no memo


def test_describe_files_memo_is_reused_until_the_files_change(mistral, tmp_path, monkeypatch):
    mistral.save_pretrained(tmp_path)
    first = T.describe_files(tmp_path, memo=True)
    assert (tmp_path / T.DESCRIPTION).is_file() and first == T.describe_files(tmp_path)
    calls = []
    real = T._describe
    monkeypatch.setattr(T, "_describe", lambda *a: calls.append(1) or real(*a))
    assert T.describe_files(tmp_path, memo=True) == first and calls == []  # from the memo
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"eos_token": "</s>"', '"eos_token": "<unk>"'))
    changed = T.describe_files(tmp_path, memo=True)
    assert calls == [1] and changed.eos_id == 0 and changed.sha256 == first.sha256  # worked out again
    (tmp_path / T.DESCRIPTION).write_text("{not json")
    assert T.describe_files(tmp_path, memo=True) == changed and calls == [1, 1]


def test_quick_load_file_is_the_same_tokenizer(mistral, tmp_path):
    import json

    from tokenizers import Tokenizer

    mistral.save_pretrained(tmp_path)
    quick = T.quick_load_file(tmp_path)
    assert quick.parent == tmp_path and quick.name.startswith("tokenizer.quick-")
    assert quick.stat().st_size < 0.5 * (tmp_path / "tokenizer.json").stat().st_size  # "a b" merges, no indent
    assert json.loads(quick.read_text())["model"]["merges"][0] == "▁ t"  # sentencepiece's first merge
    fast, full = Tokenizer.from_file(str(quick)), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert fast.to_str() == full.to_str()
    stories = sample_stories("val", 50)
    assert [e.ids for e in fast.encode_batch(stories)] == [e.ids for e in full.encode_batch(stories)]
    made = quick.stat().st_mtime_ns
    assert T.quick_load_file(tmp_path) == quick and quick.stat().st_mtime_ns == made  # made once
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<unknown>"  # other bytes: another quick file, never a stale one
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    again = T.quick_load_file(tmp_path)
    assert again != quick and Tokenizer.from_file(str(again)).to_str() == Tokenizer.from_file(
        str(tmp_path / "tokenizer.json")).to_str()


def test_quick_load_file_that_cannot_be_written_is_the_original(mistral, tmp_path, monkeypatch):
    # a full (or read-only) cache: prepare loads tokenizer.json as before, and no partial copy stays
    import errno
    from pathlib import Path

    mistral.save_pretrained(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    real = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real(self, text[:1000], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert T.quick_load_file(tmp_path) == tmp_path / "tokenizer.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_quick_load_file_keeps_merges_that_hold_a_space(tmp_path):
    import json

    from tokenizers import Tokenizer, models

    merges = [("a", "b"), ("ab", " c")]
    vocab = {"a": 0, "b": 1, " c": 2, "ab": 3, "ab c": 4}
    Tokenizer(models.BPE(vocab, merges)).save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"][1] == ["ab", " c"]
    assert T.quick_load_file(tmp_path) == tmp_path / "tokenizer.json"  # "ab  c" would be ambiguous
    assert not list(tmp_path.glob("tokenizer.quick-*"))


def test_mistral_is_unpacked_once_from_the_package(mistral, monkeypatch):
    import gzip
    from importlib import resources

    folder = T.mistral_folder()  # unpacked on first use into this test's own cache dir
    from tinystory.paths import cache_dir

    assert folder.parent == cache_dir() / "tokenizers" and folder.name == f"mistral-v1-{T.mistral_version()}"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left
    shipped = resources.files("tinystory.mistral")
    packed = shipped.joinpath("tokenizer.json.gz").read_bytes()
    assert (folder / "tokenizer.json").read_bytes() == gzip.decompress(packed)
    monkeypatch.setattr(gzip, "decompress", lambda data: pytest.fail("unpacked again"))
    assert T.mistral_folder() == folder
    assert T.load_mistral()(SENTENCE)["input_ids"] == MISTRAL_IDS
    assert T.fingerprint(T.load_mistral()) == T.fingerprint(mistral)


def test_mistral_needs_no_sentencepiece_or_protobuf(tmp_path):
    """A plain install converts nothing: with sentencepiece and protobuf hidden, the
    Mistral tokenizer still loads and gives the pinned ids."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfor m in ('sentencepiece', 'google.protobuf', 'google'):\n    sys.modules[m] = None\n"
            "from tinystory.tokenizer import load_mistral\nprint(load_mistral()('" + SENTENCE + "')['input_ids'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(MISTRAL_IDS)


def test_prepare_with_mistral_does_not_import_transformers(tmp_path):
    """The Mistral path of `prepare` reads the cached conversion with `tokenizers` alone
    (importing transformers is most of its start-up on a small input)."""
    import os
    import subprocess
    import sys

    T.mistral_folder()  # primed, as after the first use
    code = ("import sys; from tinystory.cli.app import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = sorted(m for m in ('transformers', 'torch', 'datasets') if m in sys.modules)\n"
            "print('imported:', heavy)")
    r = subprocess.run([sys.executable, "-c", code, "prepare", "--dataset", "sample", "--tokenizer", "mistral",
                        "--max-stories", "50", "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "imported: []"
    assert (tmp_path / "p" / "train.bin").is_file()
