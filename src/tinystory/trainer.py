"""The Trainer wiring: our data order, LR schedule, NaN watch and bits-per-byte evaluation
on top of `transformers.Trainer`, and the TrainingArguments a profile turns into."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, TrainingArguments
from transformers.utils import logging as hf_logging

from tinystory import console
from tinystory import metrics as m
from tinystory.callbacks import RunStatus
from tinystory.distributed import world
from tinystory.errors import TrainingError
from tinystory.muon import MuonAdamWFactory
from tinystory.precision import Precision
from tinystory.scoring import score_stream
from tinystory.settings import Settings

# With WANDB_MODE=offline, transformers.trainer prints "[INFO] Running in WANDB offline mode"
# on stdout when it is imported; stdout is for results (the run dir).
with contextlib.redirect_stdout(sys.stderr):
    from transformers import Trainer


class SeededOrder:
    """A shuffled order of the blocks fixed by (seed, epoch): every rank and every resumed
    session sees the same sequence, so a resume skips exactly the batches already trained."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


class StoryTrainer(Trainer):
    """Trainer with our data order, schedule, NaN watch and bits-per-byte evaluation."""

    def __init__(self, *args: Any, status: RunStatus, val: np.ndarray, byte_lengths: np.ndarray,
                 check_every: int, compile_loss: str | None = None, whole_val: np.ndarray | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.status, self.val, self.byte_lengths, self.check_every = status, val, byte_lengths, check_every
        self.whole_val = val if whole_val is None else whole_val  # `val` is a slice of it, or all of it
        # compile_loss (a torch.compile mode): one compiled graph from token ids to the
        # summed loss (the Trainer's own compile must then be off): no logits leave the
        # graph, so backward gets no zero gradient for them (docs/notes/gpu.md).
        self._loss_sum = None
        if compile_loss:
            mode = None if compile_loss == "default" else compile_loss
            model = cast(PreTrainedModel, self.model)
            self._loss_sum = torch.compile(functools.partial(summed_loss, model), mode=mode)
        self._bad = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self._n = 0

    def _get_train_sampler(self, train_dataset=None):
        return SeededOrder(len(train_dataset or self.train_dataset), self.args.seed)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.status.schedule)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._loss_sum is None or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        with self.accelerator.autocast():  # the Trainer's autocast wraps model.forward, not this
            total = self._loss_sum(inputs["input_ids"], labels)
        if num_items_in_batch is None:  # what the Trainer counts: labels[..., 1:] that are not -100
            num_items_in_batch = (labels[..., 1:] != -100).sum()
        return total / num_items_in_batch

    def _get_num_items_in_batch(self, batch_samples, device):
        if self.args.world_size > 1:
            return super()._get_num_items_in_batch(batch_samples, device)
        # counted on the CPU and kept a Python int: moving it to the GPU would be a blocking
        # copy, a host-device sync in every step
        n = super()._get_num_items_in_batch(batch_samples, torch.device("cpu"))
        return int(n) if n is not None else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._bad += (~torch.isfinite(loss.detach())).long()
        self._n += 1
        if self._n % self.check_every == 0:  # one host sync per check, not per step on GPU
            bad = int(self._bad)
            self._bad.zero_()
            status = self.status
            if bad == self.check_every:
                if not status.nonfinite_steps:
                    status.first_bad_step = self.state.global_step + 1  # 1-based, as logged
                    status.nonfinite_value = "NaN" if torch.isnan(loss).any() else "inf"
                status.nonfinite_steps += bad
            else:
                status.nonfinite_steps = 0
        return loss

    def score(self, tokens: np.ndarray, what: str | None = None) -> dict[str, float]:
        """eval_loss, eval_ppl and eval_bpb of the model on `tokens` (time counted as eval
        time); of a slice also `bpb_se`, its standard error over the slice's blocks."""
        t0 = time.monotonic()
        sliced = tokens is not self.whole_val
        sums = score_stream(self.model, tokens, self.status.block_size, self.args.per_device_eval_batch_size,
                            self.byte_lengths, self.args.device, what=what, bpb_se=sliced)
        self.status.eval_s += time.monotonic() - t0
        loss = sums["nats"] / sums["tokens"]
        out = {"eval_loss": loss, "eval_ppl": m.perplexity(min(loss, 50.0)),
               "eval_bpb": m.bits_per_byte(sums["text_nats"], sums["bytes"])}
        return {**out, "bpb_se": sums["bpb_se"]} if sliced else out

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        scored = self.score(self.val)  # the slice, inside the live display
        se = scored.pop("bpb_se", 0.0)
        out = scored
        step = self.state.global_step
        self.status.last_eval = dict(out, step=step)
        if out["eval_loss"] < self.status.best.get("eval_loss", float("inf")):
            self.status.best = dict(out, step=step)
            if self.status.is_main:
                save_best(self.model, self.status)
        self.log(dict(out))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, out)
        if self._target_reached(out, se) and self.status.stop_at_target:
            self.control.should_training_stop = True
        self.status.last_eval_wall = self.status.wall()  # train.eval_every_minutes counts training time
        return out

    def _target_reached(self, out: dict[str, float], se: float) -> bool:
        """--target-bpb: a slice whose bpb is within TARGET_SE standard errors of the target
        (or below it) is checked on the whole split, and only the whole split's bpb
        decides. Every rank scores the same tokens, so all take the same decision."""
        status, target = self.status, self.status.target_bpb
        if not target or status.target or out["eval_bpb"] - TARGET_SE * se > target:
            return False
        whole = out if self.whole_val is self.val else self.score(self.whole_val)
        if whole["eval_bpb"] > target:
            if status.is_main:
                console.info(f"target check at step {self.state.global_step}: bpb {whole['eval_bpb']:.4f} on the "
                             f"whole validation split, above the target {target:g}")
            return False
        status.target = {"step": self.state.global_step, "bpb": whole["eval_bpb"], "loss": whole["eval_loss"],
                         "time_to_target_s": round(status.since_command_start(), 2),
                         "tokens_to_target": self.state.global_step * status.tokens_per_step}
        if status.stop_at_target:
            status.stopped_because = "target"
        if status.is_main:
            console.info(f"target reached at step {self.state.global_step}: bpb {whole['eval_bpb']:.4f} <= {target:g} "
                         f"on the whole validation split, {status.target['time_to_target_s']:.0f} s after the "
                         f"command started{'' if status.stop_at_target else '; training on'}")
        return True



# A slice bpb less than this many standard errors above the target triggers a check on
# the whole split (the slice is a sample of its blocks: its error is measured each time).
TARGET_SE = 3.0


def eval_slice(tokens: np.ndarray, n_tokens: int, block_size: int) -> np.ndarray:
    """About `n_tokens` of a validation stream for evaluations while training: whole blocks
    of the full evaluation's grid (non-overlapping `block_size` blocks from the start),
    every k-th, spread evenly from the first block to the last, so the slice is a fair
    sample of the split rather than its opening stories. All of it when that is no more
    (or `n_tokens` is 0)."""
    n_blocks = len(tokens) // block_size
    k = n_tokens // block_size
    if not n_tokens or k >= n_blocks:
        return tokens
    picks = np.linspace(0, n_blocks - 1, max(1, k)).round().astype(np.int64)  # distinct: k < n_blocks
    return np.concatenate([np.asarray(tokens[i * block_size:(i + 1) * block_size]) for i in picks])


def summed_loss(model: PreTrainedModel, input_ids: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy (nats) of a causal LM, as transformers'
    `ForCausalLMLoss` computes it before dividing: position t predicts labels[t + 1],
    -100 is ignored, fp32 log-softmax. Only the scalar leaves, so under torch.compile
    the logits never become a graph output."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[:, :-1]  # (B, T-1, h)
    logits = model.get_output_embeddings()(hidden)  # (B, T-1, V)
    return F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def save_best(model: PreTrainedModel, status: RunStatus) -> None:
    """The best model so far into checkpoints/best (swapped in whole, never half-written)."""
    best = status.run_dir / "checkpoints" / "best"
    tmp = best.with_name(".best-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    (tmp / "best.json").write_text(json.dumps(status.best), encoding="utf-8")
    old = best.with_name(".best-old")
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)


def training_args(settings: Settings, run_dir: Path, prec: Precision, device: str, max_steps: int,
                  report_to: list[str], compile_loss: str | None = None) -> Any:
    """The TrainingArguments for `settings.train` (checkpoints go to run_dir/checkpoints).
    With `compile_loss` (a compile mode) the StoryTrainer compiles model + loss itself, so
    the Trainer does not."""
    t = settings.train
    evaluating = t.eval_every > 0
    # On CPU, TrainingArguments warns that "the speedups for torchdynamo mostly come with GPU
    # Ampere or higher": the cpu profile compiles because we measured it faster here.
    with _logger_at_error("transformers.training_args", device == "cpu"):
        return TrainingArguments(
            output_dir=str(run_dir / "checkpoints"),
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            max_steps=max_steps,
            learning_rate=t.lr,
            warmup_steps=t.warmup_steps,  # used by our Schedule (create_scheduler is ours)
            weight_decay=t.weight_decay,
            adam_beta1=t.beta1,
            adam_beta2=t.beta2,
            max_grad_norm=t.grad_clip,
            optim=optimizer_name(settings, device),  # muon: built by optimizer_factory instead
            bf16=prec.name == "bf16",
            fp16=prec.name == "fp16",
            use_cpu=device == "cpu",
            activation_checkpointing=t.activation_checkpointing,
            torch_compile=not compile_loss and compile_ok(t.torch_compile, device),
            # a mode turns the Trainer's compile on by itself: only when it compiles
            torch_compile_mode=None if compile_loss or t.compile_mode == "default" else t.compile_mode,
            eval_strategy="steps" if evaluating else "no",
            eval_steps=t.eval_every if evaluating else None,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            save_strategy="steps",
            save_steps=t.save_every,
            save_total_limit=None,  # CheckpointMarker rotates, after the new checkpoint is complete
            logging_strategy="steps",
            logging_steps=t.log_every,
            logging_nan_inf_filter=False,  # we want to see a NaN, not have it averaged away
            report_to=report_to,
            run_name=run_dir.name,
            seed=t.seed,
            data_seed=t.seed,
            dataloader_num_workers=t.dataloader_workers,
            dataloader_drop_last=True,  # static shapes (torch.compile) and equal blocks per step
            ddp_backend="gloo" if device == "cpu" and world()[2] > 1 else None,
            ddp_find_unused_parameters=False,
            disable_tqdm=True,
            save_only_model=False,
            restore_callback_states_from_checkpoint=True,  # early-stopping patience survives a resume
            # batches reach the GPU as non-blocking copies from pinned memory: no sync per step
            accelerator_config={"non_blocking": device == "cuda"},
        )


@contextlib.contextmanager
def _logger_at_error(name: str, when: bool) -> Iterator[None]:
    """transformers logger `name` at ERROR level inside the block (when `when`)."""
    log = hf_logging.get_logger(name)
    level = log.level
    if when:
        log.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def optimizer_name(settings: Settings, device: str) -> str:
    """The optimizer to use: 8-bit AdamW only where CUDA is (it steps ~30x slower on a CPU)."""
    name = settings.train.optimizer
    if name == "adamw_bnb_8bit" and device != "cuda":
        console.info("optimizer: torch AdamW (8-bit AdamW steps ~30x slower on a CPU)")
        return "adamw_torch"
    if name == "adamw_bnb_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("train.optimizer = adamw_bnb_8bit needs bitsandbytes, which is not installed",
                            "pip install bitsandbytes, or --set train.optimizer=adamw_torch (more GPU memory)")
    return "adamw_torch" if name == "muon" else name


def optimizer_factory(settings: Settings, prec: Precision) -> tuple[Any, dict[str, Any]] | None:
    """The Trainer's `optimizer_cls_and_kwargs` for train.optimizer = muon (None otherwise):
    Muon's Newton-Schulz iteration runs in bf16 only where training does."""
    t = settings.train
    if t.optimizer != "muon":
        return None
    return MuonAdamWFactory, {"lr": t.lr, "weight_decay": t.weight_decay, "betas": (t.beta1, t.beta2),
                              "ns_fp32": prec.name != "bf16"}


def compile_ok(asked: bool, device: str) -> bool:
    """torch.compile when asked and it can work here: on a CPU, inductor needs a C++
    compiler (and does not run on Windows), so without one we warn (once) and train
    eagerly; on an Apple GPU it stays off (torch's MPS backend for inductor is not yet
    documented as working for this model, and nothing here has measured it)."""
    if asked and device == "mps":
        _mps_no_compile()
        return False
    return asked and (device != "cpu" or _cpu_can_compile())


@functools.cache
def _mps_no_compile() -> None:
    console.warn("torch.compile is off on an Apple GPU (MPS): training without it")


@functools.cache
def _cpu_can_compile() -> bool:
    if sys.platform == "win32":
        console.warn("torch.compile does not run on Windows CPUs here: training without it")
        return False
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        console.warn("torch.compile needs a C++ compiler on a CPU (none found): training without it, ~10% slower")
        return False
    return True

