"""`tinystory train`: the tiny profile on real text (the bundled sample), a few dozen steps."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sample_stories, write_prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer) -> Path:
    """2,000 training and 200 validation stories of the sample, BPE 512 (~0.7M tokens)."""
    return write_prepared(tmp_path_factory.mktemp("prepared"), bpe_tokenizer,
                          train=sample_stories("train", 2000), val=sample_stories("val", 200))


def tiny(prepared: Path, out: Path, **train: object):
    """The tiny profile on `prepared`, written to `out`, with train.* overrides."""
    from tinystory.settings import load_settings

    base = load_settings(profile="tiny", env={})
    train = {"threads": 1, **train}  # 1 thread: faster for this model, and no stalls on a busy CPU
    return base.replace(train__data=str(prepared), train__out=str(out), **{f"train__{k}": v for k, v in train.items()})


def rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r]


def stopped_copy(run: Path, dest: Path, at_step: int) -> Path:
    """A copy of a finished run as a run stopped just after its checkpoint at `at_step`:
    the later checkpoints and the final model are gone, so `resume=True` goes on from there."""
    shutil.copytree(run, dest)
    for ckpt in (dest / "checkpoints").glob("checkpoint-*"):
        if ckpt.name[11:].isdigit() and int(ckpt.name[11:]) > at_step:
            shutil.rmtree(ckpt)
    (dest / "model.safetensors").unlink()
    return dest


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tinystory", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, cwd=ROOT, **kw)


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="session")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 steps of the tiny profile (eval every 10, checkpoints every 10, all kept)."""
    from tinystory.training import train

    out = tmp_path_factory.mktemp("runs") / "trained"
    return train(tiny(prepared, out, max_steps=30, eval_every=10, save_every=10, keep_checkpoints=5, log_every=5))


def test_loss_falls_on_real_text(trained: Path) -> None:
    train_rows = [r for r in rows(trained) if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    first, last = train_rows[0]["loss"], train_rows[-1]["loss"]
    assert abs(first - math.log(512)) < 0.5  # starts near uniform over the vocab
    assert last < first - 0.6
    evals = [r for r in rows(trained) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["tokens"] == r["step"] * 8 * 64 for r in rows(trained))
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))


def test_run_dir_contents(trained: Path) -> None:
    from tinystory.runs import Run, has_model

    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "settings.toml",
            "metrics.jsonl", "run.json", "loss.png", "checkpoints"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temp files left
    assert has_model(trained)
    info = json.loads((trained / "run.json").read_text())
    assert info["steps"] == 30 and info["tokens_seen"] == 30 * 8 * 64
    assert info["stopped_because"] == "max_steps"
    assert info["precision"] == "fp32" and info["parameters"] == 139_584
    assert info["data"]["tokenizer"] == "bpe:512" and len(info["data"]["tokenizer_sha256"]) == 64
    assert Run(trained).settings.train.max_steps == 30
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert ckpts == ["best", "checkpoint-10", "checkpoint-20", "checkpoint-30"]
    gen = json.loads((trained / "generation_config.json").read_text())
    assert (gen["do_sample"], gen["top_p"], gen["temperature"], gen["max_new_tokens"]) == (True, 0.9, 1.0, 64)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_run_dir_reloads_with_plain_transformers(trained: Path, prepared: Path) -> None:
    """Plain AutoModelForCausalLM gives the logits training evaluated: the same val loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinystory.data import open_prepared
    from tinystory.evaluation import score_stream
    from tinystory.tokenizer import token_byte_lengths
    from tinystory.trainer import eval_slice

    model = AutoModelForCausalLM.from_pretrained(str(trained))
    tok = AutoTokenizer.from_pretrained(str(trained))
    info = json.loads((trained / "run.json").read_text())
    whole = open_prepared(prepared).tokens("val")
    sums = score_stream(model, eval_slice(whole, 8192, 64), 64, 8, token_byte_lengths(tok), "cpu")
    assert sums["nats"] / sums["tokens"] == pytest.approx(info["best_eval_loss"], abs=1e-5)
    assert info["eval_slice_tokens"] == 8192
    sums = score_stream(model, whole, 64, 8, token_byte_lengths(tok), "cpu")  # the final figure: all of it
    assert sums["nats"] / sums["tokens"] == pytest.approx(info["final_eval"]["eval_loss"], abs=1e-5)
    assert info["final_eval"]["tokens"] == len(whole) // 64 * 64 > 4 * 8192
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # BOS, as in training
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


def test_resume_reproduces_the_uninterrupted_losses(trained: Path, tmp_path: Path) -> None:
    """Drop everything after step 10, resume: steps 15..30 repeat the first run's losses."""
    from tinystory.training import train

    run = stopped_copy(trained, tmp_path / "resumed", at_step=10)
    assert train(tiny(run.parent, run), resume=True) == run  # data/settings come from the run itself
    before = {r["step"]: r for r in rows(trained) if "loss" in r}
    after = {r["step"]: r for r in rows(run) if "loss" in r}
    assert sorted(after) == [5, 10, 15, 20, 25, 30]
    for step in (15, 20, 25, 30):
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-4)
        assert after[step]["lr"] == pytest.approx(before[step]["lr"], rel=1e-9)
    assert json.loads((run / "run.json").read_text())["steps"] == 30


# ------------------------------------------------------------------ time to a target


def test_the_eval_slice_is_spread_over_the_whole_split() -> None:
    # guards "the first 32k tokens of val.bin": the opening stories are easier than the rest
    import numpy as np

    from tinystory.trainer import eval_slice

    tokens = np.arange(1000 * 64, dtype=np.uint16)  # 1,000 blocks of 64, each block's ids tell where it was
    picked = eval_slice(tokens, 10 * 64, 64).reshape(-1, 64)[:, 0] // 64
    assert picked.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]  # first to last, evenly
    assert eval_slice(tokens, 0, 64) is tokens and eval_slice(tokens, 1000 * 64, 64) is tokens


def test_the_slice_estimates_the_whole_split_within_its_error(trained: Path, prepared: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinystory.data import open_prepared
    from tinystory.evaluation import score_stream
    from tinystory.tokenizer import token_byte_lengths
    from tinystory.trainer import eval_slice

    model = AutoModelForCausalLM.from_pretrained(str(trained))
    lengths = token_byte_lengths(AutoTokenizer.from_pretrained(str(trained)))
    whole = open_prepared(prepared).tokens("val")
    part = score_stream(model, eval_slice(whole, 8192, 64), 64, 8, lengths, bpb_se=True)
    full = score_stream(model, whole, 64, 8, lengths)
    bpb = [s["text_nats"] / s["bytes"] / math.log(2) for s in (part, full)]
    assert 0.005 < part["bpb_se"] < 0.05  # 128 blocks of a 0.14M model: a few hundredths of a bit
    assert abs(bpb[0] - bpb[1]) < 3 * part["bpb_se"]
    head = score_stream(model, whole[:8192], 64, 8, lengths)  # what training scored before: the first stories
    assert abs(bpb[0] - bpb[1]) < abs(head["text_nats"] / head["bytes"] / math.log(2) - bpb[1])


def test_target_bpb_stops_at_the_first_evaluation_at_or_below_it(prepared: Path, tmp_path: Path, capsys) -> None:
    from tinystory.training import train

    # every evaluation on the whole split here (eval_tokens 0), so the first one at or below
    # the target can be read back from metrics.jsonl
    probe = train(tiny(prepared, tmp_path / "probe", max_steps=40, eval_every=10, eval_tokens=0))
    evals = [r for r in rows(probe) if "eval_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    target = (evals[1]["eval_bpb"] + evals[2]["eval_bpb"]) / 2  # met first at step 30
    called = time.time()
    run = train(tiny(prepared, tmp_path / "run", max_steps=40, eval_every=10, eval_tokens=0, target_bpb=target))
    took = time.time() - called
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == 30 and info["stopped_because"] == "target" and info["target_reached"] is True
    assert info["tokens_to_target"] == 30 * 8 * 64
    # counted from the call (a library call: not from the start of this long-lived process)
    assert 0 < info["time_to_target_s"] <= took + 0.01
    assert info["final_eval"]["eval_bpb"] == pytest.approx(evals[2]["eval_bpb"], abs=1e-6)
    assert info["final_eval"]["eval_bpb"] <= target
    err = capsys.readouterr().err
    assert f"target reached at step 30: bpb {evals[2]['eval_bpb']:.4f} <= {target:g}" in err
    assert f"eval  step 10 (whole val split): loss {evals[0]['eval_loss']:.4f}" in err

    # train.stop_at_target false: the same step, tokens and bpb are recorded, and the run
    # trains on to its cap; a resume after the target keeps what was recorded
    on = train(tiny(prepared, tmp_path / "on", max_steps=40, eval_every=10, eval_tokens=0, save_every=10,
                    target_bpb=target, stop_at_target=False))
    full = json.loads((on / "run.json").read_text())
    assert full["steps"] == 40 and full["stopped_because"] == "max_steps" and full["target_reached"] is True
    assert full["tokens_to_target"] == 30 * 8 * 64 and full["time_to_target_s"] > 0
    assert "target reached at step 30" in capsys.readouterr().err
    again = stopped_copy(on, tmp_path / "again", at_step=30)
    assert train(tiny(prepared, again), resume=True) == again  # the settings come from the run itself
    back = json.loads((again / "run.json").read_text())
    assert back["steps"] == 40 and back["tokens_to_target"] == 30 * 8 * 64
    assert back["time_to_target_s"] == full["time_to_target_s"]
    assert "target reached" not in capsys.readouterr().err  # not found a second time after the resume


def test_target_bpb_checks_the_whole_split_and_a_cap_can_miss_it(prepared: Path, tmp_path: Path, capsys) -> None:
    from tinystory.training import train

    run = train(tiny(prepared, tmp_path / "run", max_steps=20, eval_every=10, target_bpb=0.5))
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == 20 and info["stopped_because"] == "max_steps"  # missed: not an error
    assert info["target_reached"] is False and info["time_to_target_s"] is None
    err = capsys.readouterr().err
    assert "eval  step 10 (8,192-token slice of val):" in err and "target 0.5" in err
    assert err.strip().splitlines()[-1].endswith("; target 0.5 not reached")


def test_eval_every_minutes_evaluates_by_the_clock(prepared: Path, tmp_path: Path) -> None:
    """train.eval_every_minutes: with no step cadence at all (eval_every 0), an evaluation
    follows the first step that ends at least the interval after the last evaluation (or
    the start), and none comes sooner. Replayed from metrics.jsonl, one row a step."""
    from tinystory.errors import TrainingError
    from tinystory.training import train

    interval = 0.0025 * 60  # 0.15 s: a tiny step took ~10 ms on a Zen 4 EPYC, 0.6 s gave one evaluation
    run = train(tiny(prepared, tmp_path / "run", max_steps=40, eval_every=0, log_every=1, save_every=40,
                     eval_every_minutes=0.0025))
    got = [r["step"] for r in rows(run) if "eval_bpb" in r]
    assert got[-1] == 40  # the final model always gets one
    got = got[:-1]
    assert len(got) >= 2, rows(run)[-1]  # 40 tiny steps take several intervals
    last, slack = 0.0, 0.05  # wall time of the last evaluation; the rows are written a moment after the check
    for r in rows(run):
        if "eval_bpb" in r:
            last = r["wall_time_s"]
        elif "loss" in r and r["step"] < 40:
            since = r["wall_time_s"] - last
            if since >= interval + slack:
                assert r["step"] in got, f"no evaluation after step {r['step']}, {since:.2f} s after the last"
            elif since < interval - slack:
                assert r["step"] not in got, f"evaluation after step {r['step']}, only {since:.2f} s after the last"
    off = train(tiny(prepared, tmp_path / "off", max_steps=40, eval_every=0, save_every=40))
    assert [r["step"] for r in rows(off) if "eval_bpb" in r] == [40]  # off by default: only the final one
    with pytest.raises(TrainingError) as e:  # a negative interval would evaluate after every step
        train(tiny(prepared, tmp_path / "bad", max_steps=2, eval_every_minutes=-1.0))
    assert str(e.value) == ("train.eval_every_minutes is -1, below 0 (set the minutes between evaluations, or 0 for "
                            "evaluations by steps only)")
    assert not (tmp_path / "bad").exists()  # refused before the run dir is made


def test_a_clock_evaluation_just_before_a_step_one_is_left_to_it() -> None:
    """A race run on a Zen 4 EPYC evaluated at step 1998 by the clock and at 2000 by
    train.eval_every, two whole-split target checks of nearly the same model. The clock's
    is left to the step's when that comes within a tenth of the clock's interval."""
    import time as clock
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from tinystory.callbacks import RunStatus, Schedule, StopControl, step_eval_soon

    assert step_eval_soon(1998, 250, 0.26, 6.0) and step_eval_soon(1977, 250, 0.26, 6.0)
    assert not step_eval_soon(1976, 250, 0.26, 6.0)  # 24 steps = 6.24 s away: the clock's goes ahead
    assert not step_eval_soon(2000, 250, 0.26, 6.0)  # the step's is now: one evaluation either way
    assert not step_eval_soon(1998, 0, 0.26, 6.0)  # no step cadence: never deferred

    def clock_evaluates(step: int, strategy: str) -> bool:
        status = RunStatus(run_dir=Path("."), tokens_per_step=1, parameters=1, peak_flops=1.0,
                           schedule=Schedule(0, 10_000, 0.1), eval_every_s=60.0)
        status.started = clock.monotonic() - 0.26 * step  # 0.26 s a step so far
        status.last_eval_wall = status.wall() - 61.0  # the clock's interval has passed
        control = TrainerControl()
        StopControl(status).on_step_end(SimpleNamespace(eval_strategy=strategy, eval_steps=250),
                                        TrainerState(global_step=step), control)
        return control.should_evaluate

    assert not clock_evaluates(1998, "steps")
    assert clock_evaluates(1976, "steps") and clock_evaluates(1998, "no")


def test_early_stopping_triggers(prepared: Path, tmp_path: Path, bpe_tokenizer, capsys) -> None:
    """With lr 0 the eval loss never improves: stop after the best eval + 2 more. After
    many passes over the training text the stop comes with a hint; after a few, not."""
    from tinystory.data import open_prepared
    from tinystory.training import train

    run = train(tiny(prepared, tmp_path / "es", lr=0.0, max_steps=50, eval_every=2, save_every=50, log_every=2,
                     early_stopping_patience=2))
    info = json.loads((run / "run.json").read_text())
    assert (info["stopped_because"], info["steps"]) == ("early_stopping", 6)
    one_pass = len(open_prepared(prepared).tokens("train")) // 64 * 64  # the whole 64-token blocks
    assert info["passes"] == round(6 * 8 * 64 / one_pass, 2) < 0.1
    assert "passes over the" not in capsys.readouterr().err
    small = write_prepared(tmp_path / "small", bpe_tokenizer, train=sample_stories("train", 4),
                           val=sample_stories("val", 50))
    run = train(tiny(small, tmp_path / "es-small", lr=0.0, max_steps=50, eval_every=4, save_every=50, log_every=4,
                     early_stopping_patience=2))
    info = json.loads((run / "run.json").read_text())
    one_pass = len(open_prepared(small).tokens("train")) // 64 * 64  # 1,280 tokens: 4.8 passes in 12 steps
    assert (info["stopped_because"], info["steps"]) == ("early_stopping", 12)
    assert info["passes"] == round(12 * 8 * 64 / one_pass, 2) >= 3
    assert (f"the validation loss stopped improving after {info['passes']:.1f} passes over the {one_pass:,} "
            "training tokens: more text (tinystory prepare) or weight decay 0.5 (this run's is 0.1: "
            "--set train.weight_decay=0.5) lets a run train on") in capsys.readouterr().err


def test_the_many_passes_hint_names_weight_decay_only_below_the_measured_best() -> None:
    """The cpu profile trains with weight decay 0.5: its hint names only more text (1.0
    ended worse than 0.5 at 15 minutes), not the 0.5 it already has."""
    from tinystory.training import many_passes_hint

    assert many_passes_hint(7.62, 1_612_800, 0.5) == (
        "the validation loss stopped improving after 7.6 passes over the 1,612,800 training tokens: more text "
        "(tinystory prepare) lets a run train on")
    assert many_passes_hint(3.0, 1280, 0.0).endswith(
        "more text (tinystory prepare) or weight decay 0.5 (this run's is 0: --set train.weight_decay=0.5) lets a "
        "run train on")


def test_wandb_offline_run_folder(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinystory.training import train

    assert os.environ["WANDB_MODE"] == "offline"
    train(tiny(prepared, tmp_path / "wb", max_steps=2, eval_every=0, wandb="on"))
    runs = list((Path(os.environ["WANDB_DIR"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert f"W&B offline run folder: {runs[0]}" in capsys.readouterr().err.replace("\n", "")


def _hide(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> None:
    """`importlib.util.find_spec(name)` answers None in `module`: as if `name` were not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(module + ".importlib.util.find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_wandb_missing_is_one_line_or_off(prepared: Path, monkeypatch, capsys) -> None:
    # a core dependency, but a user may have uninstalled it: our line, not the Trainer's
    # "WandbCallback requires wandb to be installed"
    from tinystory import wandb_mode
    from tinystory.cli.app import main

    _hide(monkeypatch, "tinystory.wandb_mode", "wandb")
    assert wandb_mode.decide("auto") == (None, "wandb is not installed")
    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "tiny", "--data", str(prepared), "--max-steps", "1", "--wandb"])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: train.wandb = on needs the wandb package, which is not installed (pip install wandb)")


def test_8bit_adamw_without_bitsandbytes_is_one_line(monkeypatch) -> None:
    # bitsandbytes has no wheel for Intel macOS: a CUDA user without it gets the fix, not an ImportError
    from tinystory.errors import TrainingError
    from tinystory.settings import load_settings
    from tinystory.trainer import optimizer_name

    settings = load_settings(profile="rtx2070", env={})
    _hide(monkeypatch, "tinystory.trainer", "bitsandbytes")
    assert optimizer_name(settings, "cpu") == "adamw_torch"  # never bitsandbytes on a CPU
    with pytest.raises(TrainingError) as e:
        optimizer_name(settings, "cuda")
    assert str(e.value) == ("train.optimizer = adamw_bnb_8bit needs bitsandbytes, which is not installed "
                            "(pip install bitsandbytes, or --set train.optimizer=adamw_torch (more GPU memory))")


# ---------------------------------------------------------------------------- the CLI


def test_fp16_on_cpu_is_one_line(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    from tinystory.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "tiny", "--data", str(prepared), "--precision", "fp16"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == ("error: fp16 training needs a CUDA GPU and this machine has none "
                   "(use --precision auto, bf16 or fp32)\n")


def test_bad_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinystory.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "tiny", "--data", str(tmp_path / "nope")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: prepared data {tmp_path / 'nope'} does not exist")


def test_length_flags_are_exclusive(capsys: pytest.CaptureFixture) -> None:
    # guards the usage error naming the two flags (not a bare exit 2), and the help text
    # saying what the code does (it refuses two lengths; it does not clear the others)
    from tinystory.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--max-steps", "3", "--minutes", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-steps and --minutes cannot be used together" in err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Length (pick at most one)" in out and "cleared" not in out


def test_init_from_needs_the_same_tokenizer(random_run: Path, tmp_path: Path, capsys) -> None:
    from tinystory.cli.app import main
    from tinystory.tokenizer import train_bpe

    other = train_bpe(sample_stories("train", 100), 300)
    data = write_prepared(tmp_path / "other", other, train=sample_stories("train", 50),
                          val=sample_stories("val", 20), name="bpe:300")
    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "tiny", "--data", str(data), "--init-from", str(random_run)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --init-from {random_run} uses ") and f"the prepared data {data} uses bpe:300" in err


def test_sigint_saves_a_checkpoint_and_exits_130(prepared: Path, tmp_path: Path) -> None:
    from tinystory.runs import latest_checkpoint

    run = tmp_path / "sig"
    proc = cli("train", "--profile", "tiny", "--data", str(prepared), "--out", str(run), "--max-steps", "100000",
               "--set", "train.log_every=1", "--set", "train.threads=1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert out == ""
    assert f"resume with: tinystory train --resume --out {run}" in err.replace("\n", "")
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.pt").is_file()
    assert json.loads((run / "run.json").read_text())["stopped_because"] == "interrupted"


def test_two_process_gloo_ddp(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "tinystory", "train",
         "--profile", "tiny", "--data", str(prepared), "--out", str(run), "--max-steps", "6",
         "--set", "train.eval_every=3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(run)  # printed once, by rank 0
    info = json.loads((run / "run.json").read_text())
    assert (info["world_size"], info["steps"], info["tokens_seen"]) == (2, 6, 6 * 2 * 8 * 64)
    assert [p.name for p in run.glob("model*.safetensors")] == ["model.safetensors"]


def test_dry_run_prints_the_memory_plan(capsys: pytest.CaptureFixture) -> None:
    from tinystory.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "rtx2070", "--dry-run"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "3,072 tokens per step" in out and "8.00 GiB" in out and "fits" in out and "does not fit" not in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "rtx2070", "--dry-run", "--set", "train.batch_size=4096"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "suggestion:" in out


def test_auto_prepare_without_data(capsys: pytest.CaptureFixture) -> None:
    """tiny allows auto_prepare: no --data prepares the bundled sample first and says so."""
    from tinystory.settings import load_settings
    from tinystory.training import train

    run = train(load_settings(profile="tiny", env={}).replace(train__max_steps=2, train__eval_every=0,
                                                              train__threads=1))
    assert "no --data given: preparing 'sample' with tokenizer bpe:512 first" in capsys.readouterr().err
    data = Path(json.loads((run / "run.json").read_text())["data"]["path"])
    assert data.is_relative_to(Path(os.environ["TINYSTORY_CACHE_DIR"])) and (data / "train.bin").is_file()
    assert run.parent == Path(os.environ["TINYSTORY_RUNS_DIR"])


def test_a_loss_that_stays_nan_stops_with_one_line(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """lr 1e6 blows the weights up within a few steps; checkpoints stop at the last good one."""
    from tinystory.errors import TrainingError
    from tinystory.training import train

    monkeypatch.setattr("tinystory.callbacks.NONFINITE_PATIENCE", 3)
    with pytest.raises(TrainingError) as e:
        train(tiny(prepared, tmp_path / "nan", lr=1e6, warmup_steps=0, grad_clip=0.0, max_steps=40,
                   save_every=2, eval_every=0, log_every=1))
    msg = str(e.value)
    bad = [r["step"] for r in rows(tmp_path / "nan") if "loss" in r and not math.isfinite(r["loss"])]
    assert bad and msg.startswith(f"training diverged: the loss has been NaN since step {bad[0]} ")
    ckpt = sorted(int(p.name[11:]) for p in (tmp_path / "nan" / "checkpoints").glob("checkpoint-*"))
    assert ckpt and ckpt[-1] < bad[0] and msg.endswith(f"checkpoint-{ckpt[-1]})")
    assert "(lower train.lr (now 1e+06) or raise train.warmup_steps; last good checkpoint: " in msg
    assert "\n" not in msg
    info = json.loads(((tmp_path / "nan") / "run.json").read_text())
    assert info["stopped_because"] == "diverged"


def test_minutes_fits_the_run_to_the_wall_time(prepared: Path, tmp_path: Path) -> None:
    from tinystory.training import train

    run = train(tiny(prepared, tmp_path / "min", max_steps=0, minutes=0.1, eval_every=0, log_every=1))
    info = json.loads((run / "run.json").read_text())
    assert info["stopped_because"] in ("time", "minutes_schedule_end")
    last = [r for r in rows(run) if "loss" in r][-1]  # logged at the end of the last step
    assert last["step"] == info["steps"] >= 3 and info["schedule_steps"] >= info["steps"]
    assert 6.0 * 0.6 < last["wall_time_s"] < 6.0 + 4.0  # stops at the first step end past 6 s


def test_eta_never_passes_the_time_budget() -> None:
    """With --minutes the run stops at the deadline, so the ETA is the smaller of the step
    estimate and the time left (early in a run the fitted step count can be far off)."""
    import time

    from tinystory.progress import Display

    left: list[float | None] = [60.0]
    d = Display(lambda: 1000, interactive=False, time_left=lambda: left[0])
    d._t0, d._step0 = time.monotonic() - 10.0, 0  # 10 steps in 10 s: 990 s to go by steps
    assert d._eta(10) == "1:00"
    left[0] = None  # no budget: the step estimate
    assert d._eta(10) in ("16:29", "16:30")
    left[0] = -3.0  # past the deadline (the last step is finishing)
    assert d._eta(10) == "0:00"
    assert Display(lambda: 1000, interactive=False)._eta(0) == "?"


def test_eager_attention_trains_the_same_model(prepared: Path, tmp_path: Path) -> None:
    """train.attention = "eager" (the cpu profile's) computes the same losses as sdpa in fp32,
    and the run dir still loads with transformers' default attention."""
    from transformers import AutoModelForCausalLM

    from tinystory.training import train

    losses = {}
    for attention in ("sdpa", "eager"):
        run = train(tiny(prepared, tmp_path / attention, max_steps=6, log_every=1, eval_every=0, save_every=100,
                         precision="fp32", attention=attention))
        losses[attention] = [r["loss"] for r in rows(run) if "loss" in r]
    assert len(losses["eager"]) == 6
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-4)
    assert "attn" not in (tmp_path / "eager" / "config.json").read_text()  # not saved with the model
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "eager").config._attn_implementation == "sdpa"


def test_run_json_names_the_device(monkeypatch) -> None:
    import torch

    from tinystory.loading import cpu_model, device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA GeForce RTX 2070")
    assert device_name("cuda") == "cuda: NVIDIA GeForce RTX 2070"
    assert device_name("cpu") == f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"
    assert cpu_model() and cpu_model() != "unknown"


def test_compiled_loss_trains_the_same_model(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """With torch_compile on one process, StoryTrainer computes the loss itself (model +
    loss in one compiled graph, no logits out): the same losses as transformers' loss.
    torch.compile is the identity here: the graph is inductor's job, this is the wiring."""
    import torch

    from tinystory.training import train

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    losses = {}
    for compiled in (False, True):
        run = train(tiny(prepared, tmp_path / str(compiled), max_steps=6, log_every=1, eval_every=0,
                         save_every=100, precision="fp32", torch_compile=compiled))
        losses[compiled] = [r["loss"] for r in rows(run) if "loss" in r]
    assert len(losses[True]) == 6 and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_compiled_loss_runs_under_autocast(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """The Trainer's autocast wraps model.forward only; the compiled loss calls model.model
    and lm_head itself, so it must enter autocast on its own (run in fp32 by mistake, it
    was 5x slower on an H100)."""
    import torch

    from tinystory import trainer as trainer_mod
    from tinystory.training import train

    seen = []
    real = trainer_mod.summed_loss

    def spy(model, input_ids, labels):  # type: ignore[no-untyped-def]
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(model, input_ids, labels)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(trainer_mod, "summed_loss", spy)
    train(tiny(prepared, tmp_path / "run", max_steps=2, log_every=1, eval_every=0, save_every=100,
               precision="bf16", torch_compile=True))
    assert seen == [(True, torch.bfloat16)] * 2


def test_summed_loss_is_transformers_loss_times_tokens() -> None:
    import torch

    from tinystory.model import build_config, build_model
    from tinystory.trainer import summed_loss

    torch.manual_seed(0)
    model = build_model(build_config("tiny", 300, 1, 2, 0))
    ids = torch.randint(3, 300, (3, 40))
    labels = ids.clone()
    labels[0, 5:15] = -100  # ignored positions count neither in the sum nor in the tokens
    n = int((labels[:, 1:] != -100).sum())
    assert n == 3 * 39 - 10
    with torch.no_grad():
        assert float(summed_loss(model, ids, labels)) / n == pytest.approx(
            float(model(input_ids=ids, labels=labels).loss), rel=1e-5)
    from transformers import GPT2Config, GPT2LMHeadModel  # another family (--init-from a hub model)

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, bos_token_id=1,
                                      eos_token_id=2)).eval()
    with torch.no_grad():
        assert float(summed_loss(gpt2, ids, labels)) / n == pytest.approx(
            float(gpt2(input_ids=ids, labels=labels).loss), rel=1e-5)


def test_training_args_for_the_compiled_loss_and_cuda(tmp_path: Path) -> None:
    from tinystory.precision import Precision
    from tinystory.settings import load_settings
    from tinystory.trainer import training_args

    s = load_settings(profile="a100", env={}).replace(train__compile_mode="reduce-overhead")
    fp32 = Precision("fp32", "asked", {})  # bf16 arguments would need a GPU to build
    own = training_args(s, tmp_path, fp32, "cuda", 10, [], compile_loss="reduce-overhead")
    # StoryTrainer compiles model + loss in compile_mode; the Trainer must not compile again
    assert not own.torch_compile and own.torch_compile_mode is None
    assert own.accelerator_config.non_blocking and own.dataloader_pin_memory  # no sync per batch copy
    ddp = training_args(s, tmp_path, fp32, "cuda", 10, [], compile_loss=None)
    assert ddp.torch_compile and ddp.torch_compile_mode == "reduce-overhead"
    cpu = training_args(load_settings(profile="cpu", env={}), tmp_path, Precision("fp32", "probe", {}), "cpu", 10, [])
    assert not cpu.accelerator_config.non_blocking and cpu.torch_compile_mode is None


@pytest.mark.slow
def test_compiled_loss_resumes_exactly(prepared: Path, tmp_path: Path) -> None:
    """Real inductor on the CPU: the compiled loss holds the model it was built on, so a
    resumed run must train the weights the checkpoint restored (same losses as without a stop)."""
    from tinystory.training import train

    def settings(out: Path):  # type: ignore[no-untyped-def]
        return tiny(prepared, out, max_steps=12, torch_compile=True, eval_every=0, save_every=4,
                    keep_checkpoints=5, log_every=2, precision="fp32")

    run = train(settings(tmp_path / "whole"))
    resumed = stopped_copy(run, tmp_path / "resumed", at_step=4)
    train(settings(resumed), resume=True)
    before = {r["step"]: r["loss"] for r in rows(run) if "loss" in r}
    after = {r["step"]: r["loss"] for r in rows(resumed) if "loss" in r}
    assert sorted(after) == [2, 4, 6, 8, 10, 12] and after[12] < after[2]
    assert [after[s] for s in (6, 8, 10, 12)] == pytest.approx([before[s] for s in (6, 8, 10, 12)], rel=1e-5)


def test_no_cpu_compiler_warns_once_and_trains_eagerly(monkeypatch, capsys) -> None:
    from tinystory import trainer

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    trainer._cpu_can_compile.cache_clear()
    try:
        assert [trainer.compile_ok(True, "cpu") for _ in range(2)] == [False, False]
        assert trainer.compile_ok(True, "cuda") and not trainer.compile_ok(False, "cpu")
    finally:
        trainer._cpu_can_compile.cache_clear()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines == ["warning: torch.compile needs a C++ compiler on a CPU (none found): training without it, "
                     "~10% slower"]


def test_peak_flops_stops_early_on_a_slow_dtype(monkeypatch) -> None:
    # Guards the start of training on CPUs without native bf16: one emulated 1024^3 bf16
    # matmul took 2.6 s on an AMD EPYC family 23, and a fixed count of repetitions at
    # 512, 1024 and 2048 held `train` up for minutes before its first step.
    import time as time_mod

    import torch

    from tinystory import precision

    sizes = []
    real = torch.matmul

    def slow(a, b):  # type: ignore[no-untyped-def]
        sizes.append(a.shape[0])
        time_mod.sleep(0.05 * (a.shape[0] / 512) ** 3)  # 0.05 s at 512, 0.4 s at 1024
        return real(a[:2, :2], b[:2, :2])

    monkeypatch.setattr(torch, "matmul", slow)
    t0 = time_mod.perf_counter()
    peak = precision.peak_flops(torch.float32, seconds=0.1)
    assert time_mod.perf_counter() - t0 < 1.5
    assert sizes == [512, 512, 512, 1024]  # warm-up + two timed at 512; 1024's warm-up alone ends it
    assert 2 * 512**3 / 0.05 * 0.7 < peak < 2 * 512**3 / 0.05 * 1.05  # the 512 rate, measured
