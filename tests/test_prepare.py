"""`tinystory prepare`: counts, round trip, splits, idempotence, interruption, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_stories

from tinystory.cli.app import main
from tinystory.data import open_prepared
from tinystory.errors import DataError
from tinystory.settings import load_settings

SENTENCE = "Once upon a time, there was a little girl."
MISTRAL_IDS = [1, 5713, 3714, 264, 727, 28725, 736, 403, 264, 1628, 2746, 28723, 2]  # BOS ... EOS


def settings(**data):
    """tiny-profile settings with `data.<key>` overrides."""
    return load_settings(profile="tiny", env={}).replace(**{f"data__{k}": v for k, v in data.items()})


def stories_of(prepared, split):
    """Decoded stories of one split of a prepared folder (split at BOS/EOS)."""
    ids = np.asarray(prepared.tokens(split))
    tok = prepared.tokenizer
    eos = np.flatnonzero(ids == tok.eos_token_id)
    starts = np.concatenate([[0], eos[:-1] + 1])
    assert (ids[starts] == tok.bos_token_id).all()
    return [tok.decode(ids[s + 1 : e].tolist()) for s, e in zip(starts, eos, strict=True)]


def write_txt(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `tinystory prepare ...` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--profile", "tiny", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def sample300(tmp_path_factory):
    """The first 300 training stories of the bundled sample, bpe:512, one process."""
    from tinystory.prepare import prepare

    out = tmp_path_factory.mktemp("p") / "sample300"
    return open_prepared(prepare(settings(max_stories=300, num_proc=1, out=str(out))))


def test_open_prepared_refuses_a_truncated_stream_or_an_unknown_dtype(sample300, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sample300.path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    with open(copy / "val.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)  # one uint16 token short
    with pytest.raises(DataError, match=r"val\.bin is missing or incomplete"):
        open_prepared(copy)
    (copy / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(DataError, match="names an unknown dtype 'float32'"):
        open_prepared(copy)


# ------------------------------------------------------------------ the happy path


def test_counts_in_meta_are_right(sample300):
    meta = sample300.meta
    train, val = sample_stories("train", 300), sample_stories("val", 100)  # val: max(100, 300/10)
    tok = sample300.tokenizer
    assert meta["format"] == 1 and meta["dtype"] == "uint16" and meta["split_method"] == "source"
    for name, stories in (("train", train), ("val", val)):
        s = meta["splits"][name]
        assert s["stories"] == len(stories)
        assert s["bytes"] == sum(len(x.encode()) for x in stories)
        assert s["tokens"] == sum(len(tok(x)["input_ids"]) + 1 for x in stories)  # BOS (added) + EOS
        assert len(sample300.tokens(name)) == s["tokens"]
    text_tokens = meta["splits"]["train"]["tokens"] - 2 * 300
    assert meta["bytes_per_token"] == round(meta["splits"]["train"]["bytes"] / text_tokens, 4)
    assert meta["cleaning"]["stories_read"] == 400 and meta["cleaning"]["kept"] == 400
    from tinystory.tokenizer import fingerprint

    t = meta["tokenizer"]
    assert t["name"] == "bpe:512" and t["vocab_size"] == 512 and t["sha256"] == fingerprint(tok)
    assert (t["bos_id"], t["eos_id"], t["unk_id"], t["pad_id"]) == (1, 2, 0, 2)
    digest = hashlib.sha256((Path(__file__).parents[1] / "src/tinystory/sample/train.txt.gz").read_bytes()).hexdigest()
    assert {"path": "sample/train.txt.gz", "sha256": digest, "split": "train"}.items() <= meta["sources"][1].items()


def test_decoding_gives_back_the_cleaned_text(sample300):
    assert stories_of(sample300, "train")[:3] == sample_stories("train", 3)
    assert stories_of(sample300, "val")[0] == sample_stories("val", 1)[0]


def test_splits_are_disjoint(sample300):
    train, val = stories_of(sample300, "train"), stories_of(sample300, "val")
    assert len(train) == 300 and len(val) == 100
    assert not set(train) & set(val)


def test_bpe_is_trained_on_the_train_split_only(sample300):
    from tinystory.tokenizer import fingerprint, train_bpe

    assert fingerprint(train_bpe(sample_stories("train", 300), 512)) == sample300.tokenizer_sha256


def test_second_run_is_a_noop(tmp_path, capsys):
    args = ["--dataset", "sample", "--max-stories", "50", "--num-proc", "1", "--out", str(tmp_path / "p")]
    code, out, err = cli(capsys, *args)
    assert code == 0 and out == f"{tmp_path / 'p'}\n" and "encode: 150 encoded" in err
    before = (tmp_path / "p" / "train.bin").stat()
    code, out, err = cli(capsys, *args)
    assert code == 0 and out == f"{tmp_path / 'p'}\n"
    assert err.splitlines()[0] == f"already prepared at {tmp_path / 'p'}"
    assert "encode" not in err and "│ train │" in err  # the summary table, nothing rebuilt
    after = (tmp_path / "p" / "train.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    code, _, err = cli(capsys, *args, "--force")
    assert code == 0 and "encode: 150 encoded" in err


def test_progress_reports_counts_and_rates(tmp_path, capsys, monkeypatch):
    """Plain lines off a terminal; on one, a live rich bar with the same stats."""
    import io

    from rich.console import Console

    import tinystory.packing

    code, _, err = cli(capsys, "--dataset", "sample", "--max-stories", "50", "--num-proc", "1",
                       "--out", str(tmp_path / "p"))
    splits = json.loads((tmp_path / "p" / "meta.json").read_text())["splits"]
    stories = splits["train"]["stories"] + splits["val"]["stories"]
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    assert code == 0 and stories == 150
    lines = err.splitlines()
    rate, secs = r"\([\d,]+/s\)", r"in \d+\.\d s"
    assert re.fullmatch(rf"read \+ clean: 150 stories {rate}, 0\.\d MB \([\d.,]+ MB/s\) {secs}", lines[0])
    assert re.fullmatch(rf"train bpe:512: {secs}", lines[1])
    assert re.fullmatch(rf"encode: 150 encoded, {tokens:,} tokens {rate} {secs}", lines[2])

    live = Console(file=io.StringIO(), force_terminal=True, width=200, record=True)
    monkeypatch.setattr(tinystory.packing, "interactive", lambda: True)
    monkeypatch.setattr(tinystory.packing, "console", lambda: live)
    code, _, err = cli(capsys, "--dataset", "sample", "--max-stories", "50", "--num-proc", "1",
                       "--out", str(tmp_path / "p"), "--force")
    shown = live.export_text()
    assert code == 0 and "encode" not in err.split("prepared data")[0]  # the bar, not lines
    assert re.search(rf"read \+ clean 150 stories {rate}, 0\.\d MB \([\d.,]+ MB/s\)", shown)
    assert re.search(rf"encode ━+ 150 encoded, {tokens:,} tokens {rate}", shown)


def test_default_location_is_the_cache_named_by_fingerprint(capsys):
    from tinystory import paths

    code, out, _ = cli(capsys, "--dataset", "sample", "--max-stories", "40", "--num-proc", "1")
    path = Path(out.strip())
    assert code == 0 and path.parent == paths.prepared_dir()
    meta = open_prepared(path).meta
    assert path.name == f"sample-bpe512-{meta['fingerprint'][:12]}"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folder left


def test_mistral_ids_are_pinned(tmp_path):
    from tinystory.prepare import prepare

    write_txt(tmp_path / "train.txt", [SENTENCE, *sample_stories("train", 4)])
    write_txt(tmp_path / "valid.txt", sample_stories("val", 2))
    data = open_prepared(prepare(settings(dataset=str(tmp_path), tokenizer="mistral", out=str(tmp_path / "p"))))
    assert data.meta["tokenizer"]["vocab_size"] == 32000 and data.meta["dtype"] == "uint16"
    assert data.tokens("train")[: len(MISTRAL_IDS)].tolist() == MISTRAL_IDS
    assert stories_of(data, "train") == [SENTENCE, *sample_stories("train", 4)]


@pytest.mark.parametrize("spec", ["bpe:512", "mistral"])
def test_worker_processes_give_the_same_bytes(spec, tmp_path, monkeypatch):
    import tinystory.packing
    import tinystory.prepare as P

    one = P.prepare(settings(max_stories=300, num_proc=1, tokenizer=spec, out=str(tmp_path / "one")))
    monkeypatch.setattr(P, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(tinystory.packing, "SPOOL_BLOCK", 1 << 14)  # many small tasks
    two = P.prepare(settings(max_stories=300, num_proc=2, tokenizer=spec, out=str(tmp_path / "two")))
    assert open_prepared(two).meta["seconds"]["processes"] == 2
    for split in ("train", "val"):
        assert (two / f"{split}.bin").read_bytes() == (one / f"{split}.bin").read_bytes()


@pytest.mark.parametrize("vocab,dtype", [(512, "uint16"), (65536, "uint16"), (65537, "uint32")])
def test_dtype_is_uint16_while_every_id_fits(vocab, dtype):
    from tinystory.tokenizer import TokenizerFiles

    assert TokenizerFiles(Path("."), "", vocab, 0, 1, 2, 2).dtype == dtype


@pytest.mark.parametrize("nproc", [1, 2])
def test_uint32_streams_are_written_and_read_back(nproc, sample300, tmp_path, monkeypatch):
    """A vocab past 65,536 ids: the same tokens, 4 bytes each (here, in-process and in workers)."""
    import tinystory.packing
    import tinystory.prepare as P
    import tinystory.tokenizer

    monkeypatch.setattr(tinystory.tokenizer.TokenizerFiles, "dtype", property(lambda self: "uint32"))
    monkeypatch.setattr(P, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(tinystory.packing, "SPOOL_BLOCK", 1 << 14)
    data = open_prepared(P.prepare(settings(max_stories=300, num_proc=nproc, out=str(tmp_path / "p"))))
    assert data.meta["dtype"] == "uint32" and data.meta["seconds"]["processes"] == nproc
    assert data.meta["tokenizer"]["sha256"] == sample300.meta["tokenizer"]["sha256"]
    for split in ("train", "val"):
        assert (tmp_path / "p" / f"{split}.bin").stat().st_size == 4 * data.meta["splits"][split]["tokens"]
        assert np.asarray(data.tokens(split)).tolist() == np.asarray(sample300.tokens(split)).tolist()


WORKER_DIES = """
import os, sys
if "tinystory.encoder" in sys.orig_argv:  # a worker of `prepare`: it dies on its first task
    class Tasks:
        def __iter__(self):
            os._exit(3)
    class Stdin:
        buffer = Tasks()
    sys.stdin = Stdin()
"""


def test_a_dead_worker_is_one_line_exit_1_and_nothing_written(mistral_cached, tmp_path):
    # the whole sample (more than POOL_MIN_BYTES) in 2 worker processes; the workers exit
    # with code 3 at their first block (a sitecustomize makes them: no hook in the product)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WORKER_DIES)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run(
        [sys.executable, "-m", "tinystory", "prepare", "--profile", "tiny", "--max-stories", "0",
         "--tokenizer", "mistral", "--num-proc", "2", "--out", str(tmp_path / "p")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == (
        "error: a tokenizer process died (exit code 3) (out of memory? try --num-proc 1; "
        "its error, if any, is printed above)")
    assert list(tmp_path.iterdir()) == [hooks]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_worker_answer_pipes_hold_a_whole_answer(mistral_cached):
    # a 0.5 MB block answers ~0.26 MB of uint16: in a 64 KB pipe the worker would wait for
    # the parent (which reads the answers in task order) before its next block
    import fcntl

    from tinystory.packing import ANSWER_PIPE, Workers
    from tinystory.tokenizer import describe_files

    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < ANSWER_PIPE:
        pytest.skip("this kernel caps pipes below 1 MB")
    tok = describe_files(mistral_cached, memo=True)
    workers = Workers(2, mistral_cached / "tokenizer.json", tok.bos_id, tok.eos_id, tok.dtype, tok.chunking)
    try:
        sizes = [fcntl.fcntl(p.stdout.fileno(), fcntl.F_GETPIPE_SZ) for p in workers.procs]
    finally:
        workers.close()
    assert sizes == [ANSWER_PIPE, ANSWER_PIPE]


def test_seen_set_finds_old_and_new_hashes():
    import random

    from tinystory.cleaning import SeenSet

    seen, rng = SeenSet(), random.Random(0)
    seen.MERGE_AT = 1000
    hashes = [rng.getrandbits(64) for _ in range(5500)]
    for h in hashes:
        seen.add(h)
    assert len(seen.old) == 5000 and list(seen.old) == sorted(hashes[:5000]) and len(seen.new) == 500
    assert all(h in seen for h in hashes)
    assert not any(rng.getrandbits(64) in seen for _ in range(5000))


# ----------------------------------------------------------------- sources, cleaning


def test_cleaning_counts(tmp_path):
    from tinystory.prepare import prepare

    s = sample_stories("train", 6)
    v = sample_stories("val", 2)
    mojibake = "Tom said, â€œIt â€™s fun!â€ and Lily smiled."
    train = [s[0], "  " + s[1] + "  \n", "", s[0], v[0], mojibake, s[2], s[2], "\n\n", s[3]]
    write_txt(tmp_path / "train.txt", train)
    write_txt(tmp_path / "valid.txt", v)
    data = open_prepared(prepare(settings(dataset=str(tmp_path), out=str(tmp_path / "p"))))
    c = data.meta["cleaning"]
    assert (c["stories_read"], c["whitespace_stripped"], c["empty_dropped"], c["mojibake_repaired"],
            c["duplicates_dropped"], c["cross_split_dropped"], c["kept"]) == (12, 2, 2, 1, 2, 1, 7)
    train_out = stories_of(data, "train")
    assert train_out == [s[0], s[1], "Tom said, “It ’s fun!” and Lily smiled.", s[2], s[3]]


def test_hash_split_is_deterministic_and_disjoint(tmp_path):
    from tinystory.prepare import prepare

    stories = sample_stories("val", 200)
    write_txt(tmp_path / "stories.txt", stories + stories[:10])  # 10 duplicates
    expected_val = [s for s in stories if int.from_bytes(
        hashlib.blake2b(s.encode(), digest_size=16).digest()[8:], "little") / 2.0**64 < 0.2]
    data = open_prepared(prepare(settings(dataset=str(tmp_path / "stories.txt"), val_fraction=0.2,
                                          out=str(tmp_path / "p"))))
    assert data.meta["split_method"] == "hash" and data.meta["cleaning"]["duplicates_dropped"] == 10
    val, train = stories_of(data, "val"), stories_of(data, "train")
    assert val == expected_val and len(val) + len(train) == 200
    assert train == [s for s in stories if s not in expected_val]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-lines", "parquet", "txt.gz"])
def test_other_formats(tmp_path, fmt):
    from tinystory.prepare import prepare

    train, val = sample_stories("train", 30), sample_stories("val", 5)
    for name, stories in (("train", train), ("valid", val)):
        rows = [{"id": i, "story": s} for i, s in enumerate(stories)]
        if fmt == "jsonl":
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "json":
            (tmp_path / f"{name}.json").write_text(json.dumps({"story": stories}))  # a list under the field
        elif fmt == "json-lines":
            (tmp_path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": list(range(len(stories))), "story": stories}),
                           tmp_path / f"{name}-00000.parquet")
        else:
            (tmp_path / f"{name}.txt.gz").write_bytes(
                gzip.compress("".join(f"{s}\n<|endoftext|>\n" for s in stories).encode()))
    data = open_prepared(prepare(settings(dataset=str(tmp_path), text_field="story", out=str(tmp_path / "p"))))
    assert data.meta["split_method"] == "source"
    assert stories_of(data, "train") == train and stories_of(data, "val") == val


def test_file_names_give_the_split(tmp_path, capsys):
    from tinystory.sources import _with_roles

    names = ["train-00.txt", "Train_01.jsonl", "validation.jsonl", "val_00.parquet", "valid-3.txt", "valley.txt",
             "notes.txt"]
    srcs = _with_roles([tmp_path / n for n in names])
    assert [(Path(s.label).name, s.role) for s in srcs] == [
        ("validation.jsonl", "val"), ("val_00.parquet", "val"), ("valid-3.txt", "val"),
        ("train-00.txt", "train"), ("Train_01.jsonl", "train")]
    assert capsys.readouterr().err == ("warning: ignored (named neither train* nor valid*): "
                                       f"{tmp_path / 'valley.txt'}, {tmp_path / 'notes.txt'}\n")
    # without both kinds of name, every file is split by hash
    assert {s.role for s in _with_roles([tmp_path / "train.txt", tmp_path / "more.txt"])} == {"hash"}
    assert {s.role for s in _with_roles([tmp_path / "validation.txt"])} == {"hash"}


def test_glob_and_max_stories(tmp_path):
    from tinystory.prepare import prepare

    stories = sample_stories("train", 90)
    for i in range(3):
        write_txt(tmp_path / f"part{i}.txt", stories[30 * i : 30 * i + 30])
    (tmp_path / "notes.md").write_text("not stories")
    data = open_prepared(prepare(settings(dataset=str(tmp_path / "part*.txt"), val_fraction=0.1, max_stories=40,
                                          out=str(tmp_path / "p"))))
    assert data.meta["splits"]["train"]["stories"] == 40
    assert [s["path"] for s in data.meta["sources"]] == [str(tmp_path / f"part{i}.txt") for i in range(3)]
    assert [s["stories_read"] for s in data.meta["sources"]] == [30, 15, 0]  # 40 train + 5 val, then stop


def test_replace_carries_on_past_bad_bytes(tmp_path):
    from tinystory.prepare import prepare

    s = sample_stories("train", 3)
    raw = "".join(f"{x}\n<|endoftext|>\n" for x in s).encode()
    (tmp_path / "train.txt").write_bytes(raw[:50] + b"\xff" + raw[50:])
    write_txt(tmp_path / "valid.txt", sample_stories("val", 1))
    data = open_prepared(prepare(settings(dataset=str(tmp_path), errors="replace", out=str(tmp_path / "p"))))
    assert data.meta["cleaning"]["undecodable_bytes_replaced"] == 1
    assert stories_of(data, "train")[0] == s[0][:50] + "\ufffd" + s[0][50:]


# ----------------------------------------------------------------------- bad input


def _bad_utf8(tmp_path: Path) -> list[str]:
    s = sample_stories("train", 2)
    raw = "".join(f"{x}\n<|endoftext|>\n" for x in s).encode()
    offset = len(raw) - 20
    (tmp_path / "bad.txt").write_bytes(raw[:offset] + b"\xc3\x28" + raw[offset:])
    return [str(tmp_path / "bad.txt"), f"{tmp_path / 'bad.txt'} is not UTF-8: byte 0xc3 at byte offset {offset} "
            "(fix the file, or pass --errors replace to replace bad bytes with U+FFFD)"]


def _no_field(tmp_path: Path) -> list[str]:
    (tmp_path / "s.jsonl").write_text('{"story": "Once.", "id": 1}\n')
    return [str(tmp_path / "s.jsonl"), f"{tmp_path / 's.jsonl'} line 1 has no field 'text' (its fields: story, id) "
            "(pass --text-field with the field that holds the story)"]


def _no_field_parquet(tmp_path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"story": ["Once."], "id": [1]}), tmp_path / "s.parquet")
    return [str(tmp_path / "s.parquet"), f"{tmp_path / 's.parquet'} has no field 'text' (its fields: story, id) "
            "(pass --text-field with the field that holds the story)"]


def _empty(tmp_path: Path) -> list[str]:
    (tmp_path / "e.txt").write_bytes(b"")
    return [str(tmp_path / "e.txt"), f"{tmp_path / 'e.txt'} is empty (give a file that holds stories)"]


def _no_stories(tmp_path: Path) -> list[str]:
    (tmp_path / "e.txt").write_text("\n<|endoftext|>\n  \n")
    return [str(tmp_path / "e.txt"), "no training stories left after cleaning (1 read) (check the input)"]


def _missing(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "nope.txt"),
            f"{tmp_path / 'nope.txt'} does not exist (check the path, or use --dataset sample (bundled stories))"]


def _empty_folder(tmp_path: Path) -> list[str]:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("hi")
    return [str(tmp_path / "d"), f"{tmp_path / 'd'} holds no .txt, .jsonl, .json or .parquet files "
            "(use .txt (stories separated by <|endoftext|> lines), .jsonl, .json or .parquet)"]


def _no_glob_match(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "*.txt"), f"{tmp_path / '*.txt'} matches no .txt, .jsonl, .json or .parquet files "
            "(check the pattern)"]


def _val_empty(tmp_path: Path) -> list[str]:
    write_txt(tmp_path / "few.txt", sample_stories("train", 3))
    return [str(tmp_path / "few.txt"), "the validation split is empty "
            "(raise data.val_fraction (e.g. --set data.val_fraction=0.05) or give more stories)"]


def _offline(tmp_path: Path) -> list[str]:
    return ["roneneldan/TinyStories", "cannot fetch dataset roneneldan/TinyStories: HF_HUB_OFFLINE is set "
            "(use a local path (--dataset path/to/stories.txt) or --dataset sample (bundled stories))"]


@pytest.mark.parametrize("case", [_bad_utf8, _no_field, _no_field_parquet, _empty, _no_stories, _missing,
                                  _empty_folder, _no_glob_match, _val_empty, _offline], ids=lambda f: f.__name__[1:])
def test_bad_input_is_one_line_exit_1_and_nothing_written(case, tmp_path, capsys):
    from tinystory import paths

    dataset, message = case(tmp_path)
    t0 = time.perf_counter()
    code, out, err = cli(capsys, "--dataset", dataset, "--num-proc", "1", "--out", str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 10
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == f"error: {message}"
    assert not [line for line in err.splitlines() if line.startswith(("error", "Traceback"))][:-1]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not paths.prepared_dir().exists() or not list(paths.prepared_dir().iterdir())


def test_unreachable_hub_is_one_line_within_seconds(tmp_path, capsys, monkeypatch):
    """No HF_HUB_OFFLINE, but no Hub either (a local port where nothing listens)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    t0 = time.perf_counter()
    code, out, err = cli(capsys, "--dataset", "roneneldan/TinyStories", "--out", str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 10
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"error: cannot reach the Hugging Face Hub ({url}) to fetch dataset "
                                "roneneldan/TinyStories (use a local path (--dataset path/to/stories.txt) or "
                                "--dataset sample (bundled stories))"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "gpt2"], "unknown tokenizer 'gpt2' (use `mistral` or `bpe:N` (e.g. bpe:4096))"),
    (["--set", "data.val_fraction=1.5"], "data.val_fraction must be between 0 and 1, got 1.5 (e.g. 0.01)"),
    (["--errors", "ignore"],
     "data.errors = 'ignore' (from --errors) is not one of strict, replace (use one of: strict, replace)"),
])
def test_bad_settings(args, message, capsys):
    code, out, err = cli(capsys, *args)
    assert (code, out, err.strip()) == (1, "", f"error: {message}")


def test_tokenizer_mismatch_at_out(tmp_path, capsys):
    out = str(tmp_path / "p")
    assert cli(capsys, "--max-stories", "30", "--num-proc", "1", "--out", out)[0] == 0
    code, _, err = cli(capsys, "--max-stories", "30", "--tokenizer", "bpe:600", "--out", out)
    assert code == 1
    assert err.strip() == (f"error: {out} holds data prepared with tokenizer bpe:512, not bpe:600 "
                           "(choose another --out, or pass --force to replace it)")
    code, _, err = cli(capsys, "--max-stories", "31", "--out", out)
    assert code == 1 and err.strip().endswith("holds data prepared from other inputs or options "
                                              "(choose another --out, or pass --force to replace it)")
    code, _, _ = cli(capsys, "--max-stories", "30", "--tokenizer", "bpe:600", "--out", out, "--force")
    assert code == 0 and open_prepared(out).meta["tokenizer"]["name"] == "bpe:600"


def test_out_that_is_not_prepared_data_is_left_alone(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    code, _, err = cli(capsys, "--max-stories", "30", "--out", str(tmp_path / "mine"), "--force")
    assert code == 1 and err.strip() == (f"error: {tmp_path / 'mine'} exists and is not a prepared-data folder "
                                         "(choose a new or empty --out)")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_json_without_the_field_lists_its_fields(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps({"texts": ["Once.", "Twice."], "source": "x"}))
    code, _, err = cli(capsys, "--dataset", str(tmp_path / "s.json"), "--out", str(tmp_path / "o"))
    assert code == 1 and err.strip() == (f"error: {tmp_path / 's.json'} item 0 has no field 'text' "
                                         "(its fields: texts, source) (pass --text-field with the field that holds "
                                         "the story)")


# --------------------------------------------------------------------- interruption


SIGNAL_AFTER_FIRST_WRITE = """
import os, signal, sys, time
if sys.orig_argv[1:4] == ["-m", "tinystory", "prepare"]:  # the parent, not a worker
    import tinystory.packing as packing

    write = packing.Packer._write

    def _write(self, split, data, stories, nbytes):
        write(self, split, data, stories, nbytes)
        self.outs[split].flush()  # the first tokens are on the disk: now the signal
        # as in a terminal: a process started in the background inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIG{hook})
        time.sleep(5)  # it arrives here

    packing.Packer._write = _write
"""


def _run_until_hook(tmp_path: Path, hook: str, *args: str) -> subprocess.CompletedProcess:
    """`prepare` in a subprocess that gets SIGKILL ("kill") or SIGINT ("interrupt") right
    after its first tokens reach the disk (a sitecustomize does it: no hook in the product)."""
    hooks = tmp_path.parent / f"{tmp_path.name}-hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SIGNAL_AFTER_FIRST_WRITE.format(hook="KILL" if hook == "kill" else "INT"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(
        [sys.executable, "-m", "tinystory", "prepare", "--profile", "tiny", "--out", str(tmp_path / "p"), *args],
        capture_output=True, text=True, env=env, timeout=120)


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (the workers inherit it from `prepare`)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killed_run_leaves_nothing_valid_looking(mistral_cached, tmp_path, monkeypatch):
    # the whole sample (> POOL_MIN_BYTES) with 2 worker processes, killed mid-way
    marker = f"prepare-test-{os.getpid()}-{time.time()}"
    monkeypatch.setenv("_TINYSTORY_TEST_MARK", marker)
    r = _run_until_hook(tmp_path, "kill", "--max-stories", "0", "--tokenizer", "mistral", "--num-proc", "2")
    assert r.returncode == -signal.SIGKILL and "Traceback" not in r.stderr, r.stderr
    assert "read + clean + encode:" not in r.stderr  # died inside the phase, after its first write
    assert not (tmp_path / "p").exists()
    (tmp,) = tmp_path.glob(".p.tmp-*")
    written = sum((tmp / f"{split}.bin").stat().st_size for split in ("train", "val"))
    assert written > 0 and not (tmp / "meta.json").exists()
    with pytest.raises(DataError):
        open_prepared(tmp)
    deadline = time.monotonic() + 10  # the workers see EOF on their tasks and leave
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_with(marker)
    from tinystory.prepare import prepare

    assert prepare(settings(max_stories=30, num_proc=1, out=str(tmp_path / "p"))) == tmp_path / "p"
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # the stale temp folder was swept


@pytest.mark.parametrize("args", [["--max-stories", "30", "--num-proc", "1"],
                                  ["--max-stories", "0", "--tokenizer", "mistral", "--num-proc", "2"]],
                         ids=["here", "workers"])
def test_ctrl_c_cleans_up_and_exits_130(args, mistral_cached, tmp_path):
    r = _run_until_hook(tmp_path, "interrupt", *args)
    # (whether "error: interrupted" is printed depends on the typer version: 0.29 turns
    # KeyboardInterrupt into a silent Exit(130); the exit code and the clean-up are prepare's part)
    assert r.returncode == 130 and "encode:" not in r.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- fast encoder


ODD = ["  two leading", "trailing  ", "a  b   c", "x▁y ▁z", "tab\there\n\nnew", "emoji 😀 ok", "café naïve",
       "a </s> b<s>c", "<unk>", " ", "she's we'll they're", "1234 56,7", "\u00a0nbsp\u00a0x", "a\r\nb",
       "", "nul \x00 inside", "\x00", "end "]


@pytest.mark.parametrize("which", ["mistral", "mistral-metaspace", "bpe"])
def test_chunk_encoder_gives_the_tokenizers_ids(which, bpe_tokenizer, tmp_path):
    from tokenizers import Tokenizer

    from tinystory.encoder import ChunkEncoder, chunk_kind
    from tinystory.tokenizer import load_mistral

    tok = load_mistral() if which.startswith("mistral") else bpe_tokenizer
    texts = sample_stories("val") + ODD + [t + " " + o for t, o in zip(sample_stories("train", 14), ODD, strict=False)]
    js = tok.backend_tokenizer.to_str()
    if which == "mistral-metaspace":  # the form transformers' conversion writes (no ▁ before a leading space)
        spec = json.loads(js)
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
        js = json.dumps(spec)
    core = Tokenizer.from_str(js)
    expected = [i for e in core.encode_batch_fast(texts, add_special_tokens=False) for i in (1, *e.ids, 2)]
    enc = ChunkEncoder(js, 1, 2, "uint16", cache_limit=2000)  # small: the cache restarts several times
    assert (enc.kind, enc.newlines, enc.prepend) == {"mistral": ("space", True, True), "bpe": ("bytelevel", False,
                                                                                               False),
                                                     "mistral-metaspace": ("space", True, False)}[which]
    got = np.concatenate([enc.encode(texts[i : i + 100]) for i in range(0, len(texts), 100)])
    assert got.tolist() == expected
    # from the file, told the kind (as `prepare`'s workers are), with the whole batch at once
    path = tmp_path / "tokenizer.json"
    path.write_text(js, encoding="utf-8")
    kind = chunk_kind(json.loads(js))
    plus = "+prepend" if which == "mistral" else ""
    assert kind == {"mistral": "space+newline+prepend", "mistral-metaspace": "space+newline", "bpe": "bytelevel"}[which]
    keys = {}
    # also without the cut at newlines
    for variant in ([kind, "space" + plus] if which.startswith("mistral") else [kind]):
        enc = ChunkEncoder(path, 1, 2, "uint32", kind=variant)
        got = np.frombuffer(enc.encode_bytes(texts), dtype=np.uint32)
        assert got.dtype == np.uint32 and got.tolist() == expected
        keys[variant] = [k for k in enc.cache if isinstance(k, str)]
    if which.startswith("mistral"):  # cut before every newline: a newline opens a key or is in none
        cut = keys["space+newline" + plus]
        assert all("\n" not in k[1:] for k in cut) and any("\n" in k[1:] for k in keys["space" + plus])
        assert len(cut) < 0.9 * len(keys["space" + plus])  # fewer distinct keys (x1 of the shared text: -29%)
        newline = core.token_to_id("<0x0A>")
        enc = ChunkEncoder(path, 1, 2, "uint16", kind="space+newline" + plus)
        ids = core.encode("end.\n\nThe", add_special_tokens=False).ids
        assert enc.encode(["end.\n\nThe"]).tolist() == [1, *ids, 2] and ids[-3:-1] == [newline, newline]
        assert np.frombuffer(enc.cache["\n"], np.uint16).tolist() == [newline]
        assert np.frombuffer(enc.cache["\nThe"], np.uint16).tolist() == ids[-2:]  # no ▁


# ---------------------------------------------------------------------- hub dataset


def _parquet(stories: list[str]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": stories}), buf)
    return buf.getvalue()


TINYSTORIES_README = b"""---
license: cdla-sharing-1.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# TinyStories (a stand-in of the Hub repo's layout: parquet shards beside the .txt files)
"""


def tinystories_repo(train: list[str], val: list[str]) -> dict[str, bytes]:
    """The files of roneneldan/TinyStories, in its layout, holding these stories."""
    return {"README.md": TINYSTORIES_README,
            "TinyStories-valid.txt": "".join(f"{s}\n<|endoftext|>\n" for s in val).encode(),
            "data/train-00000-of-00002.parquet": _parquet(train[: len(train) // 2]),
            "data/train-00001-of-00002.parquet": _parquet(train[len(train) // 2 :]),
            "data/validation-00000-of-00001.parquet": _parquet(val)}


def test_hub_dataset_streamed_at_a_pinned_commit(tmp_path):
    """The real hub path (`HfApi.dataset_info`, then `datasets.load_dataset(streaming=True)`
    at that commit), against a stand-in Hub on 127.0.0.1 that serves the dataset's files."""
    from hub_server import DatasetRepo, StandInHub

    train, val = sample_stories("train", 60), sample_stories("val", 5)
    repo = DatasetRepo()
    first = repo.add_commit(tinystories_repo(train[:40], val))
    with StandInHub(token="unused") as hub:
        hub.datasets["roneneldan/TinyStories"] = repo
        hf_home = tmp_path / "hf"
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0"}

        def prepare_(*args: str, offline: bool = False) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "tinystory", "prepare", "--dataset", "roneneldan/TinyStories",
                                   "--tokenizer", "bpe:512", "--num-proc", "1", *args], capture_output=True,
                                  text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1" if offline else "0"})

        r = prepare_("--max-stories", "30")
        assert r.returncode == 0, r.stderr
        path = Path(r.stdout.strip().splitlines()[-1])
        data = open_prepared(path)
        assert stories_of(data, "train") == train[:30] and stories_of(data, "val") == val
        hub_sources = data.meta["sources"]
        assert [(x["hub_id"], x["revision"], x["commit"], x["hub_split"], x["split"], x["stories_read"])
                for x in hub_sources] == [("roneneldan/TinyStories", "main", first, "validation", "val", 5),
                                          ("roneneldan/TinyStories", "main", first, "train", "train", 30)]
        # streamed: parquet read by HTTP ranges, no Arrow copy and no whole file in any cache
        assert any(s.headers.get("range") for s in hub.seen if "/resolve/" in s.path)
        assert not [p for p in hf_home.rglob("*") if p.suffix in (".arrow", ".parquet")]

        # a new commit on main: the same request reads it; a pinned revision reads the old one
        second = repo.add_commit(tinystories_repo(train[20:], val))
        r = prepare_("--max-stories", "30")
        assert r.returncode == 0, r.stderr
        newer = Path(r.stdout.strip().splitlines()[-1])
        assert newer != path and stories_of(open_prepared(newer), "train") == train[20:50]
        assert {x["commit"] for x in open_prepared(newer).meta["sources"]} == {second}
        r = prepare_("--max-stories", "30", "--revision", first, offline=True)  # a commit id needs no Hub
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip().splitlines()[-1]) == path and f"already prepared at {path}" in r.stderr

        # offline, the same request finds what it prepared last, and says so
        r = prepare_("--max-stories", "30", offline=True)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip().splitlines()[-1]) == newer
        assert "the Hub is not reachable: using" in r.stderr

        # a revision the dataset does not have: one line, exit 1
        r = prepare_("--max-stories", "30", "--revision", "v9")
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            "error: dataset roneneldan/TinyStories has no revision 'v9' "
            "(pass --revision with a branch, tag or commit of the dataset)"]
