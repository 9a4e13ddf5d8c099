"""The memory plan: hand-computed figures for the 40M preset, the rtx2070 verdict, the
suggestion for an absurd batch, and the activation arithmetic checked against what
torch really saves for backward (on CPU, at small shapes)."""

from __future__ import annotations

import json

import pytest

from tinystory import memory
from tinystory.model import build_config
from tinystory.settings import load_settings

GIB = 2**30


@pytest.fixture(scope="module")
def config40m():
    return build_config("tinystories-40m", vocab_size=32000)


@pytest.fixture(scope="module")
def rtx2070():
    return load_settings(profile="rtx2070", env={})


def test_rtx2070_plan_by_hand(rtx2070, config40m):
    """fp16 autocast over fp32 weights, batch 6 x 512, checkpointing, 8-bit AdamW, V = 32000."""
    p = memory.plan(rtx2070, config40m)
    B, T, h, inter, L, V = 6, 512, 384, 1536, 12, 32000
    params = V * h + L * (4 * h * h + 3 * h * inter + 2 * h) + h
    assert params == 40_609_152 == p.parameters
    assert p.tokens_per_step == 3072

    weights = 4 * params  # fp32 master weights
    assert p.components["weights"] == 162_436_608
    # bitsandbytes: the embedding pinned to 32 bits by the Trainer and the 25 norm vectors
    # (< 4096 values) keep two fp32 states; the 84 matrices one byte per state plus an
    # fp32 absmax per 256 values per state; plus two 256-entry fp32 quantization maps
    mats = L * (4 * h * h + 3 * h * inter)
    blocks = L * (4 * (h * h // 256) + 3 * (h * inter // 256))
    optimizer = 8 * (V * h + 25 * h) + 2 * mats + 2 * 4 * blocks + 2 * 4 * 256
    assert optimizer == 155_890_688 == p.components["optimizer_state"]

    bth = B * T * h
    head = (4 + 4 + 2) * bth + 4 * B * T  # final norm input and product (fp32), lm_head input (fp16), rsqrt
    checkpointed = L * 4 * bth + head  # one fp32 hidden state per layer is all checkpointing keeps
    logits = 12 * B * T * V  # saved fp32 log-softmax + nll's dense fp32 grad + log_softmax's fp32 grad
    lm_head_copy = 2 * V * h  # autocast's fp16 copy of the tied embedding, saved by lm_head
    batch = 2 * 8 * B * T + B * T * T + 2 * 4 * T * (h // 6)  # ids + labels, bool window mask, rope cos/sin
    peak = weights + optimizer + lm_head_copy + checkpointed + logits + batch
    assert p.peak_phase == "backward start"
    assert p.phases["backward start"] == {
        "weights": weights, "optimizer_state": optimizer, "batch": batch, "gradients": 0,
        "half_weights": lm_head_copy, "activations": checkpointed, "logits": logits}
    assert peak == 1_592_867_328 == p.peak_allocated_bytes  # 1.48 GiB
    assert p.total_bytes == peak + int(0.10 * peak) + 512 * 2**20  # allocator slack + CUDA context
    assert p.budget_bytes == 8 * GIB and p.fits is True and p.suggestion is None

    # the same step without checkpointing: every layer keeps (in B*T*hidden units) the fp32
    # input, mid residual and two norm products, five fp16 casts of the norm outputs, fp16
    # q, k, v and attention output; 4 fp16 MLP tensors of width 1536; the fp32 logsumexp,
    # two rsqrt vectors and the window mask converted to fp16 (T = 512 > window 384)
    layer = (4 * 4 + 5 * 2 + 4 * 2) * bth + 4 * 2 * B * T * inter + 4 * B * 6 * T + 2 * 4 * B * T + 2 * B * T * T
    assert p.components["activations_full"] == L * layer + head == 985_018_368
    assert p.components["activations_checkpointed"] == checkpointed + layer


def test_plan_renders_and_serialises(rtx2070, config40m):
    from rich.console import Console

    p = memory.plan(rtx2070, config40m)
    console = Console(width=120, record=True)
    console.print(p.render())
    text = console.export_text()
    assert "1.48 GiB" in text and "8.00 GiB" in text and "fits" in text and "at backward start" in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["peak_allocated_bytes"] == 1_592_867_328 and d["fits"] is True and d["suggestion"] is None
    assert memory.summary(p).startswith("peak 1.48 GiB allocated (backward start), 2.13 GiB with overhead: fits")


def test_absurd_batch_gets_a_suggestion_that_fits(rtx2070, config40m):
    s = rtx2070.replace(train__batch_size=4096)
    p = memory.plan(s, config40m)
    assert p.fits is False and p.total_bytes > 100 * GIB
    sug = p.suggestion
    assert sug is not None
    assert sug.tokens_per_step == p.tokens_per_step == 4096 * 512  # tokens per optimizer step kept
    assert (sug.batch_size, sug.grad_accum, sug.block_size, sug.activation_checkpointing) == (32, 128, 512, True)
    assert sug.total_bytes <= 8 * GIB
    again = memory.plan(s.replace(train__batch_size=sug.batch_size, train__grad_accum=sug.grad_accum), config40m)
    assert again.fits and again.total_bytes == sug.total_bytes
    assert sug.flags == ("--set train.batch_size=32 --set train.grad_accum=128 --set train.block_size=512 "
                         "--set train.activation_checkpointing=true")
    assert "keeps 2,097,152 tokens per step" in sug.reason


def test_suggestion_ranking_and_shorter_blocks_last(rtx2070, config40m):
    # no checkpointing, batch 48: batch 16 x 3 without checkpointing keeps the GPU busy
    # (8,192 tokens a micro-step), so it beats batch 24 x 2 with recompute
    s = rtx2070.replace(train__batch_size=48, train__activation_checkpointing=False)
    p = memory.plan(s, config40m)
    assert p.fits is False
    sug = p.suggestion
    assert (sug.batch_size, sug.grad_accum, sug.block_size, sug.activation_checkpointing) == (16, 3, 512, False)
    # a budget that not even batch 1 x 512 fits: the block is halved
    tight = memory.plan(rtx2070, config40m, budget_bytes=int(1.2 * GIB))
    assert tight.fits is False
    assert (tight.suggestion.batch_size, tight.suggestion.grad_accum, tight.suggestion.block_size) == (1, 12, 256)
    # nothing fits: no suggestion, and the table says so
    hopeless = memory.plan(rtx2070, config40m, budget_bytes=GIB)  # 0.5 GiB context + 0.3 weights and state
    assert hopeless.suggestion is None and "no batch, block or checkpointing setting fits" in hopeless.render().caption


def test_unknown_budget_and_cpu_defaults(config40m):
    import torch

    a100 = load_settings(profile="a100", env={})
    p = memory.plan(a100, config40m, "cuda")
    if not torch.cuda.is_available():
        assert p.budget_bytes is None and p.fits is None and "no CUDA device" in p.budget_source
    assert p.precision == "bf16" and any("torch.compile" in n for n in p.notes)
    cpu = memory.plan(load_settings(profile="cpu", env={}), build_config("cpu-3m", 4096), "cpu")
    assert cpu.precision == "fp32" and cpu.overhead == {"process": GIB} and cpu.fits is True


# ------------------------------------------------------- checked against torch on CPU


def _saved_bytes(amp: bool, window: int | None, attention: str = "sdpa") -> tuple[int, object]:
    """Bytes of the unique storages one MistralDecoderLayer saves for backward."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from tinystory.model import build_model

    cfg = build_config("tiny", vocab_size=512)  # hidden 64, 4 heads, MLP 192
    cfg.sliding_window = window
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    model = build_model(cfg).model
    B, T = 2, 24
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(T)[None]
    make = create_causal_mask if window is None else create_sliding_window_causal_mask
    mask = make(config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    cos_sin = model.rotary_emb(x, position_ids=pos)
    seen: dict[int, int] = {}

    def pack(t):  # type: ignore[no-untyped-def]
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model.layers[0](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return sum(seen.values()), cfg


@pytest.mark.parametrize("amp, window, attention", [
    (False, None, "sdpa"), (True, None, "sdpa"), (True, 16, "sdpa"),
    (False, None, "eager"), (True, None, "eager"), (True, 16, "eager"),
])
def test_layer_saved_tensors_match_torch(amp, window, attention):
    measured, cfg = _saved_bytes(amp, window, attention)
    s = memory._Shape.of(cfg, 2, 24)
    c = 2 if amp else 4
    mm = sum(s.layer_matrices())
    # besides activations the layer saves its matmul weights (fp32 params, or autocast's
    # bf16 copies), its two RMSNorm weights and the shared fp32 rope cos/sin (1, T, 16)
    weights = c * mm + 2 * 4 * 64 + 2 * 4 * 24 * 16
    assert measured == memory._layer_saved(s, 4, c, amp) + weights
    assert s.mask == (window is not None)


def _step_peak(cfg, B: int, T: int, amp: bool, ckpt: bool) -> int:
    """Peak bytes allocated during one training step beyond what lived before it (CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tinystory.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    if ckpt:
        model.config.use_cache = False
        model.activation_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (B, T))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("V, B, amp, ckpt, attention, low, high", [
    (2048, 4, True, False, "sdpa", 0.99, 1.01),  # logits-bound (the real presets): exact
    (2048, 4, False, True, "sdpa", 0.99, 1.01),
    (256, 8, True, True, "sdpa", 1.0, 1.12),  # layer-bound backward with checkpointing: a little over
    (2048, 4, True, False, "eager", 0.99, 1.01),  # the cpu profile's attention
    (256, 8, True, False, "eager", 0.97, 1.03),  # layer-bound: the attention probabilities count
])
def test_step_peak_matches_torch(V, B, amp, ckpt, attention, low, high):
    cfg = build_config("tiny", vocab_size=V)
    cfg._attn_implementation = attention
    T = 128
    s = load_settings(profile="tiny", env={}).replace(
        train__batch_size=B, train__block_size=T, train__activation_checkpointing=ckpt,
        train__precision="bf16" if amp else "fp32", train__optimizer="adamw_torch", train__attention=attention)
    p = memory.plan(s, cfg, "cpu", budget_bytes=GIB)
    before_step = p.components["weights"] + p.components["optimizer_state"] + 2 * 8 * B * T  # + ids
    planned = p.peak_allocated_bytes - before_step
    ratio = planned / _step_peak(cfg, B, T, amp, ckpt)
    assert low <= ratio <= high
