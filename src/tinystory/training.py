"""`tinystory train`: the transformers Trainer over packed token blocks, writing a run dir.

Read top to bottom, `train()` does: pick the run dir -> open (or prepare) the data ->
build the model (or load `--init-from`) -> pick the precision -> plan the steps ->
wire the Trainer and our callbacks -> train -> write the final model atomically.

The run dir is a plain Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer files) plus settings.toml, run.json, metrics.jsonl,
loss.png and checkpoints/ (the last K, each marked complete, plus `best/`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory import console, distributed
from tinystory.errors import DataError, TrainingError
from tinystory.rundir import finalize, plot, read_run_json, write_atomic, write_run_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tinystory.callbacks import Live
    from tinystory.data import PreparedData
    from tinystory.precision import Precision
    from tinystory.settings import Settings


# ------------------------------------------------------------------ run dir and data


def _new_run_dir(settings: Settings) -> Path:
    from tinystory import paths

    if settings.train.out:
        return Path(settings.train.out).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return paths.runs_dir() / f"{stamp}-{settings.model.preset}"


def _resume_dir(settings: Settings) -> Path:
    """The run to resume: --out, else the newest run dir under the runs dir with a checkpoint."""
    from tinystory import paths
    from tinystory.callbacks import latest_checkpoint

    if settings.train.out:
        run = Path(settings.train.out).expanduser()
        if not run.is_dir():
            raise TrainingError(f"cannot resume: {run} does not exist", "pass --out with the run dir to resume")
        return run
    root = paths.runs_dir()
    runs = [p for p in root.iterdir() if p.is_dir() and latest_checkpoint(p)] if root.is_dir() else []
    if not runs:
        raise TrainingError(f"nothing to resume: no run with a checkpoint in {root}", "pass --out RUN_DIR")
    return max(runs, key=lambda p: latest_checkpoint(p).stat().st_mtime)  # type: ignore[union-attr]


def _data(settings: Settings, recorded: str | None) -> PreparedData:
    """The prepared data: --data, the path a resumed run recorded, or auto-prepared."""
    from tinystory.data import open_prepared

    path = settings.train.data or recorded
    if not path:
        if not settings.train.auto_prepare:
            raise DataError("no prepared data given",
                            "pass --data DIR (from `tinystory prepare`), or set train.auto_prepare = true")
        rank = distributed.world()[0]
        if rank == 0:
            from tinystory.prepare import prepare

            console.info(f"no --data given: preparing {settings.data.dataset!r} with tokenizer "
                         f"{settings.data.tokenizer} first (train.auto_prepare)")
            path = str(prepare(settings))
        path = distributed.shared(path)
    return open_prepared(path)


# ---------------------------------------------------------------------------- model


def _build_model(settings: Settings, tok: PreTrainedTokenizerBase, init_from: str | None,
                 data: PreparedData) -> PreTrainedModel:
    """A fresh model for the preset, or the weights of `init_from` (tokenizer checked)."""
    import torch

    from tinystory.model import build_config, build_model

    if init_from:
        return _load_init(init_from, data)
    config = build_config(settings.model.preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(settings.train.seed)  # same init on every rank and every run with this seed
    return _scale_residual_init(build_model(config))


def _scale_residual_init(model: PreTrainedModel) -> PreTrainedModel:
    """Shrink the init of the projections that write into the residual stream (attention
    output, MLP down) by 1/sqrt(2 x layers), as GPT-2 and llama2.c do, so the stream's
    variance does not grow with depth. Measured on the cpu profile (1.2M tokens): valid.txt
    bits per byte 1.180 vs 1.194 with transformers' plain N(0, 0.02) init."""
    import math

    import torch

    scale = 1 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def _load_init(ref: str, data: PreparedData) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    from tinystory import tokenizer as toks
    from tinystory.runs import resolve_run

    run = resolve_run(ref)
    theirs = toks.fingerprint(toks.load(run))
    if theirs != data.tokenizer_sha256:
        name = read_run_json(run).get("data", {}).get("tokenizer", "its tokenizer")
        raise TrainingError(
            f"--init-from {ref} uses {name} ({theirs[:12]}) but the prepared data {data.path} uses "
            f"{data.tokenizer_name} ({data.tokenizer_sha256[:12]})",
            "prepare the data with the run's tokenizer (copy its tokenizer files) or train from scratch")
    console.info(f"starting from the weights of {run}")
    from tinystory.generation_hf import quiet_load

    return quiet_load(lambda: AutoModelForCausalLM.from_pretrained(str(run)))


# ------------------------------------------------------------------------ precision


def _precision(settings: Settings, model: PreTrainedModel, device: str, recorded: dict[str, Any]) -> Precision:
    """The training precision (recorded one on resume; else resolved, probed on CPU)."""
    from tinystory import precision as prec

    t = settings.train
    if recorded.get("precision"):
        return prec.Precision(recorded["precision"], recorded.get("precision_reason", "resumed"), {})
    if distributed.world()[0] == 0:
        chosen = prec.resolve(t.precision, device, model, (t.batch_size, t.block_size))
    else:  # the other ranks take rank 0's measured choice (checks still run everywhere)
        prec.resolve(t.precision if t.precision != "auto" else "fp32", device)
        chosen = None
    return distributed.shared(chosen)


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
        total = max(t.warmup_steps + 10, int(t.minutes * 60 / max(per, 1e-6)))
        return total, total * 20 + 1000
    steps_per_epoch = max(1, n_blocks // per_step)
    n = max(1, math.ceil(t.epochs * steps_per_epoch))
    return n, n


def _step_time(model: PreTrainedModel, settings: Settings, prec: Precision, device: str) -> tuple[float, float]:
    """Seconds per optimizer step and per evaluation, estimated for the --minutes plan."""
    from tinystory.precision import probe

    t = settings.train
    ms = prec.step_ms.get(prec.name) or probe(model, (t.batch_size, t.block_size), names=(prec.name,),
                                              device=device)[prec.name]
    step_s = 1.15 * t.grad_accum * ms / 1000  # + optimizer, data and Trainer overhead
    eval_s = (t.eval_tokens / (t.batch_size * t.block_size)) * ms / 1000 / 3  # forward only
    return step_s, eval_s


def _wandb(settings: Settings, run_dir: Path) -> list[str]:
    """`report_to` for W&B, deciding online/offline BEFORE wandb.init (so it never hangs)."""
    from tinystory import wandb_mode

    mode, why = wandb_mode.decide(settings.train.wandb)
    if mode is None:
        return []
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_PROJECT", settings.train.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    if distributed.world()[0] == 0:
        console.info(f"W&B {mode}: {why}")
    return ["wandb"]


def _set_threads(settings: Settings) -> None:
    """torch CPU threads: the setting, else the cores shared out among local processes."""
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world()[2]))
    n = settings.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ train


def _import_quietly() -> None:
    """Import the Trainer with stdout sent to stderr: transformers prints "[INFO] Running
    in WANDB offline mode" on stdout at import when WANDB_MODE=offline, and stdout is
    for results (the run dir)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        import transformers.integrations.integration_utils  # noqa: F401
        import transformers.trainer  # noqa: F401


def train(settings: Settings, *, resume: bool = False, init_from: str | None = None,
          dry_run: bool = False) -> Path | None:
    """Train a model as `settings` says and return its run dir (None for `dry_run`, which
    prints the memory plan instead). `resume` continues the newest complete checkpoint of
    `--out` (else of the newest run); `init_from` starts from a run's or hub model's weights.
    Ctrl-C saves a checkpoint and raises KeyboardInterrupt; divergence raises TrainingError.
    """
    from tinystory import precision as prec_mod
    from tinystory.callbacks import latest_checkpoint

    if dry_run:
        return _dry_run(settings)
    _import_quietly()
    device = prec_mod.device_type()
    if settings.train.precision == "fp16" and device != "cuda":
        raise prec_mod.fp16_needs_cuda()  # before any data or model work
    distributed.init(device)
    rank, _, world = distributed.world()
    is_main = rank == 0
    _set_threads(settings)

    run_dir, ckpt, recorded = None, None, {}
    if resume:
        run_dir = _resume_dir(settings)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise TrainingError(f"cannot resume: {run_dir} has no complete checkpoint", "train it again without --resume")
        recorded = read_run_json(run_dir)
        settings = _resumed_settings(run_dir, settings)
    else:
        run_dir = Path(distributed.shared(str(_new_run_dir(settings))))
        if latest_checkpoint(run_dir) is not None:
            raise TrainingError(f"{run_dir} already holds a training run",
                                f"resume it with `tinystory train --resume --out {run_dir}`, or pass another --out")

    data = _data(settings, recorded.get("data", {}).get("path"))
    tok = data.tokenizer
    model = _build_model(settings, tok, init_from if not ckpt else None, data)
    model.to("cuda" if device == "cuda" else "cpu")
    if settings.train.attention != model.config._attn_implementation:
        model.set_attn_implementation(settings.train.attention)  # not saved: the run dir loads with sdpa
    prec = _precision(settings, model, device, recorded)
    if is_main:
        console.info(f"precision: {prec.name} ({prec.reason})")
    if device == "cpu" and settings.train.torch_compile and not prec.step_ms:
        _eager_warmup(model, settings, prec)
    return _train(settings, run_dir, ckpt, data, tok, model, prec, device, is_main, world, init_from)


def _eager_warmup(model: PreTrainedModel, settings: Settings, prec: Precision) -> None:
    """The precision probe's eager steps (fp32 and bf16, about 1.5 s) before a compiled CPU
    run whose precision was given, so it starts from the state the `auto` path leaves.
    Measured on a 2-core AMD EPYC, cpu profile, 200 steps, steady tok/s: 12.2k with no eager
    step first, 13.7k after one bf16 step, 15.1k after one fp32 step, 16.8k after the probe.
    The cause (allocator or thread-pool state) is not pinned down (docs/notes/train.md)."""
    from tinystory.precision import probe

    t = settings.train
    probe(model, (t.batch_size, t.block_size))


def _train(settings: Settings, run_dir: Path, ckpt: Path | None, data: PreparedData, tok: PreTrainedTokenizerBase,
           model: PreTrainedModel, prec: Precision, device: str, is_main: bool, world: int,
           init_from: str | None) -> Path:
    """Wire the Trainer and callbacks, train, and write the run dir (rank 0)."""
    from transformers import default_data_collator
    from transformers.utils import logging as hf_logging

    from tinystory.callbacks import Live, Schedule
    from tinystory.data import BlockDataset
    from tinystory.model import count_parameters
    from tinystory.precision import peak_flops
    from tinystory.tokenizer import token_byte_lengths
    from tinystory.trainer import compile_ok, trainer_class, training_args

    hf_logging.disable_progress_bar()  # "Writing model shards" bars at every save
    t = settings.train
    if t.block_size > model.config.max_position_embeddings:
        raise TrainingError(f"train.block_size {t.block_size} is longer than the model's "
                            f"{model.config.max_position_embeddings} positions", "lower train.block_size")
    train_ds = BlockDataset(data.tokens("train"), t.block_size)
    val = data.tokens("val")[: t.eval_tokens]
    if len(val) < t.block_size:
        raise DataError(f"val.bin of {data.path} holds {len(val)} tokens, less than one block of {t.block_size}",
                        "prepare with a larger validation share, or lower train.block_size")
    fit = bool(t.minutes) and not (t.max_steps or t.max_tokens)
    step_s, eval_s = _step_time(model, settings, prec, device) if fit and not ckpt else (0.0, 0.0)
    total, max_steps = _plan_steps(settings, len(train_ds), world, step_s, eval_s)
    peak = peak_flops(prec.dtype, device)
    live = Live(run_dir=run_dir, tokens_per_step=t.batch_size * t.grad_accum * world * t.block_size,
                parameters=count_parameters(model.config), peak_flops=peak, block_size=t.block_size,
                schedule=Schedule(t.warmup_steps, total, t.min_lr_ratio), is_main=is_main, world_size=world,
                budget_s=t.minutes * 60)
    if ckpt is not None:
        _restore_live(live, ckpt)
    if is_main:
        _start_run_dir(settings, run_dir, ckpt)
        write_run_json(run_dir, settings, data, prec, device, live, None, "running", init_from)
    report_to = _wandb(settings, run_dir)
    # compiled: model + loss as one graph (StoryTrainer.compute_loss), where one process
    # trains; under DDP the Trainer compiles the wrapped model (its hooks sync gradients)
    compile_loss = t.compile_mode if world == 1 and compile_ok(t.torch_compile, device) else None
    args = training_args(settings, run_dir, prec, device, max_steps, report_to, compile_loss)
    trainer = trainer_class()(
        model=model, args=args, train_dataset=train_ds, eval_dataset=BlockDataset(val, t.block_size),
        data_collator=default_data_collator, processing_class=tok, compile_loss=compile_loss,
        live=live, val=val, byte_lengths=token_byte_lengths(tok),
        check_every=1 if device == "cpu" else max(1, t.log_every * t.grad_accum))
    stop, early = _callbacks(trainer, live, settings, bool(report_to))
    if is_main:
        _announce(settings, live, total, fit, train_ds, run_dir, ckpt)
    stop.install()
    try:
        try:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        finally:
            stop.restore()
        return _after_training(trainer, live, settings, data, tok, prec, device, run_dir, init_from, early)
    finally:
        if report_to:
            _end_wandb()


def _end_wandb() -> None:
    """End the W&B run after the final evaluation, its closing lines ("Find logs at ...")
    on stderr: left to wandb's exit hook, they came after the run dir on stdout."""
    import contextlib
    import sys

    import wandb

    if wandb.run is not None:
        with contextlib.redirect_stdout(sys.stderr):
            wandb.finish()


def _callbacks(trainer: Any, live: Live, settings: Settings, wandb: bool) -> tuple[Any, Any]:
    """Swap the Trainer's printing callbacks for ours; returns (stop control, early stopping or None)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tinystory.callbacks import CheckpointMarker, Metrics, StopControl, WandbInfo, early_stopping
    from tinystory.progress import Display

    t = settings.train
    for cb in (PrinterCallback, ProgressCallback):  # they print dicts to stdout / tqdm bars
        trainer.remove_callback(cb)
    stop = StopControl(live)
    display = Display(lambda: live.schedule.total,
                      time_left=lambda: live.budget_s - live.wall() if live.budget_s else None)
    for cb in (Metrics(live, display), stop, CheckpointMarker(live)):
        trainer.add_callback(cb)
    if wandb:
        trainer.add_callback(WandbInfo())
    early = early_stopping(t.early_stopping_patience) if t.early_stopping_patience and t.eval_every else None
    if early:
        trainer.add_callback(early)
    return stop, early


def _announce(settings: Settings, live: Live, total: int, fit: bool, train_ds: Any, run_dir: Path,
              ckpt: Path | None) -> None:
    t = settings.train
    plan = f"~{total} steps fitted to {t.minutes:g} min" if fit else f"{total} steps"
    console.info(f"{'resuming ' + ckpt.name + ' of' if ckpt else 'training'} {settings.model.preset} "
                 f"({live.parameters / 1e6:.2f}M parameters): {plan}, {live.tokens_per_step:,} tokens a step, "
                 f"{len(train_ds):,} blocks of {t.block_size} in the training data")
    console.info(f"run dir: {run_dir}")


def _restore_live(live: Live, ckpt: Path) -> None:
    """Wall time and best evaluation of the sessions before a resume."""
    from tinystory.callbacks import COMPLETE

    live.wall_offset_s = json.loads((ckpt / COMPLETE).read_text()).get("wall_time_s", 0.0)
    best = live.run_dir / "checkpoints" / "best" / "best.json"
    if best.is_file():
        live.best = json.loads(best.read_text())
    step = int(ckpt.name.split("-")[-1])
    metrics = live.run_dir / "metrics.jsonl"
    if live.is_main and metrics.is_file():  # drop rows logged after the checkpoint (they will be redone)
        rows = [r for r in metrics.read_text(encoding="utf-8").splitlines() if r and json.loads(r)["step"] <= step]
        write_atomic(metrics, "".join(r + "\n" for r in rows))


def _start_run_dir(settings: Settings, run_dir: Path, ckpt: Path | None) -> None:
    from tinystory.settings import to_toml

    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        write_atomic(run_dir / "settings.toml", to_toml(settings))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def _after_training(trainer: Any, live: Live, settings: Settings, data: PreparedData, tok: PreTrainedTokenizerBase,
                    prec: Precision, device: str, run_dir: Path, init_from: str | None, early: Any) -> Path:
    """Final evaluation, the model written (rank 0), and the stop reason turned into an outcome."""
    from tinystory.callbacks import latest_checkpoint

    state = trainer.state
    if live.stopped_because == "diverged":
        if live.is_main:
            write_run_json(run_dir, settings, data, prec, device, live, state, "diverged", init_from)
        good = latest_checkpoint(run_dir)
        fix = "use --precision bf16 or fp32" if prec.name == "fp16" else "raise train.warmup_steps"
        raise TrainingError(
            f"training diverged: the loss has been {live.nonfinite_value} since step {live.first_bad_step}",
            f"lower train.lr (now {settings.train.lr:g}) or {fix}; last good checkpoint: {good or 'none'}")
    if early is not None and early.early_stopping_patience_counter >= early.early_stopping_patience:
        live.stopped_because = "early_stopping"
    if not live.interrupted and live.last_eval.get("step") != state.global_step:
        trainer.evaluate()  # the final model gets a number even between eval steps
    if live.is_main:
        finalize(trainer.model, live, settings, tok, run_dir)
        info = write_run_json(run_dir, settings, data, prec, device, live, state, live.stopped_because, init_from)
        plot(run_dir)
        console.info(f"trained {info['steps']} steps, {info['tokens_seen']:,} tokens in {info['wall_time_s']:.0f} s "
                     f"({live.stopped_because}); best eval loss {info['best_eval_loss']:.4f}, "
                     f"bpb {info['best_eval_bpb']:.4f}" if info["best_eval_loss"] is not None else "")
    distributed.barrier()
    if live.interrupted:
        if live.is_main:
            console.info(f"checkpoint saved; resume with: tinystory train --resume --out {run_dir}")
        raise KeyboardInterrupt
    return run_dir


# ---------------------------------------------------------------------- resume, dry run


KEEP_ON_RESUME = ("train.threads", "train.wandb", "train.wandb_project", "train.dataloader_workers")


def _resumed_settings(run_dir: Path, settings: Settings) -> Settings:
    """The run's own settings.toml (same model, data order and schedule), with only the
    harmless keys of KEEP_ON_RESUME taken from this invocation; other changes are ignored."""
    from tinystory.runs import run_settings

    saved = run_settings(run_dir)
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
    from tinystory import memory
    from tinystory.console import out
    from tinystory.model import build_config
    from tinystory.tokenizer import parse_spec

    if settings.train.data:
        from tinystory.data import open_prepared

        vocab = len(open_prepared(settings.train.data).tokenizer)
    else:
        kind, n = parse_spec(settings.data.tokenizer)
        vocab = 32000 if kind == "mistral" else int(n or 0)
    config = build_config(settings.model.preset, vocab)
    device = "cuda" if settings.profile in ("rtx2070", "a100") else _device_guess()
    plan = memory.plan(settings, config, device)
    rendered = plan.render() if hasattr(plan, "render") else plan
    out().print(rendered)
    return None


def _device_guess() -> str:
    from tinystory.precision import device_type

    return device_type()
