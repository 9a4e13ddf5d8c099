"""`tinystory train`: the transformers Trainer over packed token blocks, writing a run dir.

Read top to bottom, `train()` does: pick the run dir -> open (or prepare) the data ->
build the model (or load `--init-from`) -> pick the precision -> plan the steps ->
wire the Trainer and our callbacks (`_train`) -> train -> write the final model, run.json
and loss.png (`_after_training`).

The run dir is a plain Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer files) plus settings.toml, run.json, metrics.jsonl,
loss.png and checkpoints/ (the last K, each marked complete, plus `best/`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, default_data_collator
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.utils import logging as hf_logging

from tinystory import __version__, console, distributed, memory, wandb_mode
from tinystory.callbacks import (
    COMPLETE,
    CheckpointMarker,
    EarlyStopping,
    Metrics,
    RunStatus,
    Schedule,
    StopControl,
    WandbInfo,
)
from tinystory.data import BlockDataset, PreparedData, open_prepared
from tinystory.errors import DataError, TrainingError
from tinystory.loading import device_choice, device_name, load_model, pick_device
from tinystory.model import build_config, build_model, count_parameters
from tinystory.paths import atomic_path, runs_dir, write_atomic
from tinystory.precision import Precision, fp16_needs_cuda, peak_flops, probe, resolve
from tinystory.prepare import prepare
from tinystory.progress import Display
from tinystory.runs import RUN_JSON, Run, latest_checkpoint, read_json, rotate_checkpoints
from tinystory.settings import Settings, to_toml
from tinystory.tokenizer import fingerprint, load_tokenizer, parse_spec, token_byte_lengths
from tinystory.trainer import StoryTrainer, compile_ok, eval_slice, optimizer_factory, training_args


@dataclass
class TrainingRun:
    """One training session: what it trains, on what, where it writes, and on what device."""

    settings: Settings
    run_dir: Path
    data: PreparedData
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    precision: Precision
    device: str
    world_size: int = 1
    is_main: bool = True
    checkpoint: Path | None = None  # the checkpoint this session resumes, if any
    init_from: str | None = None  # --init-from: the run whose weights it started from
    started: float = 0.0  # time.time() when the command started (time to target counts from it)


# ------------------------------------------------------------------ run dir and data


def _new_run_dir(settings: Settings) -> Path:
    if settings.train.out:
        return Path(settings.train.out).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return runs_dir() / f"{stamp}-{settings.model.preset}"


def _resume_dir(settings: Settings) -> Path:
    """The run to resume: --out, else the newest run dir under the runs dir with a checkpoint."""
    if settings.train.out:
        run = Path(settings.train.out).expanduser()
        if not run.is_dir():
            raise TrainingError(f"cannot resume: {run} does not exist", "pass --out with the run dir to resume")
        return run
    root = runs_dir()
    found = [(ckpt,
              p) for p in root.iterdir() if p.is_dir() and (ckpt := latest_checkpoint(p))] if root.is_dir() else []
    if not found:
        raise TrainingError(f"nothing to resume: no run with a checkpoint in {root}", "pass --out RUN_DIR")
    return max(found, key=lambda pair: pair[0].stat().st_mtime)[1]


def _data(settings: Settings, recorded: str | None) -> PreparedData:
    """The prepared data: --data, the path a resumed run recorded, or auto-prepared."""
    path = settings.train.data or recorded
    if not path:
        if not settings.train.auto_prepare:
            raise DataError("no prepared data given",
                            "pass --data DIR (from `tinystory prepare`), or set train.auto_prepare = true")
        if distributed.world()[0] == 0:
            console.info(f"no --data given: preparing {settings.data.dataset!r} with tokenizer "
                         f"{settings.data.tokenizer} first (train.auto_prepare)")
            path = str(prepare(settings))
        path = distributed.shared(path)
    data = open_prepared(path)
    if fingerprint(data.tokenizer) != data.tokenizer_sha256:
        raise DataError(f"the tokenizer files in {data.path} are not the tokenizer its tokens were made with",
                        "prepare again with --force")
    return data


# ---------------------------------------------------------------------------- model


def _build_model(settings: Settings, tokenizer: PreTrainedTokenizerBase, init_from: str | None,
                 data: PreparedData) -> PreTrainedModel:
    """A fresh model for the preset, or the weights of `init_from` (tokenizer checked)."""
    if init_from:
        return _load_init(init_from, data)
    config = build_config(settings.model.preset, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)
    torch.manual_seed(settings.train.seed)  # same init on every rank and every run with this seed
    return _scale_residual_init(build_model(config))


def _scale_residual_init(model: PreTrainedModel) -> PreTrainedModel:
    """Shrink the init of the projections that write into the residual stream (attention
    output, MLP down) by 1/sqrt(2 x layers), as GPT-2 and llama2.c do, so the stream's
    variance does not grow with depth. Measured on the cpu profile (1.2M tokens): valid.txt
    bits per byte 1.180 vs 1.194 with transformers' plain N(0, 0.02) init."""
    scale = 1 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def _load_init(ref: str, data: PreparedData) -> PreTrainedModel:
    run = Run.open(ref)
    theirs = fingerprint(load_tokenizer(run.path))
    if theirs != data.tokenizer_sha256:
        name = run.info.get("data", {}).get("tokenizer", "its tokenizer")
        raise TrainingError(
            f"--init-from {ref} uses {name} ({theirs[:12]}) but the prepared data {data.path} uses "
            f"{data.tokenizer_name} ({data.tokenizer_sha256[:12]})",
            "prepare the data with the run's tokenizer (copy its tokenizer files) or train from scratch")
    console.info(f"starting from the weights of {run.path}")
    return load_model(run, "cpu", "fp32")[0]  # the checks of every load: no remote code, damaged weights


# ------------------------------------------------------------------------ precision


def _precision(settings: Settings, model: PreTrainedModel, device: str, recorded: dict[str, Any]) -> Precision:
    """The training precision (recorded one on resume; else resolved, probed on CPU)."""
    t = settings.train
    if recorded.get("precision"):
        return Precision(recorded["precision"], recorded.get("precision_reason", "resumed"), {})
    if distributed.world()[0] == 0:
        chosen = resolve(t.precision, device, model, (t.batch_size, t.block_size))
    else:  # the other ranks take rank 0's measured choice (checks still run everywhere)
        resolve(t.precision if t.precision != "auto" else "fp32", device)
        chosen = None
    return distributed.shared(chosen)


def _mps_or_cpu(settings: Settings, model: PreTrainedModel) -> tuple[str, str, Precision]:
    """On a Mac with `device = auto`: the Apple GPU or the CPU, whichever trains this model
    faster in the precision probe (a small model's steps can be quicker on the CPU than
    the GPU's kernel launches), with the precision that won there."""
    t = settings.train
    shape = (t.batch_size, t.block_size)

    def timed(device: str) -> tuple[Precision, float]:
        model.to(device)  # type: ignore[arg-type]
        chosen = resolve(t.precision, device, model, shape)
        ms = chosen.step_ms.get(chosen.name) or probe(model, shape, names=(chosen.name,), device=device)[chosen.name]
        return chosen, ms

    if t.precision == "fp16":  # fp16 trains on the GPU only
        model.to("mps")  # type: ignore[arg-type]
        return "mps", "fp16 was asked for, which only the Apple GPU trains in", resolve("fp16", "mps", model, shape)
    on_cpu, cpu_ms = timed("cpu")
    on_mps, mps_ms = timed("mps")
    if cpu_ms < mps_ms:
        model.to("cpu")  # type: ignore[arg-type]
        return "cpu", f"auto: the CPU trained {mps_ms / cpu_ms:.2f}x faster than the Apple GPU in a probe", on_cpu
    return "mps", f"auto: the Apple GPU trained {cpu_ms / mps_ms:.2f}x faster than the CPU in a probe", on_mps


# ----------------------------------------------------------------------------- steps


def _plan_steps(settings: Settings, n_blocks: int, world: int, step_s: float, eval_s: float) -> tuple[int, int]:
    """(schedule total steps, Trainer max_steps). With --minutes the total is an estimate
    from the probe, refitted while training; Trainer's max_steps is then only a cap."""
    t = settings.train
    per_step = t.batch_size * t.grad_accum * world  # blocks per optimizer step
    tokens_per_step = per_step * t.block_size
    if t.max_steps:
        return t.max_steps, t.max_steps
    if t.max_tokens:
        n = math.ceil(t.max_tokens / tokens_per_step)
        return n, n
    if t.minutes:
        per = step_s + (eval_s / t.eval_every if t.eval_every else 0.0)
        per += eval_s * step_s / (t.eval_every_minutes * 60) if t.eval_every_minutes else 0.0
        total = max(t.warmup_steps + 10, int(t.minutes * 60 / max(per, 1e-6)))
        return total, total * 20 + 1000
    steps_per_epoch = max(1, n_blocks // per_step)
    n = max(1, math.ceil(t.epochs * steps_per_epoch))
    return n, n


def _step_time(job: TrainingRun) -> tuple[float, float]:
    """Seconds per optimizer step and per evaluation, estimated for the --minutes plan."""
    t, prec = job.settings.train, job.precision
    ms = prec.step_ms.get(prec.name) or probe(job.model, (t.batch_size, t.block_size), names=(prec.name,),
                                              device=job.device)[prec.name]
    step_s = 1.15 * t.grad_accum * ms / 1000  # + optimizer, data and Trainer overhead
    eval_s = (t.eval_tokens / (t.batch_size * t.block_size)) * ms / 1000 / 3  # forward only
    return step_s, eval_s


def _wandb(settings: Settings, run_dir: Path) -> list[str]:
    """`report_to` for W&B, deciding online/offline BEFORE wandb.init (so it never hangs)."""
    mode, why = wandb_mode.decide(settings.train.wandb)
    if mode is None:
        return []
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_PROJECT", settings.train.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    if distributed.world()[0] == 0:
        console.info(f"W&B {mode}: {why}")
    return ["wandb"]


def _end_wandb() -> None:
    """End the W&B run after the final evaluation, its closing lines ("Find logs at ...")
    on stderr: left to wandb's exit hook, they came after the run dir on stdout."""
    import wandb  # a ~1 s import, paid only when W&B is on

    if wandb.run is not None:
        with contextlib.redirect_stdout(sys.stderr):
            wandb.finish()


def _set_threads(settings: Settings) -> None:
    """torch CPU threads: the setting, else the cores shared out among local processes."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world()[2]))
    n = settings.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ train


def train(settings: Settings, *, resume: bool = False, init_from: str | None = None,
          dry_run: bool = False, started: float | None = None) -> Path | None:
    """Train a model as `settings` says and return its run dir (None for `dry_run`, which
    prints the memory plan instead). `resume` continues the newest complete checkpoint of
    `--out` (else of the newest run); `init_from` starts from a run's or hub model's weights.
    `started` (time.time() scale, default now) is when the command started: time to target
    counts from it. Ctrl-C saves a checkpoint and raises KeyboardInterrupt; divergence
    raises TrainingError.
    """
    started = time.time() if started is None else started
    if dry_run:
        _dry_run(settings)
        return None
    device, why = device_choice(settings.train.device)
    if settings.train.precision == "fp16" and device == "cpu":
        raise fp16_needs_cuda()  # before any data or model work
    distributed.init(device)
    rank, _, world = distributed.world()
    _set_threads(settings)

    ckpt, recorded = None, {}
    if resume:
        run_dir = _resume_dir(settings)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise TrainingError(f"cannot resume: {run_dir} has no complete checkpoint",
                                "train it again without --resume")
        recorded = read_json(run_dir / RUN_JSON)
        settings = _resumed_settings(run_dir, settings)
        if recorded.get("device_type") in ("cpu", "mps") and settings.train.device == "auto" and device != "cuda":
            device, why = recorded["device_type"], "resumed on the device the run started on"
        if rank == 0:  # what a crash in a save left: never resumed from, and in the way of the next save
            rotate_checkpoints(run_dir / "checkpoints", 0)
    else:
        run_dir = Path(distributed.shared(str(_new_run_dir(settings))))
        if latest_checkpoint(run_dir) is not None:
            raise TrainingError(f"{run_dir} already holds a training run",
                                f"resume it with `tinystory train --resume --out {run_dir}`, or pass another --out")

    data = _data(settings, recorded.get("data", {}).get("path"))
    tokenizer = data.tokenizer
    model = _build_model(settings, tokenizer, init_from if not ckpt else None, data)
    if settings.train.attention != model.config._attn_implementation:
        model.set_attn_implementation(settings.train.attention)  # not saved: the run dir loads with sdpa
    if device == "mps":  # an op without an MPS kernel runs on the CPU (the CLI sets this on a Mac)
        console.info("device: an Apple GPU (MPS); ops it lacks fall back to the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1)")
    if device == "mps" and settings.train.device == "auto" and not recorded:
        device, why, prec = _mps_or_cpu(settings, model)  # the faster of the two, measured
    else:
        model.to(device)  # type: ignore[arg-type]  # transformers types .to() through a wrapper that mypy misreads
        prec = _precision(settings, model, device, recorded)
    if rank == 0:
        console.info(f"device: {device} ({why})")
        console.info(f"precision: {prec.name} ({prec.reason})")
    if device == "cpu" and settings.train.torch_compile and not prec.step_ms:
        _eager_warmup(model, settings)
    job = TrainingRun(settings, run_dir, data, tokenizer, model, prec, device, world, rank == 0, ckpt, init_from,
                      started)
    return _train(job)


def _eager_warmup(model: PreTrainedModel, settings: Settings) -> None:
    """The precision probe's eager steps (fp32 and bf16, about 1.5 s) before a compiled CPU
    run whose precision was given, so it starts from the state the `auto` path leaves.
    Measured on a 2-core AMD EPYC, cpu profile, 200 steps, steady tok/s: 12.2k with no eager
    step first, 13.7k after one bf16 step, 15.1k after one fp32 step, 16.8k after the probe.
    The cause (allocator or thread-pool state) is not pinned down (docs/notes/train.md)."""
    t = settings.train
    probe(model, (t.batch_size, t.block_size))


def _train(job: TrainingRun) -> Path:
    """Wire the Trainer and callbacks, train, and write the run dir (rank 0)."""
    hf_logging.disable_progress_bar()  # "Writing model shards" bars at every save
    settings, model = job.settings, job.model
    t = settings.train
    if t.eval_every_minutes < 0:
        raise TrainingError(f"train.eval_every_minutes is {t.eval_every_minutes:g}, below 0",
                            "set the minutes between evaluations, or 0 for evaluations by steps only")
    if t.block_size > model.config.max_position_embeddings:
        raise TrainingError(f"train.block_size {t.block_size} is longer than the model's "
                            f"{model.config.max_position_embeddings} positions", "lower train.block_size")
    vocab = len(job.tokenizer)
    train_ds = BlockDataset(job.data.tokens("train"), t.block_size, vocab_size=vocab)
    whole_val = job.data.tokens("val")
    job.data.check_ids("val", vocab, whole_val)
    if len(whole_val) < t.block_size:
        raise DataError(f"val.bin of {job.data.path} holds {len(whole_val)} tokens, less than one block of "
                        f"{t.block_size}", "prepare with a larger validation share, or lower train.block_size")
    val = eval_slice(whole_val, t.eval_tokens, t.block_size)
    fit = bool(t.minutes) and not (t.max_steps or t.max_tokens)
    step_s, eval_s = _step_time(job) if fit and not job.checkpoint else (0.0, 0.0)
    total, max_steps = _plan_steps(settings, len(train_ds), job.world_size, step_s, eval_s)
    status = RunStatus(run_dir=job.run_dir, tokens_per_step=t.batch_size * t.grad_accum * job.world_size * t.block_size,
                       parameters=count_parameters(model.config), peak_flops=peak_flops(job.precision.dtype,
                                                                                        job.device),
                       block_size=t.block_size, schedule=Schedule(t.warmup_steps, total, t.min_lr_ratio),
                       is_main=job.is_main, world_size=job.world_size, budget_s=t.minutes * 60,
                       target_bpb=t.target_bpb, stop_at_target=t.stop_at_target,
                       train_tokens=len(train_ds) * t.block_size,
                       eval_slice_tokens=0 if val is whole_val else len(val), eval_every_s=t.eval_every_minutes * 60,
                       command_started=job.started)
    if job.checkpoint is not None:
        _restore_status(status, job.checkpoint)
    if job.is_main:
        _start_run_dir(settings, job.run_dir, job.checkpoint)
        write_run_json(job, status, None, "running")
    report_to = _wandb(settings, job.run_dir)
    # compiled: model + loss as one graph (StoryTrainer.compute_loss), where one process
    # trains; under DDP the Trainer compiles the wrapped model (its hooks sync gradients)
    compile_loss = t.compile_mode if job.world_size == 1 and compile_ok(t.torch_compile, job.device) else None
    args = training_args(settings, job.run_dir, job.precision, job.device, max_steps, report_to, compile_loss)
    trainer = StoryTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=BlockDataset(val, t.block_size),
        data_collator=default_data_collator, processing_class=job.tokenizer, compile_loss=compile_loss,
        optimizer_cls_and_kwargs=optimizer_factory(settings, job.precision),
        status=status, val=val, whole_val=whole_val, byte_lengths=token_byte_lengths(job.tokenizer),
        check_every=1 if job.device == "cpu" else max(1, t.log_every * t.grad_accum))
    stop, early = _callbacks(trainer, status, settings, bool(report_to))
    if job.is_main:
        _announce(job, status, total, fit, len(train_ds))
    finished = _finished(job.checkpoint, max_steps) if job.checkpoint else None
    stop.install()
    try:
        try:
            if finished is None:
                trainer.train(resume_from_checkpoint=str(job.checkpoint) if job.checkpoint else None)
            else:  # the Trainer would train one step past max_steps: only the final eval and save are left
                _load_finished(trainer, cast(Path, job.checkpoint), finished)
        finally:
            stop.restore()
        return _after_training(job, trainer, status, early)
    finally:
        if job.is_main:  # a save that failed (a full disk) leaves no half checkpoint behind
            rotate_checkpoints(job.run_dir / "checkpoints", 0)
        if report_to:
            _end_wandb()


def _finished(ckpt: Path, max_steps: int) -> TrainerState | None:
    """The state of a checkpoint at or past max_steps (a run whose final save was cut short,
    or one resumed after it finished), else None."""
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))  # the Trainer's name for it
    return state if state.global_step >= max_steps else None


def _load_finished(trainer: StoryTrainer, ckpt: Path, state: TrainerState) -> None:
    """The weights and state of a finished checkpoint, without a training step."""
    model = cast(PreTrainedModel, trainer.model)
    result = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise TrainingError(f"cannot resume: {ckpt} holds other weights than this model "
                            f"(missing {sorted(set(result.missing_keys) - tied)[:3]}, unexpected "
                            f"{sorted(result.unexpected_keys)[:3]})", "train it again without --resume")
    model.tie_weights()
    trainer.state = state


def _callbacks(trainer: StoryTrainer, status: RunStatus, settings: Settings,
               wandb: bool) -> tuple[StopControl, EarlyStopping | None]:
    """Swap the Trainer's printing callbacks for ours; returns (stop control, early stopping or None)."""
    t = settings.train
    for cb in (PrinterCallback, ProgressCallback):  # they print dicts to stdout / tqdm bars
        trainer.remove_callback(cb)
    stop = StopControl(status)
    display = Display(lambda: status.schedule.total,
                      time_left=lambda: status.budget_s - status.wall() if status.budget_s else None,
                      slice_tokens=status.eval_slice_tokens, target_bpb=status.target_bpb)
    for ours in (Metrics(status, display), stop, CheckpointMarker(status, t.keep_checkpoints)):
        trainer.add_callback(ours)
    if wandb:
        trainer.add_callback(WandbInfo())
    early = None
    if t.early_stopping_patience and t.eval_every:
        early = EarlyStopping(early_stopping_patience=t.early_stopping_patience)
    if early:
        trainer.add_callback(early)
    return stop, early


def _announce(job: TrainingRun, status: RunStatus, total: int, fit: bool, n_blocks: int) -> None:
    t = job.settings.train
    plan = f"~{total} steps fitted to {t.minutes:g} min" if fit else f"{total} steps"
    if t.target_bpb and t.stop_at_target:
        plan = f"until bpb {t.target_bpb:g} on the whole validation split, at most {plan}"
    elif t.target_bpb:
        plan = f"{plan}, timing the first bpb at or below {t.target_bpb:g} on the whole validation split"
    resuming = f"resuming {job.checkpoint.name} of" if job.checkpoint else "training"
    console.info(f"{resuming} {job.settings.model.preset} ({status.parameters / 1e6:.2f}M parameters): {plan}, "
                 f"{status.tokens_per_step:,} tokens a step, {n_blocks:,} blocks of {t.block_size} in the "
                 "training data")
    console.info(f"run dir: {job.run_dir}")


def _restore_status(status: RunStatus, ckpt: Path) -> None:
    """Wall time, best evaluation and a target reached in the sessions before a resume."""
    marker = json.loads((ckpt / COMPLETE).read_text())
    status.wall_offset_s = marker.get("wall_time_s", 0.0)
    status.target = marker.get("target", {})
    best = status.run_dir / "checkpoints" / "best" / "best.json"
    if best.is_file():
        status.best = json.loads(best.read_text())
    step = int(ckpt.name.split("-")[-1])
    metrics = status.run_dir / "metrics.jsonl"
    if status.is_main and metrics.is_file():  # drop rows logged after the checkpoint (they will be redone)
        rows = [r for r in metrics.read_text(encoding="utf-8").splitlines() if r and json.loads(r)["step"] <= step]
        write_atomic(metrics, "".join(r + "\n" for r in rows))


def _start_run_dir(settings: Settings, run_dir: Path, ckpt: Path | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        write_atomic(run_dir / "settings.toml", to_toml(settings))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def _after_training(job: TrainingRun, trainer: StoryTrainer, status: RunStatus, early: EarlyStopping | None) -> Path:
    """Final evaluation, the model written (rank 0), and the stop reason turned into an outcome."""
    state = trainer.state
    if status.stopped_because == "diverged":
        if job.is_main:
            write_run_json(job, status, state, "diverged")
        good = latest_checkpoint(job.run_dir)
        fix = "use --precision bf16 or fp32" if job.precision.name == "fp16" else "raise train.warmup_steps"
        raise TrainingError(
            f"training diverged: the loss has been {status.nonfinite_value} since step {status.first_bad_step}",
            f"lower train.lr (now {job.settings.train.lr:g}) or {fix}; last good checkpoint: {good or 'none'}")
    if early is not None and early.early_stopping_patience_counter >= early.early_stopping_patience:
        status.stopped_because = "early_stopping"
    if not status.interrupted and status.last_eval.get("step") != state.global_step:
        trainer.evaluate()  # the final model gets a number even between eval steps
    if job.is_main:
        finalize(job, cast(PreTrainedModel, trainer.model), status)
        if not status.interrupted:  # the model just saved, on all of the validation split
            whole = trainer.score(trainer.whole_val, what="scoring the whole validation split")
            status.final_eval = dict(whole, step=status.best.get("step", state.global_step),
                                     tokens=len(trainer.whole_val) // status.block_size * status.block_size)
        info = write_run_json(job, status, state, status.stopped_because)
        plot(job.run_dir)
        console.info(_summary(info, status))
        if status.stopped_because == "early_stopping" and (info["passes"] or 0) >= MANY_PASSES:
            console.info(many_passes_hint(info["passes"], status.train_tokens, job.settings.train.weight_decay))
    distributed.barrier()
    if status.interrupted:
        if job.is_main:
            console.info(f"checkpoint saved; resume with: tinystory train --resume --out {job.run_dir}")
        raise KeyboardInterrupt
    return job.run_dir


# Early stopping after this many passes over the training data comes with a hint: the text,
# not the time, set the limit (on a Zen 5 EPYC the cpu profile with weight decay 0.1 stopped
# after ~7.5 passes of the bundled sample; with its 0.5 it trains on for the whole 15 minutes).
MANY_PASSES = 3.0


# The weight decay the hint names: of 0.1, 0.5 and 1.0 on the cpu profile at 15 minutes
# (8 passes, Zen 5 EPYC), 0.5 ended lowest; 1.0 ended worse than 0.5 (docs/performance.md).
MANY_PASSES_WEIGHT_DECAY = 0.5


def many_passes_hint(passes: float, train_tokens: int, weight_decay: float) -> str:
    """The line after an early stop on many passes: the text set the limit, and the fixes.
    A weight decay is named only to a run below the one measured best in that regime."""
    fix = "more text (tinystory prepare)"
    if weight_decay < MANY_PASSES_WEIGHT_DECAY:
        fix += (f" or weight decay {MANY_PASSES_WEIGHT_DECAY:g} (this run's is {weight_decay:g}: "
                f"--set train.weight_decay={MANY_PASSES_WEIGHT_DECAY:g})")
    return (f"the validation loss stopped improving after {passes:.1f} passes over the {train_tokens:,} training "
            f"tokens: {fix} lets a run train on")


def _summary(info: dict[str, Any], status: RunStatus) -> str:
    """The last line on stderr: how far the run went, and the saved model's figures."""
    line = (f"trained {info['steps']} steps, {info['tokens_seen']:,} tokens in {info['wall_time_s']:.0f} s "
            f"({status.stopped_because})")
    final = status.final_eval
    if final:
        line += f"; whole validation split: loss {final['eval_loss']:.4f}, bpb {final['eval_bpb']:.4f}"
    if status.target_bpb:
        line += (f"; target {status.target_bpb:g} reached in {status.target['time_to_target_s']:.0f} s"
                 if status.target else f"; target {status.target_bpb:g} not reached")
    return line


# --------------------------------------------------------------- writing the run dir


def write_run_json(job: TrainingRun, status: RunStatus, state: Any, stopped: str) -> dict[str, Any]:
    """run.json: what was trained, on what, how far, and why it stopped (rank 0)."""
    steps = state.global_step if state is not None else 0
    data = job.data
    info = {
        "tinystory_version": __version__,
        "profile": job.settings.profile,
        "preset": job.settings.model.preset,
        "parameters": status.parameters,
        "data": {"path": str(data.path), "tokenizer": data.tokenizer_name, "tokenizer_sha256": data.tokenizer_sha256},
        "steps": steps,
        "tokens_seen": steps * status.tokens_per_step,
        "passes": round(steps * status.tokens_per_step / status.train_tokens, 2) if status.train_tokens else None,
        "wall_time_s": round(status.wall(), 2) if state is not None else 0.0,
        "device": device_name(job.device),
        "device_type": job.device,
        "world_size": status.world_size,
        "precision": job.precision.name,
        "precision_reason": job.precision.reason,
        "schedule_steps": status.schedule.total,
        "eval_slice_tokens": status.eval_slice_tokens,  # what best_ and last_eval scored (0: the whole split)
        "best_eval_loss": status.best.get("eval_loss"),
        "best_eval_bpb": status.best.get("eval_bpb"),
        "best_step": status.best.get("step"),
        "last_eval": status.last_eval or None,
        "final_eval": status.final_eval or None,  # the saved model on the whole validation split
        "target_bpb": status.target_bpb or None,
        "target_reached": bool(status.target) if status.target_bpb else None,
        "time_to_target_s": status.target.get("time_to_target_s"),  # from the command's start
        "tokens_to_target": status.target.get("tokens_to_target"),
        "init_from": job.init_from,
        "stopped_because": stopped,
    }
    write_atomic(job.run_dir / RUN_JSON, json.dumps(info, indent=2) + "\n")
    return info


def finalize(job: TrainingRun, model: PreTrainedModel, status: RunStatus) -> None:
    """Write the best model (by eval loss) as the run dir's model, atomically."""
    best = job.run_dir / "checkpoints" / "best" / "model.safetensors"
    if status.best and status.best.get("step") != status.last_eval.get("step") and best.is_file():
        model.load_state_dict(load_file(str(best)), strict=False)  # tied lm_head is not stored
        model.tie_weights()
        console.info(f"keeping the best model: step {status.best['step']} (eval loss {status.best['eval_loss']:.4f})")
    model.generation_config = generation_config(job.settings, job.tokenizer)
    save_model_atomic(model, job.tokenizer, job.run_dir)


def generation_config(settings: Settings, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Sampling defaults from the generate section, so plain `model.generate()` tells stories."""
    g = settings.generate
    return GenerationConfig(
        do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        repetition_penalty=g.repetition_penalty, max_new_tokens=g.max_new_tokens,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_model_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> None:
    """save_pretrained into a temp folder inside the run dir, then rename each file into
    place, weights last: a crash leaves the old model or the new one, never half a file."""
    tmp = run_dir / f".model-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for f in sorted(tmp.iterdir(), key=lambda p: p.name.startswith("model")):
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def plot(run_dir: Path) -> None:
    """loss.png: training and evaluation loss against tokens seen."""
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if r]
    tr = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["tokens"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)  # no pyplot: no GUI backend, nothing global
    ax = fig.subplots()
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss", ms=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(run_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------------- resume, dry run


KEEP_ON_RESUME = ("train.threads", "train.wandb", "train.wandb_project", "train.dataloader_workers")


def _resumed_settings(run_dir: Path, settings: Settings) -> Settings:
    """The run's own settings.toml (same model, data order and schedule), with only the
    harmless keys of KEEP_ON_RESUME taken from this invocation; other changes are ignored."""
    saved = Run(run_dir).settings
    if saved is None:
        return settings
    ignored = [k for k in settings.sources if settings.get(k) != saved.get(k) and k not in KEEP_ON_RESUME
               and settings.source(k).startswith(("flag", "--", "env", "config")) and k != "train.out"]
    if ignored and distributed.world()[0] == 0:
        console.warn(f"resuming with the run's own settings; ignoring {', '.join(sorted(ignored))}")
    keep = {k.replace(".", "__"): settings.get(k) for k in KEEP_ON_RESUME}
    return saved.replace(**keep, train__out=str(run_dir))


def _dry_run(settings: Settings) -> None:
    """Print the memory plan (parameters, tokens a step, peak memory split) and return None."""
    if settings.train.data:
        vocab = len(open_prepared(settings.train.data).tokenizer)
    else:
        kind, n = parse_spec(settings.data.tokenizer)
        vocab = 32000 if kind == "mistral" else int(n or 0)
    config = build_config(settings.model.preset, vocab)
    asked = settings.train.device  # a plan for the device asked for, present or not (plan a Mac's run on Linux)
    device = asked if asked != "auto" else "cuda" if settings.profile in ("rtx2070", "a100") else pick_device()
    console.out().print(memory.plan(settings, config, device).render())
    return None
