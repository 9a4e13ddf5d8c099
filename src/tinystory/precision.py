"""Training precision: pick fp16 / bf16 / fp32 for the device, and say why.

On CUDA the answer follows the card (bf16 on Ampere+, fp16 + loss scaling on older ones).
On a CPU it depends on the chip: bf16 matmul ran ~2x fp32 on our AMD EPYC and ~0.55x on
our Intel Xeon, so `auto` times a few real training steps of the actual model in both
and keeps the faster. fp16 on a CPU is refused: `TrainingArguments(fp16=True)` without
CUDA silently trains fp32, and fp16 matmul on these CPUs is ~100x slower anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from tinystory.errors import TrainingError
from tinystory.loading import mps_bf16


def fp16_needs_cuda() -> TrainingError:
    """The one-line error for fp16 on a CPU (the Trainer would silently train fp32)."""
    return TrainingError("fp16 training needs a CUDA GPU and this machine has none",
                         "use --precision auto, bf16 or fp32")


@dataclass(frozen=True)
class Precision:
    """The chosen precision, why, and the probe's step times (ms) when one ran."""

    name: str  # fp32 | bf16 | fp16
    reason: str
    step_ms: dict[str, float]

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]


def resolve(asked: str, device: str, model: PreTrainedModel | None = None, batch_shape: tuple[int, int] = (8, 64),
            probe_steps: int = 2) -> Precision:
    """The precision to train in: `asked` (auto|fp32|bf16|fp16) checked against `device`.

    On a CPU and on an Apple GPU (MPS), `auto` runs `probe` on `model` (already on `device`)
    with a (B, T) batch of random tokens and keeps the fastest of what the device runs:
    fp32 or bf16 on a CPU (never fp16: ~100x slower there); fp32, fp16 (loss-scaled, as
    accelerate does it on MPS with torch >= 2.8) and, from macOS 14, bf16 on MPS.
    """
    if device == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if asked == "auto":
            if bf16_ok:
                return Precision("bf16", "auto: this GPU supports bf16", {})
            return Precision("fp16", "auto: this GPU has no bf16, so fp16 with loss scaling", {})
        if asked == "bf16" and not bf16_ok:
            raise TrainingError("this GPU has no bf16 support", "use --precision fp16 (loss-scaled) or fp32")
        return Precision(asked, f"asked for {asked}", {})
    if device == "mps":
        if asked == "bf16" and not mps_bf16():
            raise TrainingError("bf16 on an Apple GPU needs macOS 14 or newer", "use --precision fp16 or fp32")
        if asked == "fp16" and not mps_fp16():
            raise TrainingError(f"fp16 training on an Apple GPU needs torch 2.8 or newer (its loss scaler), this is "
                                f"{torch.__version__}", "upgrade torch, or use --precision fp32")
        names: tuple[str, ...] = ("fp32", *(["fp16"] if mps_fp16() else []), *(["bf16"] if mps_bf16() else []))
    elif asked == "fp16":
        raise fp16_needs_cuda()
    else:
        names = ("fp32", "bf16")
    if asked != "auto":
        return Precision(asked, f"asked for {asked}", {})
    if model is None:
        return Precision("fp32", "auto without a model to probe: fp32", {})
    if len(names) == 1:
        return Precision(names[0], f"auto: the only precision this torch trains in on {device}", {})
    ms = probe(model, batch_shape, steps=probe_steps, names=names, device=device)
    return Precision(*fastest(ms, "this CPU" if device == "cpu" else "this Apple GPU"), ms)


def mps_fp16() -> bool:
    """Whether fp16 trains on an Apple GPU: accelerate's loss scaler (`get_grad_scaler`)
    supports MPS from torch 2.8 on."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def fastest(ms: dict[str, float], where: str) -> tuple[str, str]:
    """(the fastest name of a probe's ms a step, why) against the runner-up."""
    fast, slow = sorted(ms, key=ms.__getitem__)[:2]
    return fast, (f"auto: {fast} trained {ms[slow] / ms[fast]:.2f}x faster than {slow} on {where} "
                  f"({ms[fast]:.0f} vs {ms[slow]:.0f} ms a step in a short probe)")


# A precision whose warm-up step takes more than this many times the fastest warm-up is
# not timed further: on a CPU without native bf16 (our Zen 1 EPYC: 13.6 s a bf16 step
# against 1.1 s in fp32) its two timed steps cost half a minute of every run and cannot
# change the choice. A close race is timed in full (bf16 was 0.55x fp32 on our Xeon).
SLOW_WARMUP = 4.0


def probe(model: PreTrainedModel, batch_shape: tuple[int, int], steps: int = 2,
          names: tuple[str, ...] = ("fp32", "bf16"), device: str = "cpu") -> dict[str, float]:
    """Median ms of a forward+backward step of `model` in each precision of `names`.

    One warm-up step each, then the precisions alternate so none gets the quieter
    moment. A precision other than the first whose warm-up took more than SLOW_WARMUP
    times the fastest warm-up is left out of the timed rounds and reported by its warm-up
    step. (The first bears the cold start, so it is always timed.) Gradients are zeroed
    afterwards; the weights are not changed.
    """

    B, T = batch_shape
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=gen).to(device)  # (B, T)
    was_training = model.training
    model.train()
    warm = {name: _step(model, ids, name, device) for name in names}
    slow = {n: 1000 * s for n, s in list(warm.items())[1:] if s > SLOW_WARMUP * min(warm.values())}
    times: dict[str, list[float]] = {n: [] for n in names if n not in slow}
    for _ in range(steps):
        for name in times:
            times[name].append(_step(model, ids, name, device))
    model.train(was_training)
    return {**{k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()}, **slow}


def _step(model: PreTrainedModel, ids: torch.Tensor, name: str, device: str) -> float:
    """Seconds of one forward+backward of `model` on `ids` in precision `name`."""
    sync = synchronizer(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    sync()
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=dtype, enabled=name != "fp32"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for the device's queued work (nothing on a CPU)."""
    return {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device, lambda: None)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 1024, seconds: float = 0.3) -> float:
    """Measured dense matmul throughput (FLOP/s) of this device in `dtype`: the MFU denominator.

    Stops after `seconds`, or after the warm-up alone when that took longer: a CPU without
    native bf16 (an AMD EPYC family 23 here) needs ~2.6 s for one 1024^3 bf16 matmul, so a
    fixed number of repetitions would hold up the start of training for minutes."""

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = synchronizer(device)
    t0 = time.perf_counter()
    torch.matmul(a, b)  # warm up (kernel selection, caches)
    sync()
    warm = time.perf_counter() - t0
    if warm >= seconds:
        return 2 * n**3 / warm
    every = 1 if device == "cpu" else 4  # a GPU sync costs time; a CPU matmul has ended when it returns
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        if reps % every == 0:
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return 2 * n**3 * reps / elapsed


def peak_flops(dtype: torch.dtype, device: str = "cpu", seconds: float = 0.1) -> float:
    """The MFU denominator: the best `matmul_peak` over the square sizes where this device
    peaks (CPU: 512, 1024 and 2048, `seconds` each; CUDA: 4096). The live display and
    benchmarks/bench_train.py use the same sizes, so their MFU figures agree. A size whose
    single matmul already takes longer than `seconds` ends the search (the next is 8x more)."""
    sizes = {"cuda": (4096,), "mps": (2048,)}.get(device, (512, 1024, 2048))
    best = 0.0
    for n in sizes:
        rate = matmul_peak(dtype, device, n=n, seconds=seconds)
        best = max(best, rate)
        if 2 * n**3 / rate >= seconds:
            break
    return best
