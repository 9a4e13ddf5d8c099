"""Trainer callbacks: the learning-rate schedule, metrics.jsonl and progress, Ctrl-C,
divergence, the `--minutes` budget and complete-checkpoint markers.

They share one `RunStatus` object (what the run knows about itself) with `training.py`.
Only rank 0 writes files or prints; every rank takes the same stop decisions.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from transformers import EarlyStoppingCallback, TrainerCallback

from tinystory import console
from tinystory.paths import write_atomic
from tinystory.runs import COMPLETE, rotate_checkpoints

NONFINITE_PATIENCE = 10  # optimizer steps in a row with a NaN/inf loss before we stop


class Schedule:
    """Linear warmup then cosine decay to `min_ratio` of the peak, over `total` steps.

    A callable object, not a function, so `LambdaLR.state_dict()` saves its fields in every
    checkpoint: a resumed run gets the same `total` (refitted or not) and `elapsed_s`.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio
        self.elapsed_s = 0.0  # training wall time so far, across resumes (--minutes)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def process_start() -> float:
    """When this process started (time.time() scale): the operating system's record, so
    Python's own start-up and imports count too. The `tinystory` command counts time to
    target from here; a library call of `train()` from when it was called."""
    try:
        return float(psutil.Process().create_time())
    except psutil.Error:
        return time.time()


@dataclass
class RunStatus:
    """What the callbacks and the training flow share about the running run: its rates and
    its schedule, its evaluations, its time, and why it stopped."""

    run_dir: Path
    tokens_per_step: int
    parameters: int
    peak_flops: float  # measured matmul FLOP/s in the training dtype (MFU denominator)
    schedule: Schedule
    block_size: int = 0
    is_main: bool = True
    world_size: int = 1
    budget_s: float = 0.0  # --minutes as seconds, 0 = none
    wall_offset_s: float = 0.0  # wall time of earlier sessions (resume)
    started: float = field(default_factory=time.monotonic)
    eval_s: float = 0.0  # time spent evaluating this session (not training throughput)
    interrupted: bool = False
    stopped_because: str = "max_steps"
    nonfinite_steps: int = 0
    nonfinite_value: str = ""
    first_bad_step: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    eval_slice_tokens: int = 0  # tokens of the slice scored while training; 0: the whole split
    target_bpb: float = 0.0  # --target-bpb, 0 = none
    train_tokens: int = 0  # tokens in the training data's whole blocks (one pass)
    stop_at_target: bool = True  # train.stop_at_target: False records the target and trains on
    eval_every_s: float = 0.0  # train.eval_every_minutes as seconds, 0 = by steps only
    last_eval_wall: float = 0.0  # wall() at the last evaluation (or at the start of this session)
    target: dict[str, float] = field(default_factory=dict)  # where the target was reached (step, bpb, ...)
    final_eval: dict[str, float] = field(default_factory=dict)  # the saved model on the whole split
    command_started: float = field(default_factory=time.time)  # time.time() when the command started

    def wall(self) -> float:
        """Training wall time in seconds, earlier sessions included."""
        return self.wall_offset_s + time.monotonic() - self.started

    def since_command_start(self) -> float:
        """Seconds since this command started (start-up, prepare, compile and probe included),
        plus the training time of earlier sessions of a resumed run."""
        return self.wall_offset_s + time.time() - self.command_started


# A clock evaluation is left to train.eval_every's when that comes within this share of the
# clock's interval: two evaluations a few steps apart score nearly the same model, and near
# a --target-bpb each is a whole-split check (12 s for cpu-3m on a Zen 4 EPYC).
CLOCK_EVAL_DEFERS = 0.1


def step_eval_soon(step: int, every: int, s_per_step: float, within_s: float) -> bool:
    """Whether train.eval_every's next evaluation (every `every` steps, 0 = none) comes
    after `step` and within `within_s` seconds at `s_per_step`."""
    left = -step % every if every else 0
    return bool(left) and left * s_per_step <= within_s


def _max_over_ranks(values: list[int], world_size: int) -> list[int]:
    """Element-wise max of `values` over all ranks (one small all-reduce; identity alone)."""
    if world_size <= 1:
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


class Metrics(TrainerCallback):
    """Appends every logged value to metrics.jsonl (step, tokens, wall time) and shows progress."""

    def __init__(self, status: RunStatus, display: Any) -> None:
        self.status = status
        self.display = display
        self.path = status.run_dir / "metrics.jsonl"
        self._last: tuple[float, int, float] | None = None  # (time, step, eval_s) at the last log

    def on_train_begin(self, args, state, control, **kw):
        self._last = (time.monotonic(), state.global_step, self.status.eval_s)
        if self.status.is_main:
            self.display.start(state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        status, logs = self.status, dict(logs or {})
        row: dict[str, Any] = {"step": state.global_step, "tokens": state.global_step * status.tokens_per_step,
                               "wall_time_s": round(status.wall(), 3)}
        if "loss" in logs:
            now = time.monotonic()
            t0, step0, eval0 = self._last or (now, 0, 0.0)
            dt = max(1e-9, now - t0 - (status.eval_s - eval0))  # training time only
            tok_s = (state.global_step - step0) * status.tokens_per_step / dt
            self._last = (now, state.global_step, status.eval_s)
            row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                       tok_per_s=round(tok_s, 1), mfu=round(mfu(status, tok_s), 4))
        elif "eval_loss" in logs:
            row.update({k: v for k, v in logs.items() if k.startswith("eval_")})
        else:
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if status.is_main:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            self.display.update(row, state)

    def on_train_end(self, args, state, control, **kw):
        if self.status.is_main:
            self.display.stop()


def mfu(status: RunStatus, tok_s: float) -> float:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the measured matmul peak."""
    if status.peak_flops <= 0:
        return 0.0
    return 6 * status.parameters * tok_s / (status.peak_flops * status.world_size)


class StopControl(TrainerCallback):
    """Ctrl-C, NaN/inf losses and the wall-time budget: stop at a step boundary; and
    evaluations by the clock (train.eval_every_minutes).

    The first Ctrl-C asks for a checkpoint and a clean stop; a second one quits at once.
    A loss that stays non-finite stops the run; no checkpoint is written while it is bad.
    With `--minutes`, the schedule's length is refitted from the measured step rate
    (while under 60% of the budget) and the run ends on the schedule's last step or the
    deadline, whichever comes first.
    """

    REFIT_UNTIL = 0.6

    def __init__(self, status: RunStatus) -> None:
        self.status = status
        self._sigint = False
        self._previous: Any = None
        self._fit_from: tuple[float, int] | None = None

    # -- Ctrl-C
    def _handler(self, signum, frame):
        if self._sigint:  # second Ctrl-C: give up now
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self._sigint = True
        if self.status.is_main:
            console.warn("interrupted: saving a checkpoint at the end of this step (Ctrl-C again to quit now)")

    def install(self) -> None:
        """Take over SIGINT (main thread only; call `restore` afterwards)."""
        self._previous = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_begin(self, args, state, control, **kw):
        self.status.started = time.monotonic()  # the budget counts training, not start-up
        self.status.last_eval_wall = self.status.wall()

    # -- per step
    def on_step_end(self, args, state, control, **kw):
        status = self.status
        status.schedule.elapsed_s = status.wall()
        if status.budget_s and status.is_main:
            self._fit(state.global_step)
        end = status.is_main and state.global_step >= status.schedule.total  # rank 0 owns the schedule's length
        over = bool(status.budget_s) and (end or status.wall() >= status.budget_s)
        due = bool(status.eval_every_s) and status.wall() - status.last_eval_wall >= status.eval_every_s and not (
            step_eval_soon(state.global_step, args.eval_steps if args.eval_strategy == "steps" else 0,
                           status.wall() / max(state.global_step, 1), status.eval_every_s * CLOCK_EVAL_DEFERS))
        # every rank must take the same decisions: any rank's flag counts, rank 0's schedule length wins
        bad, diverged, done, sigint, evaluate, total = _max_over_ranks(
            [status.nonfinite_steps > 0, status.nonfinite_steps >= NONFINITE_PATIENCE, over, self._sigint, due,
             status.schedule.total if status.is_main else 0], status.world_size)
        status.schedule.total = total
        if evaluate:  # train.eval_every_minutes: by the clock, besides train.eval_every's steps
            control.should_evaluate = True
        if bad:
            control.should_save = False  # never checkpoint weights that may be poisoned
        if diverged:
            status.stopped_because = "diverged"
            control.should_training_stop = True
            return control
        if done:
            status.stopped_because = "time" if state.global_step < total else "minutes_schedule_end"
            control.should_training_stop = True
        if sigint:
            status.interrupted = True
            status.stopped_because = "interrupted"
            control.should_save = True
            control.should_training_stop = True
        return control

    def _fit(self, step: int) -> None:
        """Refit the schedule's total steps to the budget from the measured step rate."""
        status = self.status
        wall = status.wall()
        if wall > self.REFIT_UNTIL * status.budget_s:
            return
        if self._fit_from is None:  # start measuring after the first steps (startup is slow)
            if step >= 3:
                self._fit_from = (wall, step)
            return
        w0, s0 = self._fit_from
        if step - s0 < 5 or wall - w0 < 2.0:
            return
        rate = (step - s0) / (wall - w0)  # steps/s, evaluations included
        total = step + int((status.budget_s - wall) * rate)
        status.schedule.total = max(step + 1, total)

    def on_train_end(self, args, state, control, **kw):
        self.restore()


class CheckpointMarker(TrainerCallback):
    """Writes `complete.json` into a checkpoint after every file of it is on disk, and only
    then removes the oldest complete checkpoints beyond `keep` (and any that never got
    their marker).

    `latest_checkpoint` only picks checkpoints that have the marker, so a crash in the
    middle of a save never leaves something `--resume` would load. The Trainer's own
    rotation (`save_total_limit`) is off: it deletes old checkpoints before this callback
    runs, so a crash between the two could leave none to resume (with keep = 1).
    """

    def __init__(self, status: RunStatus, keep: int) -> None:
        self.status, self.keep = status, keep

    def on_save(self, args, state, control, **kw):
        if self.status.world_size > 1:
            dist.barrier()  # every rank has written its RNG state
        if self.status.is_main:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                marker = {"step": state.global_step, "wall_time_s": self.status.wall(),
                          **({"target": self.status.target} if self.status.target else {})}
                write_atomic(ckpt / COMPLETE, json.dumps(marker))
                rotate_checkpoints(Path(args.output_dir), self.keep)


class WandbInfo(TrainerCallback):
    """Prints where the W&B run statuss on disk (and how to sync an offline run)."""

    def on_train_begin(self, args, state, control, **kw):
        import wandb  # a ~1 s import, paid only when W&B is on (report_to checked it is installed)

        run = wandb.run
        if run is not None and state.is_world_process_zero:
            folder = Path(run.dir).parent
            offline = getattr(run.settings, "mode", "") == "offline" or getattr(run, "offline", False)
            hint = f" (upload later with `wandb sync {folder}`)" if offline else f" {run.url or ''}"
            console.info(f"W&B {'offline ' if offline else ''}run folder: {folder}{hint}")


class EarlyStopping(EarlyStoppingCallback):
    """transformers' EarlyStoppingCallback, without its warning about load_best_model_at_end:
    we keep the best model ourselves (checkpoints/best, written at each new best eval). Its
    constructor stays the parent's: the Trainer rebuilds it from its arguments on resume."""

    def on_train_begin(self, args, state, control, **kw):
        return None
