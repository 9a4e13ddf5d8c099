"""tinystory.runs on small folders built here: which run, checkpoint and file each reference
names, the exact refusals, checkpoint rotation, the settings and data a run finds, and
the weights' hash (issue #37's mutants)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import write_prepared

from tinystory import runs as R
from tinystory.errors import DataError, OfflineError, RunError
from tinystory.runs import Run
from tinystory.tokenizer import fingerprint, load_tokenizer

FIXTURE_RUN = Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"  # tiny run, BPE 512, settings.toml


def model_dir(path: Path, weights: str = "model.safetensors", mtime: float | None = None) -> Path:
    """A folder that looks like a saved HF model (config.json and one weights file)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / weights).write_bytes(b"weights of " + path.name.encode())
    if mtime is not None:
        os.utime(path / "config.json", (mtime, mtime))
    return path


def checkpoint(run: Path, step: int | str, complete: bool = True) -> Path:
    path = model_dir(run / "checkpoints" / f"checkpoint-{step}")
    if complete:
        (path / R.COMPLETE).write_text("{}")
    return path


# ------------------------------------------------------------------ finding runs


def test_has_model_needs_config_and_safetensors(tmp_path):
    assert R.has_model(model_dir(tmp_path / "a"))
    assert R.has_model(model_dir(tmp_path / "b", "model.safetensors.index.json"))
    assert not R.has_model(model_dir(tmp_path / "c", "pytorch_model.bin"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors").write_bytes(b"")
    assert not R.has_model(tmp_path / "d")


def test_latest_run_is_the_newest_config(tmp_path):
    model_dir(tmp_path / "old", mtime=1_000_000)
    model_dir(tmp_path / "new", mtime=3_000_000)
    model_dir(tmp_path / "middle", mtime=2_000_000)
    (tmp_path / "empty").mkdir()  # not a run
    (tmp_path / "file.txt").write_text("x")
    assert R.latest_run(tmp_path) == tmp_path / "new"


def test_no_run_is_one_line_naming_the_folder(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(RunError) as e:
            R.latest_run(root)
        assert str(e.value) == f"no trained run in {root} (train one with `tinystory train`, or pass a run dir)"


def test_latest_run_looks_in_the_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSTORY_RUNS_DIR", str(tmp_path))
    model_dir(tmp_path / "only")
    assert R.latest_run() == tmp_path / "only"
    assert Run.open(None).path == Run.open("latest").path == Run.open("").path == tmp_path / "only"
    assert Run.trained(None).path == Run.trained("latest").path == Run.trained("").path == tmp_path / "only"


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    assert R.latest_checkpoint(tmp_path) is None  # no checkpoints folder
    (tmp_path / "checkpoints").mkdir()
    assert R.latest_checkpoint(tmp_path) is None
    checkpoint(tmp_path, 9)
    checkpoint(tmp_path, 10)  # 10 > 9 as numbers, not as text
    checkpoint(tmp_path, 30, complete=False)
    checkpoint(tmp_path, "final")
    assert R.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-10"
    assert Run(tmp_path).latest_checkpoint() == tmp_path / "checkpoints" / "checkpoint-10"
    other = tmp_path / "other"
    checkpoint(other, 7)
    checkpoint(other, 3)
    assert R.latest_checkpoint(other) == other / "checkpoints" / "checkpoint-7"


def test_rotation_drops_incomplete_and_the_oldest_beyond_keep(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 10, 9, 100, 50):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 200, complete=False)  # a crash in its save
    checkpoint(tmp_path, "best")  # not ours: left alone
    (root / "checkpoint-7").write_text("a file, not a checkpoint")

    def left() -> list[str]:
        return sorted(p.name for p in root.iterdir())

    R.rotate_checkpoints(root, 0)  # keep all complete ones
    assert left() == ["checkpoint-10", "checkpoint-100", "checkpoint-2", "checkpoint-50", "checkpoint-7",
                      "checkpoint-9", "checkpoint-best"]
    R.rotate_checkpoints(root, -1)  # below 0: all, too
    assert len(left()) == 7
    R.rotate_checkpoints(root, 2)  # 5 complete: the 3 oldest go
    assert left() == ["checkpoint-100", "checkpoint-50", "checkpoint-7", "checkpoint-best"]
    R.rotate_checkpoints(root, 1)
    assert left() == ["checkpoint-100", "checkpoint-7", "checkpoint-best"]
    R.rotate_checkpoints(root, 5)
    assert left() == ["checkpoint-100", "checkpoint-7", "checkpoint-best"]


def test_a_checkpoint_that_cannot_be_removed_does_not_stop_the_rotation(tmp_path):
    elsewhere = model_dir(tmp_path / "other-disk" / "checkpoint-3")  # incomplete, reached through a link
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "checkpoint-3").symlink_to(elsewhere, target_is_directory=True)  # rmtree refuses links
    checkpoint(tmp_path / "run", 4, complete=False)
    R.rotate_checkpoints(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3"] and elsewhere.is_dir()


def test_read_json_gives_an_object_or_nothing(tmp_path):
    f = tmp_path / "x.json"
    assert R.read_json(f) == {}
    f.write_text("[1, 2]")
    assert R.read_json(f) == {}
    f.write_text("{not json")
    assert R.read_json(f) == {}
    f.write_text('{"a": [1]}')
    assert R.read_json(f) == {"a": [1]}


def test_display_names(tmp_path):
    assert R.display_name(tmp_path / "runs" / "r1" / "checkpoints" / "checkpoint-40") == "r1/checkpoint-40"
    snap = tmp_path / "hub" / "models--someone--tiny-story" / "snapshots" / "abc123"
    assert R.display_name(snap) == "someone/tiny-story"
    assert R.display_name(tmp_path / "runs" / "r1") == "r1"
    assert R.display_name(tmp_path / "r1" / "quantized" / "int8") == "int8"


# ----------------------------------------------------------------------- Run.open


def test_open_each_kind_of_reference(tmp_path):
    run = model_dir(tmp_path / "run")
    assert Run.open(run) == Run(run) and Run.open(str(run)).local
    ckpt = checkpoint(run, 5)
    assert Run.open(ckpt).path == ckpt
    quant = run / "quantized" / "int8"
    quant.mkdir(parents=True)
    (quant / R.MANIFEST).write_text('{"method": "int8"}')
    assert Run.open(quant).path == quant
    gguf = run / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert Run.open(gguf).path == gguf


@pytest.mark.parametrize("make, message", [
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x"), p / "notes.txt")[-1],
     "{p}/notes.txt is a file, not a run dir (pass the folder that holds config.json)"),
    (lambda p: checkpoint(p, 3, complete=False),
     "checkpoint {p}/checkpoints/checkpoint-3 is incomplete (it has no complete.json: its save did not finish) "
     "(pass the run dir or another checkpoint)"),
    (lambda p: model_dir(p, "pytorch_model.bin"),
     "{p} holds pickle weights (.bin), which tinystory never loads (convert them to model.safetensors with "
     "transformers (save_pretrained))"),
    (lambda p: (p.mkdir(), p)[-1],
     "{p} holds no trained model (config.json is missing) (train first, or pass a run dir or one of its "
     "checkpoints)"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}"), p)[-1],
     "{p} holds no trained model (model.safetensors is missing) (train first, or pass a run dir or one of its "
     "checkpoints)"),
    (lambda p: (p.mkdir(), (p / "model.safetensors").write_text("{}"), (p / "x.bin").write_text(""), p)[-1],
     "{p} holds no trained model (config.json is missing) (train first, or pass a run dir or one of its "
     "checkpoints)"),
])
def test_open_refuses_in_one_line(tmp_path, make, message):
    ref = make(tmp_path / "run")
    with pytest.raises(RunError) as e:
        Run.open(ref)
    assert str(e.value) == message.format(p=tmp_path / "run")


def test_open_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    run = model_dir(tmp_path / "run")
    assert Run.open("~/run").path == run and Run.trained("~/run").path == run.resolve()


def test_a_checkpoint_outside_checkpoints_needs_no_marker(tmp_path):
    path = model_dir(tmp_path / "saved" / "checkpoint-3")  # no complete.json, but not a run's checkpoint
    assert Run.open(path).path == path
    other = model_dir(tmp_path / "checkpoints" / "best-3")
    assert Run.open(other).path == other


def test_missing_paths_and_hub_ids(tmp_path):
    with pytest.raises(RunError) as e:
        Run.open(tmp_path / "nope")
    assert str(e.value) == (f"run {tmp_path / 'nope'} does not exist "
                            "(pass a run dir, a checkpoint, a .gguf file or a hub id)")
    with pytest.raises(RunError) as e:
        Run.open("someone/bad--name")
    assert str(e.value) == "someone/bad--name is not a valid Hub model id (use owner/name, or a local run dir)"
    with pytest.raises(OfflineError) as e:  # the tests run with HF_HUB_OFFLINE=1
        Run.open("someone/tiny-model")
    assert str(e.value) == "cannot fetch model someone/tiny-model: HF_HUB_OFFLINE is set (pass a local run dir instead)"
    for not_hub in ("a/b/c", "/abs", "-x/y"):
        with pytest.raises(RunError, match="does not exist"):
            Run.open(not_hub)


def test_hub_ids_download_weights_config_and_tokenizer(tmp_path, monkeypatch):
    snapshot = model_dir(tmp_path / "models--someone--tiny-model" / "snapshots" / "abc")
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("tinystory.net.reachable", lambda *a, **k: True)
    monkeypatch.setattr(R, "snapshot_download", fake_download)
    run = Run.open("someone/tiny-model")
    assert run == Run(snapshot, local=False) and run.name == "someone/tiny-model"
    assert calls == [("someone/tiny-model", ["*.json", "*.safetensors", "*.toml", "*.md", "*.txt",
                                             "tokenizer.model"])]


def test_trained_needs_a_local_run_dir(tmp_path):
    run = model_dir(tmp_path / "run")
    assert Run.trained(run).path == run.resolve()
    assert Run.trained(str(tmp_path / "." / "run")).path == run.resolve()
    cases = [
        (tmp_path / "nope", f"run dir {tmp_path / 'nope'} does not exist (pass the folder `tinystory train` wrote)"),
        (run / "config.json",
         f"run dir {run / 'config.json'} does not exist (pass the folder `tinystory train` wrote)"),
    ]
    (tmp_path / "bare").mkdir()
    cases.append((tmp_path / "bare", f"{tmp_path / 'bare'} holds no trained model (config.json is missing) "
                                     "(train first with `tinystory train`, then push its run dir)"))
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    cases.append((tmp_path / "config-only", f"{tmp_path / 'config-only'} holds no trained model (model.safetensors "
                                            "is missing) (train first with `tinystory train`, then push its run dir)"))
    for ref, message in cases:
        with pytest.raises(RunError) as e:
            Run.trained(ref)
        assert str(e.value) == message


# ------------------------------------------------------------ what a run holds


def test_find_looks_up_two_folders_and_no_further(tmp_path):
    top = tmp_path / "a"
    run = model_dir(top / "run")
    (top / "only-in-a.txt").write_text("a")
    (run / "settings.toml").write_text("")
    quant = run / "quantized" / "int8"
    quant.mkdir(parents=True)
    gguf = run / "quantized" / "gguf" / "model.gguf"  # two folders below the run dir
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    assert Run(run).find("settings.toml") == run / "settings.toml"
    assert Run(run / "quantized").find("settings.toml") == run / "settings.toml"
    assert Run(quant).find("settings.toml") == run / "settings.toml"
    assert Run(gguf).find("settings.toml") == run / "settings.toml"  # a file: from its folder
    assert Run(run).find("only-in-a.txt") == top / "only-in-a.txt"
    assert Run(quant).find("only-in-a.txt") is None  # three folders up
    (run / "dir.toml").mkdir()
    assert Run(run).find("dir.toml") is None  # a folder is not the file


def test_block_size_from_the_runs_settings_capped_by_positions(tmp_path):
    run = Run(FIXTURE_RUN)
    assert run.settings is not None and run.settings.train.block_size == 64
    assert run.block_size(512) == 64
    assert run.block_size(512, 32) == 32
    assert run.block_size(512, 64) == 64
    assert run.block_size(512, 0) == 64  # 0: no cap known
    bare = Run(model_dir(tmp_path / "bare"))
    assert bare.settings is None
    assert bare.block_size(256) == 256 and bare.block_size(256, 100) == 100 and bare.block_size(256, 300) == 256


def test_weights_hash_covers_the_weight_files_in_name_order(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    big = bytes(range(256)) * 5000  # 1.28 MB: more than one read
    (run / "b.safetensors").write_bytes(big)
    (run / "a.safetensors").write_bytes(b"first")
    (run / "config.json").write_text("{}")  # not weights
    (run / "c.gguf").write_bytes(b"gguf")
    assert Run(run).weights_sha256() == hashlib.sha256(b"first" + big + b"gguf").hexdigest()
    assert Run(run / "b.safetensors").weights_sha256() == hashlib.sha256(big).hexdigest()


# --------------------------------------------------------------------- its data


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURE_RUN)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer) -> Path:
    stories = ["Once upon a time there was a cat.", "The dog ran to the park.", "Lily smiled."]
    return write_prepared(tmp_path_factory.mktemp("prep") / "data", tokenizer, train=stories, val=stories)


def test_data_comes_from_run_json_or_the_path_given(tmp_path, tokenizer, prepared):
    run = model_dir(tmp_path / "run")
    with pytest.raises(DataError) as e:
        Run(run).data(tokenizer)
    assert str(e.value) == ("no prepared data known for run run (it has no run.json naming it) "
                            "(pass --data with the prepared folder it was trained on)")
    assert Run(run).data(tokenizer, prepared).path == prepared
    assert Run(run).data(tokenizer, str(prepared)).path == prepared
    (run / "run.json").write_text(json.dumps({"data": {"path": str(prepared)}}))
    assert Run(run).data_path == str(prepared)
    assert Run(run).data(tokenizer).path == prepared
    assert Run(run / "checkpoints").data(tokenizer).path == prepared  # found one folder up
    with pytest.raises(DataError, match=r"prepared data .*nope does not exist"):
        Run(run).data(tokenizer, tmp_path / "nope")  # what was asked wins over run.json


def test_data_of_another_tokenizer_or_with_bad_ids_is_refused(tmp_path, tokenizer, prepared):
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["sha256"] = "0123456789abcdef" * 4
    (other / "meta.json").write_text(json.dumps(meta))
    run = model_dir(tmp_path / "run")
    ours = fingerprint(tokenizer)
    with pytest.raises(DataError) as e:
        Run(run).data(tokenizer, other)
    assert str(e.value) == (f"prepared data {other} uses tokenizer bpe:512 (0123456789ab), not the tokenizer of "
                            f"run run ({ours[:12]}) (pass --data with the folder the run was trained on)")
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    import numpy as np

    np.asarray([1, 512, 2], dtype=np.uint16).tofile(bad / "val.bin")  # id 512 of a 512-token vocab
    meta = json.loads((bad / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] = 3
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"val.bin holds token id 512, beyond the tokenizer's 512"):
        Run(run).data(tokenizer, bad)
