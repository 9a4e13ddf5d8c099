"""Faults: `kill -9` inside a checkpoint save, a full disk, and corrupt or hostile inputs.

Each command runs as a user runs it (`python -m tinystory ...`, its own process). The
kills and the full disk come from outside the product: a sitecustomize that patches the
Trainer's own save steps, and RLIMIT_FSIZE. benchmarks/bench_faults.py does the same at
many more (random) moments and counts them.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRAIN = ["--profile", "tiny", "--set", "train.save_every=10", "--set", "train.eval_every=10",
         "--set", "train.log_every=5", "--set", "train.threads=1"]
KILL_IN_SAVE = """
import os, signal, sys
if sys.orig_argv[1:4] == ["-m", "tinystory", "train"]:
    import transformers.trainer as T
    from tinystory import callbacks

    POINT, STEP = {point!r}, {step}
    if POINT == "after-weights":
        original = T.Trainer._save_optimizer_and_scheduler
        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == STEP:
                os.kill(os.getpid(), signal.SIGKILL)  # the weights are on disk, the optimizer is not
            original(self, output_dir)
        T.Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    else:  # "before-marker": every file of the checkpoint written, its completion marker not
        original_on_save = callbacks.CheckpointMarker.on_save
        def on_save(self, args, state, control, **kw):
            if state.global_step == STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_on_save(self, args, state, control, **kw)
        callbacks.CheckpointMarker.on_save = on_save
"""


def tinystory(*args: str, env: dict[str, str] | None = None, limit: int | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`tinystory ARGS` in a subprocess; `limit`: RLIMIT_FSIZE in bytes (writes beyond it fail
    with EFBIG, as on a full disk)."""

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "tinystory", *args], env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limited if limit else None)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed command (and nothing like a traceback besides)."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith(("error", "Traceback"))] == [lines[-1]], r.stderr[-2000:]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def eval_loss(run: Path) -> float:
    return float(json.loads((run / "run.json").read_text())["last_eval"]["eval_loss"])


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "data"
    r = tinystory("prepare", "--profile", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def reference(prepared_tiny: Path) -> Path:
    """The uninterrupted run the killed ones must end equal to."""
    run = prepared_tiny.parent / "reference"
    r = tinystory("train", *TRAIN, "--max-steps", "30", "--data", str(prepared_tiny), "--out", str(run))
    assert r.returncode == 0, r.stderr
    return run


# ------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("point,step,keep", [("after-weights", 20, 2), ("before-marker", 20, 1)],
                         ids=["mid-save", "unmarked-keep-1"])
def test_kill_inside_a_checkpoint_save_resumes_to_the_same_losses(point, step, keep, prepared_tiny, reference,
                                                                   tmp_path):
    # guards two things: a checkpoint killed mid-save is never the one --resume picks, and
    # the old checkpoints are rotated away only after the new one is complete (with
    # keep_checkpoints = 1 the Trainer's own rotation deleted the only complete one first)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_IN_SAVE.format(point=point, step=step))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)}
    run = tmp_path / "run"
    r = tinystory("train", *TRAIN, "--max-steps", "30", "--set", f"train.keep_checkpoints={keep}",
                  "--data", str(prepared_tiny), "--out", str(run), env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    from tinystory.runs import latest_checkpoint

    assert latest_checkpoint(run) == run / "checkpoints" / "checkpoint-10"  # not the half-saved step 20
    r = tinystory("train", "--resume", "--out", str(run), "--set", "train.threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert eval_loss(run) == pytest.approx(eval_loss(reference), rel=1e-5)
    marked = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert marked == [f"checkpoint-{s}" for s in (30, 20, 10)[:keep][::-1]]  # rotated after the marker
    assert all((run / "checkpoints" / name / "complete.json").is_file() for name in marked)


def test_a_run_killed_in_its_final_save_resumes_without_an_extra_step(prepared_tiny, reference, tmp_path):
    # the last checkpoint is at max_steps: the Trainer, resumed there, trains one step more
    run = tmp_path / "run"
    import shutil

    shutil.copytree(reference, run)
    for f in ("model.safetensors", "config.json"):  # the final save never happened
        (run / f).unlink()
    r = tinystory("train", "--resume", "--out", str(run), "--set", "train.threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == 30 and eval_loss(run) == eval_loss(reference)
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


# ----------------------------------------------------------------- full disk


FULL = "the disk is full"


def test_full_disk_during_prepare_leaves_nothing(tmp_path):
    r = tinystory("prepare", "--dataset", "sample", "--tokenizer", "bpe:512", "--max-stories", "600",
                  "--out", str(tmp_path / "p"), limit=64 * 1024)
    assert FULL in one_error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(prepared_tiny, tmp_path):
    # a run killed after checkpoint-10 (checkpoint-20 written but never marked), resumed on a
    # full disk: the save of step 20 fails; checkpoint-10 is intact and no half checkpoint stays
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_IN_SAVE.format(point="before-marker", step=20))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)}
    run = tmp_path / "run"
    r = tinystory("train", *TRAIN, "--max-steps", "20", "--data", str(prepared_tiny), "--out", str(run), env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpt = run / "checkpoints" / "checkpoint-10"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    r = tinystory("train", "--resume", "--out", str(run), limit=200 * 1024)
    assert FULL in one_error_line(r)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # intact
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-10"]  # no half one
    r = tinystory("train", "--resume", "--out", str(run))  # room again: it goes on
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["steps"] == 20


def test_full_disk_during_quantize_and_generate_leaves_nothing(prepared_tiny, tmp_path):
    run = tmp_path / "run"
    r = tinystory("train", *TRAIN, "--max-steps", "5", "--data", str(prepared_tiny), "--out", str(run))
    assert r.returncode == 0, r.stderr
    for method, out in (("int8", tmp_path / "q"), ("gguf-f32", tmp_path / "q.gguf")):
        r = tinystory("quantize", str(run), "--method", method, "--out", str(out), "--profile", "tiny",
                      limit=100 * 1024)
        assert FULL in one_error_line(r)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), method
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n" * 40)
    r = tinystory("generate", "--run", str(run), "--prompts-file", str(prompts), "--greedy", "-n", "40",
                  "--out", str(tmp_path / "stories.jsonl"), limit=4 * 1024)
    assert FULL in one_error_line(r)
    assert not (tmp_path / "stories.jsonl").exists() and not list(tmp_path.glob(".stories.jsonl*"))
