"""Corrupt and hostile inputs: each is answered by one line on stderr and exit 1, never a
traceback, never a hang, and nothing is loaded or run that should not be.

`CASES` is the table of every bad input tried and the exact line it gets; the test builds
each input from scratch (a copy of a prepared folder or of a run dir, then the damage) and
runs the command a user would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_prepared

from tinystory.cli.app import main


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer, random_run) -> dict[str, Path]:
    """A prepared folder (the bundled sample, BPE 512) and an untrained tiny run dir."""
    root = tmp_path_factory.mktemp("clean")
    data = write_prepared(root / "data", bpe_tokenizer, n_val=60, train=None)
    return {"data": data, "run": random_run}


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def garble(path: Path) -> None:
    path.write_bytes(b"\xff" * path.stat().st_size)  # the same size: token id 65535 everywhere


TRAIN = ["train", "--profile", "tiny", "--max-steps", "2", "--set", "train.eval_every=0"]


def data_case(damage: Callable[[Path], None], message: str) -> Callable[[Path, dict], tuple[list[str], str]]:
    def build(tmp: Path, clean: dict) -> tuple[list[str], str]:
        data = copy(clean["data"], tmp / "data")
        damage(data)
        return [*TRAIN, "--data", str(data), "--out", str(tmp / "run")], message.format(data=data)
    return build


def run_case(damage: Callable[[Path], None], message: str, command: str = "generate") -> Callable:
    def build(tmp: Path, clean: dict) -> tuple[list[str], str]:
        run = copy(clean["run"], tmp / "run")
        damage(run)
        args = {"generate": ["generate", "Once upon a time", "--run", str(run), "-n", "4"],
                "eval": ["eval", str(run), "--metrics", "distinct-n", "-n", "1"],
                "quantize": ["quantize", str(run), "--method", "int8", "--profile", "tiny"],
                "push": ["push", str(run), "someone/tiny", "--dry-run"]}[command]
        return args, message.format(run=run)
    return build


def other_tokenizer(data: Path) -> None:
    from conftest import sample_stories

    from tinystory.tokenizer import train_bpe

    train_bpe(sample_stories("val", 300), 300).save_pretrained(data)


def auto_map(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (run / "config.json").write_text(json.dumps(config))
    (run / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")


def pickle_weights(run: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(run / "model.safetensors")), run / "pytorch_model.bin")
    (run / "model.safetensors").unlink()


def unmarked_checkpoint(run: Path) -> None:
    ckpt = run / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(run / f, ckpt / f)


def bad_settings(tmp: Path, clean: dict) -> tuple[list[str], str]:
    config = tmp / "config.toml"
    config.write_text('[train]\nlr = "fast"\n')
    return (["train", "--profile", "tiny", "--config", str(config), "--dry-run"],
            f"train.lr must be number, got 'fast' from config:{config} (fix the value in config:{config})")


def checkpoint_resume(tmp: Path, clean: dict) -> tuple[list[str], str]:
    run = copy(clean["run"], tmp / "run")
    unmarked_checkpoint(run)
    return (["train", "--resume", "--out", str(run)],
            f"cannot resume: {run} has no complete checkpoint (train it again without --resume)")


def checkpoint_generate(tmp: Path, clean: dict) -> tuple[list[str], str]:
    run = copy(clean["run"], tmp / "run")
    unmarked_checkpoint(run)
    ckpt = run / "checkpoints" / "checkpoint-5"
    return (["generate", "Once", "--run", str(ckpt)],
            f"checkpoint {ckpt} is incomplete (it has no complete.json: its save did not finish) "
            "(pass the run dir or another checkpoint)")


INCOMPLETE = "{data}/{split}.bin is missing or incomplete (prepare again with --force)"
BEYOND = ("{where} holds token id 65535, beyond the tokenizer's 512: the file is damaged or was made with another "
          "tokenizer (prepare again with --force)")
CASES: dict[str, tuple[Callable, str]] = {  # name -> (build, the one line, prefix-matched when it ends in "...")
    "train.bin truncated": (data_case(lambda d: truncate(d / "train.bin", 0.7),
                                      INCOMPLETE.replace("{split}", "train")), ""),
    "val.bin truncated": (data_case(lambda d: truncate(d / "val.bin", 0.7), INCOMPLETE.replace("{split}", "val")), ""),
    "train.bin garbled": (data_case(lambda d: garble(d / "train.bin"),
                                    BEYOND.replace("{where}", "the training data")), ""),
    "val.bin garbled": (data_case(lambda d: garble(d / "val.bin"), BEYOND.replace("{where}", "{data}/val.bin")), ""),
    "meta.json garbled": (data_case(lambda d: (d / "meta.json").write_text("{not json"),
                                    "{data}/meta.json is corrupt (prepare again with --force)"), ""),
    "meta.json truncated": (data_case(lambda d: truncate(d / "meta.json"),
                                      "{data}/meta.json is corrupt (prepare again with --force)"), ""),
    "tokenizer that does not match the data": (data_case(
        other_tokenizer, "the tokenizer files in {data} are not the tokenizer its tokens were made with "
        "(prepare again with --force)"), ""),
    "model.safetensors truncated": (run_case(lambda r: truncate(r / "model.safetensors"),
                                             "the weights in {run} cannot be read ("), "prefix"),
    "model.safetensors truncated (eval)": (run_case(lambda r: truncate(r / "model.safetensors"),
                                                    "the weights in {run} cannot be read (", "eval"), "prefix"),
    "checkpoint without its completion marker (resume)": (checkpoint_resume, ""),
    "checkpoint without its completion marker (generate)": (checkpoint_generate, ""),
    "config.json that asks for remote code": (run_case(auto_map, "{run}/config.json asks for remote code (auto_map), "
                                                       "which tinystory never runs (use a model that tinystory or "
                                                       "plain transformers wrote)"), ""),
    "config.json that asks for remote code (quantize)": (run_case(
        auto_map, "{run}/config.json asks for remote code (auto_map), which tinystory never runs (use a model that "
        "tinystory or plain transformers wrote)", "quantize"), ""),
    "config.json that asks for remote code (push)": (run_case(
        auto_map, "{run}/config.json asks for remote code (auto_map), which tinystory never runs (use a model that "
        "tinystory or plain transformers wrote)", "push"), ""),
    "pickle .bin weights": (run_case(pickle_weights, "{run} holds pickle weights (.bin), which tinystory never loads "
                                     "(convert them to model.safetensors with transformers (save_pretrained))"), ""),
    "settings file with wrong types": (bad_settings, ""),
    "hub model id with path traversal": (lambda tmp, clean: (["generate", "Once", "--run", "someone/.."],
                                         "someone/.. is not a valid Hub model id (use owner/name, or a local run "
                                         "dir)"), ""),
    "hub dataset id with path traversal": (lambda tmp, clean: (["prepare", "--dataset", "someone/..", "--out",
                                           str(tmp / "p")], "someone/.. is not a valid Hub dataset id (use "
                                           "owner/name, or a local path)"), ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_1(name: str, clean: dict, tmp_path: Path, capsys) -> None:
    build, match = CASES[name]
    args, message = build(tmp_path, clean)
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [x for x in lines if x.startswith(("error", "Traceback"))] == [lines[-1]], err
    if match == "prefix":
        assert lines[-1].startswith(f"error: {message}"), lines[-1]
    else:
        assert lines[-1] == f"error: {message}"
    assert "remote code ran" not in out + err
