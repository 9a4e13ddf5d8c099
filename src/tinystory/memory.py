"""The memory plan behind `tinystory train --dry-run`: peak memory of one training step,
worked out from the settings and the model config alone (arithmetic, no tensors).

What is counted, for the eager `MistralForCausalLM` trained by `transformers.Trainer`
(sdpa attention, HF's default loss), with p = bytes of a parameter (fp32: 4, the Trainer
keeps fp32 master weights under fp16/bf16 autocast) and c = bytes of the compute dtype
(2 under fp16/bf16 autocast, 4 in fp32):

- weights p*P; gradients p*P (set to None after each optimizer step, so they are live
  during forward only while accumulating); optimizer state (torch AdamW: two fp32 states;
  bitsandbytes 8-bit AdamW: one byte per state, an fp32 absmax per 256-value block, and
  fp32 states for tensors under 4096 values and for the embedding, which the Trainer pins
  to 32 bits; Muon: one fp32 momentum per block matrix, AdamW's two on the rest); the
  foreach AdamW step's one fp32 temporary per parameter (fused: none; Muon: its
  Newton-Schulz iteration over the largest matrix, or AdamW's step on the embedding).
- autocast's half copies of the matmul weights (the tied lm_head included): all of them
  are cached during forward; after it, those saved for backward stay.
- activations saved for backward, per decoder layer (measured on CPU with
  `saved_tensors_hooks`, pinned in tests/test_memory.py), in units of B*T*hidden:
  the layer input and the mid-layer residual (p each), the two RMSNorm products (p each),
  the inputs of the seven projections (autocast casts the norm output once per
  projection: 5 copies of c; in fp32 the two norm outputs are shared: 2 of c), sdpa's
  q, k, v and output (c; the output is o_proj's input too) and its fp32 logsumexp, plus
  4*c*B*T*intermediate for the GELU-tanh MLP (gate, act, up, product), and the attention
  mask converted to the compute dtype (c*B*T*T) when the sliding window is shorter
  than the block. With activation checkpointing only each layer's input (p) is kept,
  plus one layer's worth while it is recomputed in backward.
- logits: c*B*T*V from lm_head, the fp32 upcast HF's loss makes (`logits.float()`), and
  the fp32 log-softmax saved for backward: 10 bytes per logit at the end of forward under
  autocast; 12 bytes per logit when backward starts (the saved log-softmax, the dense
  gradient nll_loss returns, and the gradient log_softmax returns).

The peak is the largest of five moments of a step: the end of forward, the start of
backward (the logits' gradients), the backward through the layers, the embedding's
backward (a dense fp32 gradient of the whole table), and the optimizer step. On CUDA a
caching-allocator slack and the CUDA context are added as stated constants; the total is
compared with `train.memory_budget_gb` (GiB) or the device's memory.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psutil
import torch
from rich.table import Table

from tinystory.model import count_parameters

if TYPE_CHECKING:
    from tinystory.settings import Settings

GIB = 2**30
MIB = 2**20
# The CUDA context (driver state, loaded kernels, cuBLAS/cuDNN handles) lives outside
# torch's allocator but inside the card's memory; ~0.3-0.5 GiB on recent drivers.
CUDA_CONTEXT_BYTES = 512 * MIB
# The caching allocator rounds blocks up and fragments: reserved exceeds allocated.
ALLOCATOR_SLACK = 0.10
# On a CPU the process itself (python, torch, transformers, the data) takes this much.
CPU_PROCESS_BYTES = 1 * GIB
# A micro-batch of this many tokens keeps a GPU busy for models of this size: above it,
# gradient accumulation costs little, so a suggestion keeps checkpointing as asked.
BUSY_TOKENS = 8192
BNB_BLOCK = 256  # bitsandbytes blockwise quantization: one fp32 absmax per 256 values
BNB_MIN_8BIT = 4096  # bitsandbytes keeps fp32 state for tensors smaller than this


@dataclass(frozen=True)
class Suggestion:
    """A micro-batch / accumulation / block length / checkpointing that fits the budget."""

    batch_size: int
    grad_accum: int
    block_size: int
    activation_checkpointing: bool
    total_bytes: int
    tokens_per_step: int
    reason: str

    @property
    def flags(self) -> str:
        """The `--set` flags that apply it."""
        ckpt = str(self.activation_checkpointing).lower()
        return (f"--set train.batch_size={self.batch_size} --set train.grad_accum={self.grad_accum} "
                f"--set train.block_size={self.block_size} --set train.activation_checkpointing={ckpt}")


@dataclass(frozen=True)
class MemoryPlan:
    """Peak memory of one training step, split by what holds it (bytes)."""

    device: str
    precision: str  # fp32 | fp16 | bf16 (fp16/bf16 = autocast over fp32 weights)
    optimizer: str
    parameters: int
    batch_size: int
    grad_accum: int
    block_size: int
    vocab_size: int
    activation_checkpointing: bool
    components: dict[str, int]  # full size of each part
    phases: dict[str, dict[str, int]]  # what is live at each moment of a step
    peak_phase: str
    overhead: dict[str, int]  # allocator slack, CUDA context / process
    budget_bytes: int | None
    budget_source: str
    suggestion: Suggestion | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step (one device)."""
        return self.batch_size * self.grad_accum * self.block_size

    @property
    def peak_allocated_bytes(self) -> int:
        """Tensors live at the peak: compare with `torch.cuda.max_memory_allocated()`."""
        return sum(self.phases[self.peak_phase].values())

    @property
    def total_bytes(self) -> int:
        """Peak allocated plus allocator slack and context: what must fit the budget."""
        return self.peak_allocated_bytes + sum(self.overhead.values())

    @property
    def fits(self) -> bool | None:
        """Whether the total fits the budget (None when no budget is known)."""
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def render(self) -> Table:
        """The plan as a rich table (see `render`)."""
        return render(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes as integers)."""
        d = {k: getattr(self, k) for k in ("device", "precision", "optimizer", "parameters", "batch_size",
                                          "grad_accum", "block_size", "vocab_size", "activation_checkpointing",
                                          "components", "phases", "peak_phase", "overhead", "budget_bytes",
                                          "budget_source", "tokens_per_step", "peak_allocated_bytes",
                                          "total_bytes", "fits")}
        d["notes"] = list(self.notes)
        s = self.suggestion
        d["suggestion"] = None if s is None else {**s.__dict__, "flags": s.flags}
        return d


# ------------------------------------------------------------------------- the shape


@dataclass(frozen=True)
class _Shape:
    B: int
    T: int
    V: int
    h: int
    inter: int
    layers: int
    heads: int
    qd: int  # heads * head_dim
    kvd: int  # kv heads * head_dim
    tied: bool
    window: int | None
    eager: bool = False  # attention as plain matmuls (train.attention = "eager") instead of sdpa

    @classmethod
    def of(cls, config: Any, B: int, T: int) -> _Shape:
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(B, T, config.vocab_size, config.hidden_size, config.intermediate_size,
                   config.num_hidden_layers, config.num_attention_heads, config.num_attention_heads * hd,
                   config.num_key_value_heads * hd, bool(config.tie_word_embeddings),
                   getattr(config, "sliding_window", None), getattr(config, "_attn_implementation", "") == "eager")

    def layer_matrices(self) -> list[int]:
        """Sizes of one layer's projection weights: q, k, v, o, gate, up, down."""
        h, i = self.h, self.inter
        return [h * self.qd, h * self.kvd, h * self.kvd, self.qd * h, h * i, h * i, i * h]

    @property
    def mask(self) -> bool:
        """HF materialises a mask (sdpa cannot use is_causal) when the window is shorter than the block."""
        return self.window is not None and self.window < self.T


def _layer_saved(s: _Shape, p: int, c: int, amp: bool) -> int:
    """Bytes one decoder layer saves for backward (see the module docstring)."""
    bth = s.B * s.T * s.h
    casts = 5 if amp else 2  # autocast casts the norm output per projection; fp32 shares it
    residual_and_norms = 4 * p * bth  # layer input, mid residual, two RMSNorm products
    attn = c * s.B * s.T * (2 * s.qd + 2 * s.kvd)  # q, k, v, output (= o_proj input)
    lse = 4 * s.B * s.heads * s.T
    rsqrt = 2 * 4 * s.B * s.T
    mlp = 4 * c * s.B * s.T * s.inter  # gate out, GELU out, up out, product (down_proj input)
    mask = c * s.B * s.T * s.T if s.mask else 0  # bool mask converted to the query dtype
    if s.eager:  # the fp32 softmax output (+ its compute-dtype copy under autocast); no logsumexp, mask unsaved
        probs = (4 + (c if amp else 0)) * s.B * s.heads * s.T * s.T
        return residual_and_norms + casts * c * bth + attn + probs + rsqrt + mlp
    return residual_and_norms + casts * c * bth + attn + lse + rsqrt + mlp + mask


def _head_saved(s: _Shape, p: int, c: int) -> int:
    """Final norm (its input and product) and the lm_head input."""
    return (2 * p + c) * s.B * s.T * s.h + 4 * s.B * s.T


def _batch_bytes(s: _Shape) -> int:
    """input_ids + labels (int64), the bool mask, fp32 rope cos/sin."""
    head_dim = s.qd // s.heads
    return 2 * 8 * s.B * s.T + (s.B * s.T * s.T if s.mask else 0) + 2 * 4 * s.T * head_dim


def _optimizer_state(s: _Shape, optimizer: str) -> int:
    """Bytes of optimizer state once it exists (after the first step)."""
    norms = (2 * s.layers + 1) * s.h
    embed = s.V * s.h
    head = 0 if s.tied else s.V * s.h
    mats = s.layer_matrices() * s.layers + ([head] if head else [])
    if optimizer == "muon":  # Muon: one fp32 momentum buffer per block matrix; AdamW's two on the rest
        return 4 * sum(s.layer_matrices()) * s.layers + 2 * 4 * (norms + embed + head)
    if optimizer != "adamw_bnb_8bit":
        return 2 * 4 * (norms + embed + sum(mats))  # exp_avg, exp_avg_sq in fp32
    eight = sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) for n in mats if n >= BNB_MIN_8BIT)
    thirty_two = 8 * (norms + embed + sum(n for n in mats if n < BNB_MIN_8BIT))  # Trainer pins nn.Embedding to 32 bits
    return eight + thirty_two + 2 * 4 * 256  # + the two 256-entry quantization maps


def _optimizer_transient(s: _Shape, optimizer: str, device: str, params: int) -> int:
    """Temporaries of one optimizer step."""
    if optimizer == "muon":  # one matrix at a time: the nesterov update, x and the new x, two Gram matrices
        rest = s.V * s.h + (0 if s.tied else s.V * s.h)
        newton_schulz = max(4 * (3 * n + 2 * min(n // s.h, s.h) ** 2) for n in s.layer_matrices())
        adamw = 4 * (rest + (2 * s.layers + 1) * s.h) if device == "cuda" else 2 * 4 * rest
        return max(newton_schulz, adamw)
    if optimizer == "adamw_torch" and device == "cuda":
        return 4 * params  # foreach: sqrt(exp_avg_sq) for the whole group, fp32
    if optimizer == "adamw_torch":
        return 2 * 4 * max(s.V * s.h, *s.layer_matrices())  # single-tensor loop: sqrt and the divide
    return 0  # fused AdamW and bitsandbytes update in place


# ------------------------------------------------------------------------ the phases


def _backward_layers(s: _Shape, layer: int, *, p: int, c: int, amp: bool, ckpt: bool, accum: int,
                     params: int) -> dict[str, int]:
    """Live parts while backward runs through the decoder layers, at the worst layer.

    Gradients grow as saved tensors are freed, so the live bytes are linear in the layer
    index: the worst is the last layer (first in backward) or the first one.
    """
    mm = sum(s.layer_matrices())
    lp = mm + 2 * s.h
    other = params - s.layers * lp  # embedding (+ untied head) and the final norm
    half = c * mm if amp else 0
    if ckpt:  # layer inputs kept for the layers not yet recomputed, and one layer recomputed
        last = {"activations": (s.layers - 1) * p * s.B * s.T * s.h + layer, "half_weights": half}
    else:
        last = {"activations": s.layers * layer, "half_weights": s.layers * half}
    last["gradients"] = p * (other + lp)
    first = {"activations": layer, "half_weights": half, "gradients": p * params}
    if accum > 1:  # earlier micro-steps' gradients are there already
        last["gradients"] = first["gradients"] = p * params
    worst = max(last, first, key=lambda d: sum(d.values()))
    # the gradients flowing through a layer: three of MLP width, two of the residual
    worst["backward_transient"] = 2 * c * s.B * s.T * s.inter + 2 * p * s.B * s.T * s.h
    return worst


def _phases(s: _Shape, *, amp: bool, ckpt: bool, accum: int, params: int, optimizer: str,
            device: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Full sizes of the parts, and the parts live at each moment of a step."""
    p, c = 4, (2 if amp else 4)
    bth, btv = s.B * s.T * s.h, s.B * s.T * s.V
    layer = _layer_saved(s, p, c, amp)
    head = _head_saved(s, p, c)
    half_all = c * (s.layers * sum(s.layer_matrices()) + s.V * s.h) if amp else 0
    half_head = c * s.V * s.h if amp else 0  # the lm_head copy, saved outside any checkpoint
    parts = {
        "weights": p * params,
        "half_weights": half_all,
        "gradients": p * params,
        "optimizer_state": _optimizer_state(s, optimizer),
        "optimizer_transient": _optimizer_transient(s, optimizer, device, params),
        "activations_full": s.layers * layer + head,
        "activations_checkpointed": s.layers * p * bth + head + layer,  # + one layer recomputed
        "logits": 12 * btv,
        "batch": _batch_bytes(s),
    }
    base = {k: parts[k] for k in ("weights", "optimizer_state", "batch")}
    held = parts["gradients"] if accum > 1 else 0  # set to None after each optimizer step
    acts = s.layers * p * bth + head if ckpt else parts["activations_full"]
    phases = {
        "forward end": {**base, "gradients": held, "half_weights": half_all, "activations": acts,
                        "logits": (2 + 4 + 4 if amp else 4 + 4) * btv},
        "backward start": {**base, "gradients": held, "half_weights": half_head if ckpt else half_all,
                           "activations": acts, "logits": 12 * btv},
        "backward layers": {**base, **_backward_layers(s, layer, p=p, c=c, amp=amp, ckpt=ckpt, accum=accum,
                                                       params=params)},
        # the embedding's backward builds a dense (V, hidden) gradient before adding it to .grad
        "embedding backward": {**base, "gradients": parts["gradients"], "backward_transient": p * s.V * s.h},
        "optimizer step": {**base, "gradients": parts["gradients"],
                           "optimizer_transient": parts["optimizer_transient"]},
    }
    return parts, phases


# -------------------------------------------------------------------------- the plan


def plan(settings: Settings, config: Any, device: str = "cuda", *, precision: str | None = None,
         budget_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of `settings.train` for the model `config` on `device` ("cuda", "mps"
    (an Apple GPU: planned against its share of unified memory) or "cpu").

    precision: the precision training will really use (e.g. what the CPU probe chose);
        default `settings.train.precision`, where `auto` counts as 2-byte autocast on CUDA
        and fp32 on a CPU (the larger of the two it may pick).
    budget_bytes: overrides `train.memory_budget_gb` and the device's own memory.
    When the plan does not fit, `.suggestion` holds settings that do.
    """
    t = settings.train
    if t.attention != getattr(config, "_attn_implementation", "sdpa"):
        config = copy.deepcopy(config)
        config._attn_implementation = t.attention  # what training will set on the model
    prec = _resolve_precision(precision or t.precision, device)
    budget, source = _budget(settings, device, budget_bytes)
    notes = _notes(settings, config, device, prec, precision)
    optimizer = t.optimizer if t.optimizer != "adamw_bnb_8bit" or device == "cuda" else "adamw_torch"  # as trained
    args = dict(config=config, precision=prec, optimizer=optimizer, device=device, budget=budget,
                budget_source=source, notes=notes)
    result = _build(B=t.batch_size, A=t.grad_accum, T=t.block_size, ckpt=t.activation_checkpointing, **args)
    if result.fits is False:
        result = replace(result, suggestion=_suggest(result, args))
    return result


def _resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"  # fp16 and bf16 take the same memory; MPS may pick fp32
    return precision


def _notes(settings: Settings, config: Any, device: str, prec: str, asked: str | None) -> tuple[str, ...]:
    notes = []
    t = settings.train
    if asked is None and t.precision == "auto":
        why = "fp16 and bf16 need the same memory" if device == "cuda" else "the larger of fp32/bf16"
        notes.append(f"precision auto counted as {prec} ({why})")
    if t.torch_compile:
        notes.append("eager estimate: torch.compile fuses kernels and usually saves less")
    act = getattr(config, "hidden_act", "silu")  # transformers' default for a Mistral config
    if act not in ("gelu_pytorch_tanh", "silu", "gelu", "relu"):
        notes.append(f"activation {act} may save more than one tensor (counted as one)")
    return tuple(notes)


def _budget(settings: Settings, device: str, budget_bytes: int | None) -> tuple[int | None, str]:
    """The budget in bytes and where it came from (`memory_budget_gb` is in GiB)."""
    if budget_bytes is not None:
        return budget_bytes, "given"
    gb = settings.train.memory_budget_gb
    if gb > 0:
        return int(gb * GIB), f"train.memory_budget_gb = {gb:g} GiB ({settings.source('train.memory_budget_gb')})"
    if device == "cuda":
        if not torch.cuda.is_available():
            return None, "unknown: no CUDA device here (set train.memory_budget_gb)"
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"{props.name}"
    if device == "mps":  # unified memory: the GPU gets the share Metal recommends, not all of it
        ram = ram_bytes()
        recommended = mps_recommended_bytes()
        if recommended:
            return recommended, (f"the Apple GPU's recommended working set, {100 * recommended / ram:.0f}% of "
                                 f"this Mac's {ram / GIB:.0f} GiB unified memory")
        return int(MPS_SHARE * ram), (f"{100 * MPS_SHARE:.0f}% of this Mac's {ram / GIB:.0f} GiB unified memory "
                                      "(what Metal recommends on most Apple Silicon)")

    return ram_bytes(), "this machine's RAM"


def ram_bytes() -> int:
    """This machine's physical memory (psutil: Linux, macOS and Windows alike)."""
    return int(psutil.virtual_memory().total)


MPS_SHARE = 0.75  # the usual ratio of Metal's recommendedMaxWorkingSetSize to unified memory


def mps_recommended_bytes() -> int:
    """Metal's recommended working set for this process's GPU (0 when unknown)."""
    try:
        return int(torch.mps.recommended_max_memory())
    except (RuntimeError, AttributeError):  # no MPS here, or a torch without the call
        return 0


def _build(*, config: Any, B: int, A: int, T: int, ckpt: bool, precision: str, optimizer: str, device: str,
           budget: int | None, budget_source: str, notes: tuple[str, ...]) -> MemoryPlan:
    shape = _Shape.of(config, B, T)
    params = count_parameters(config)
    parts, phases = _phases(shape, amp=precision in ("fp16", "bf16"), ckpt=ckpt, accum=A, params=params,
                            optimizer=optimizer, device=device)
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    allocated = sum(phases[peak].values())
    if device == "cuda":
        overhead = {"allocator_slack": int(ALLOCATOR_SLACK * allocated), "cuda_context": CUDA_CONTEXT_BYTES}
    else:
        overhead = {"process": CPU_PROCESS_BYTES}
    return MemoryPlan(device=device, precision=precision, optimizer=optimizer, parameters=params, batch_size=B,
                      grad_accum=A, block_size=T, vocab_size=shape.V, activation_checkpointing=ckpt,
                      components=parts, phases=phases, peak_phase=peak, overhead=overhead, budget_bytes=budget,
                      budget_source=budget_source, notes=notes)


def _suggest(p: MemoryPlan, args: dict[str, Any]) -> Suggestion | None:
    """Settings that fit: keep the block and the tokens per optimizer step if possible.

    Per block length (the asked one first, then halved down to 64): the largest
    micro-batch that fits, with checkpointing as asked or on, ranked by `_rank`.
    """
    tokens = p.tokens_per_step
    blocks = [p.block_size]
    while blocks[-1] // 2 >= 64:
        blocks.append(blocks[-1] // 2)
    for T in blocks:
        options = []
        for ckpt in dict.fromkeys((p.activation_checkpointing, True)):
            options += _options_at(tokens, T, ckpt, p.batch_size, args)
        if options:
            return replace(best := max(options, key=lambda o: _rank(o, p)), reason=_reason(p, best))
    return None


def _rank(o: Suggestion, p: MemoryPlan) -> tuple[bool, bool, bool, int]:
    """Exact tokens per step first; then a micro-batch big enough to keep the GPU busy; among
    those, checkpointing as asked (recompute costs ~1/3 more compute); then the largest."""
    busy = o.batch_size * o.block_size >= BUSY_TOKENS
    as_asked = busy and o.activation_checkpointing == p.activation_checkpointing
    return o.tokens_per_step == p.tokens_per_step, busy, as_asked, o.batch_size


def _options_at(tokens: int, T: int, ckpt: bool, max_batch: int, args: dict[str, Any]) -> list[Suggestion]:
    """The largest micro-batch that fits at block T, and the largest exact divisor under it."""
    def build(B: int) -> MemoryPlan:
        return _build(B=B, A=max(1, math.ceil(tokens / (B * T))), T=T, ckpt=ckpt, **args)

    if not build(1).fits:
        return []
    # memory grows with the micro-batch while it accumulates: bisect for the largest that fits.
    # Only the asked batch itself may need no accumulation (and hold no gradients between
    # micro-steps), so it can fit where a smaller one does not: try it first.
    lo, hi = (max_batch, max_batch) if build(max_batch).fits else (1, max_batch)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if build(mid).fits else (lo, mid - 1)
    found = [lo]
    if tokens % T == 0:
        n = tokens // T
        found.append(max(d for d in range(1, lo + 1) if n % d == 0))
    out = []
    for B in dict.fromkeys(found):
        q = build(B)
        out.append(Suggestion(B, q.grad_accum, T, ckpt, q.total_bytes, q.tokens_per_step, ""))
    return out


def _reason(p: MemoryPlan, s: Suggestion) -> str:
    kept = ("keeps" if s.tokens_per_step == p.tokens_per_step
            else f"gives {s.tokens_per_step:,} instead of") + f" {p.tokens_per_step:,} tokens per step"
    ckpt = " with activation checkpointing" if s.activation_checkpointing else ""
    return (f"batch {s.batch_size} x accumulation {s.grad_accum} x block {s.block_size}{ckpt} "
            f"needs {fmt_bytes(s.total_bytes)} and {kept}")


# ------------------------------------------------------------------------- rendering


def fmt_bytes(n: int | None) -> str:
    """1.23 GiB / 45.6 MiB."""
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def summary(p: MemoryPlan) -> str:
    """One line: peak, total and whether it fits."""
    verdict = {True: "fits", False: "does NOT fit", None: "budget unknown for"}[p.fits]
    return (f"peak {fmt_bytes(p.peak_allocated_bytes)} allocated ({p.peak_phase}), {fmt_bytes(p.total_bytes)} "
            f"with overhead: {verdict} {fmt_bytes(p.budget_bytes)} ({p.budget_source})")


def render(p: MemoryPlan) -> Table:
    """A rich table: each part at the peak and at full size, the overhead, the verdict."""

    at = p.phases[p.peak_phase]
    half = "bf16" if p.precision == "bf16" else "fp16"
    opt = {"adamw_bnb_8bit": "8-bit AdamW (bitsandbytes)", "adamw_torch_fused": "fused AdamW"}.get(p.optimizer, "AdamW")
    ckpt_on = p.activation_checkpointing
    rows = [
        ("weights (fp32 master)" if p.precision != "fp32" else "weights (fp32)", at.get("weights"),
         p.components["weights"], f"{p.parameters:,} params x 4 B"),
        (f"{half} weight copies (autocast)", at.get("half_weights"), p.components["half_weights"],
         "matmul weights cast per step"),
        ("gradients (fp32)", at.get("gradients"), p.components["gradients"], "freed after each optimizer step"),
        (f"optimizer state: {opt}", at.get("optimizer_state"), p.components["optimizer_state"], ""),
        ("optimizer step temporaries", at.get("optimizer_transient"), p.components["optimizer_transient"], ""),
        ("activations, checkpointing on", at.get("activations") if ckpt_on else None,
         p.components["activations_checkpointed"], "used" if ckpt_on else ""),
        ("activations, checkpointing off", at.get("activations") if not ckpt_on else None,
         p.components["activations_full"], "" if ckpt_on else "used"),
        ("backward temporaries", at.get("backward_transient"), None, ""),
        ("logits + loss", at.get("logits"), p.components["logits"],
         f"{p.batch_size}x{p.block_size}x{p.vocab_size:,} logits x 12 B"),
        ("batch tensors", at.get("batch"), p.components["batch"], "ids, labels, mask"),
    ]
    table = Table(title=f"memory plan ({p.device}, {p.precision}): batch {p.batch_size} x accumulation "
                        f"{p.grad_accum} x block {p.block_size} = {p.tokens_per_step:,} tokens per step",
                  title_justify="left")
    for col, justify in (("part", "left"), ("at peak", "right"), ("full size", "right"), ("note", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, now, full, note in rows:
        if not now and not full:
            continue
        table.add_row(name, fmt_bytes(now) if now else "-", fmt_bytes(full) if full else "-", note)
    table.add_section()
    table.add_row("peak allocated", fmt_bytes(p.peak_allocated_bytes), "", f"at {p.peak_phase}", style="bold")
    for name, n in p.overhead.items():
        label = {"allocator_slack": f"allocator slack ({ALLOCATOR_SLACK:.0%})", "cuda_context": "CUDA context",
                 "process": "process (python, torch)"}[name]
        table.add_row(label, fmt_bytes(n), "", "stated constant")
    verdict = {True: "[green]fits[/green]", False: "[red]does not fit[/red]", None: "budget unknown"}[p.fits]
    table.add_row("total", fmt_bytes(p.total_bytes), "", "", style="bold")
    table.add_row("budget", fmt_bytes(p.budget_bytes), "", f"{verdict}: {p.budget_source}")
    captions = list(p.notes)
    if p.suggestion:
        captions.append(f"suggestion: {p.suggestion.reason}: {p.suggestion.flags}")
    elif p.fits is False:
        captions.append("no batch, block or checkpointing setting fits: use a smaller preset or a larger device")
    if captions:
        table.caption = "\n".join(captions)
        table.caption_justify = "left"
    return table
