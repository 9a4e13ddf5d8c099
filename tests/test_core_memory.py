"""The memory plan's arithmetic on a small model worked out by hand: grouped-query
attention, an explicit head_dim, an untied head and a sliding window shorter than the
block; each optimizer, device and budget source; the suggestion search; the rendered
table (issue #37's mutants). tests/test_memory.py holds the 40M figures and the checks
against torch."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

from rich.console import Console

from tinystory import memory
from tinystory.settings import Settings

GIB, MIB = 2**30, 2**20

# V 1000, hidden 64, MLP 128, 2 layers, 4 query heads and 2 kv heads of 32 (not 64 / 4),
# untied head, window 16 < block 32
CFG = SimpleNamespace(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                      sliding_window=16, _attn_implementation="sdpa", hidden_act="gelu_pytorch_tanh")
PARAMS = 1000 * 64 * 2 + 2 * (64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 128 + 2 * 64) + 64
MATS = [64 * 128, 64 * 64, 64 * 64, 128 * 64, 64 * 128, 64 * 128, 128 * 64]  # q k v o gate up down
B, T, BTH = 2, 32, 2 * 32 * 64


def shape(**change) -> memory._Shape:
    return memory._Shape.of(SimpleNamespace(**{**vars(CFG), **change}), B, T)


def train(**values) -> Settings:
    """Default settings with these train values, set as a flag would."""
    return Settings().replace(**{f"train__{k}": v for k, v in values.items()})


def test_shape_of_the_config():
    s = shape()
    assert (s.B, s.T, s.V, s.h, s.inter, s.layers, s.heads, s.qd, s.kvd) == (2, 32, 1000, 64, 128, 2, 4, 128, 64)
    assert (s.tied, s.window, s.eager, s.mask) == (False, 16, False, True)
    assert s.layer_matrices() == MATS and sum(MATS) == 49152
    assert PARAMS == 226_624 == memory.count_parameters(CFG)
    no_head_dim = shape(head_dim=None, tie_word_embeddings=1, sliding_window=32, _attn_implementation="eager")
    assert (no_head_dim.qd, no_head_dim.kvd, no_head_dim.tied, no_head_dim.eager) == (64, 32, True, True)
    assert type(no_head_dim.qd) is int and type(no_head_dim.kvd) is int  # 64.0 would reach --dry-run --json
    assert no_head_dim.mask is False  # window = block: sdpa's causal path, no mask
    assert shape(sliding_window=None).mask is False and shape(sliding_window=31).mask is True
    bare = SimpleNamespace(**{k: v for k, v in vars(CFG).items() if k not in ("head_dim", "sliding_window",
                                                                               "_attn_implementation")})
    s = memory._Shape.of(bare, 1, 8)
    assert (s.qd, s.window, s.eager, s.mask) == (64, None, False, False)


def test_one_layer_saves_by_hand():
    s = shape()
    common = 4 * 4 * BTH + 1024 + 512  # input, mid residual, two norm products (fp32); logsumexp; two rsqrt
    # autocast: 5 casts of the norm outputs, q k v out (2 x 128 + 2 x 64 wide), 4 MLP tensors, the mask in fp16
    amp = common + 5 * 2 * BTH + 2 * B * T * 384 + 4 * 2 * B * T * 128 + 2 * B * T * T
    assert memory._layer_saved(s, 4, 2, True) == amp == 226_816
    fp32 = common + 2 * 4 * BTH + 4 * B * T * 384 + 4 * 4 * B * T * 128 + 4 * B * T * T
    assert memory._layer_saved(s, 4, 4, False) == fp32 == 337_408
    e = shape(_attn_implementation="eager")  # the fp32 softmax (+ its fp16 copy); no logsumexp, no mask
    assert memory._layer_saved(e, 4, 2, True) == amp - 1024 - 2 * B * T * T + (4 + 2) * B * 4 * T * T == 270_848
    assert memory._layer_saved(e, 4, 4, False) == fp32 - 1024 - 4 * B * T * T + 4 * B * 4 * T * T == 360_960
    assert memory._head_saved(s, 4, 2) == (4 + 4 + 2) * BTH + 4 * B * T == 41_216
    assert memory._batch_bytes(s) == 2 * 8 * B * T + B * T * T + 2 * 4 * T * 32 == 11_264
    assert memory._batch_bytes(shape(sliding_window=None)) == 11_264 - B * T * T


def test_optimizer_state_and_step_temporaries():
    s = shape()
    norms, embed, head = 5 * 64, 1000 * 64, 1000 * 64
    assert memory._optimizer_state(s, "adamw_torch") == 8 * (norms + embed + 2 * sum(MATS) + head) == 8 * PARAMS
    assert memory._optimizer_state(s, "adamw_torch_fused") == 8 * PARAMS
    # 8-bit: every matrix here has >= 4096 values (k and v exactly 4096): a byte per state and an
    # fp32 absmax per 256; the embedding and the norms stay fp32; plus the two quantization maps
    eight = 2 * (5 * (2 * 8192 + 8 * 32) + 2 * (2 * 4096 + 8 * 16)) + 2 * 64000 + 8 * math.ceil(64000 / 256)
    assert memory._optimizer_state(s, "adamw_bnb_8bit") == eight + 8 * (norms + embed) + 2048 == 846_288
    # tied, and an MLP of 65 (64 x 65 = 4160 values: 16.25 blocks of 256 -> 17); k, v of 64 x 32 = 2048 < 4096
    t = shape(tie_word_embeddings=True, num_key_value_heads=1, intermediate_size=65)
    mats = [8192, 2048, 2048, 8192, 4160, 4160, 4160]
    big = 2 * (2 * 8192 + 8 * 32) + 3 * (2 * 4160 + 8 * 17)
    assert t.layer_matrices() == mats
    assert memory._optimizer_state(t, "adamw_bnb_8bit") == 2 * big + 8 * (norms + embed + 2 * 2 * 2048) + 2048
    assert memory._optimizer_state(t, "adamw_torch") == 8 * (norms + embed + 2 * sum(mats))
    assert memory._optimizer_transient(s, "adamw_torch", "cuda", PARAMS) == 4 * PARAMS
    assert memory._optimizer_transient(s, "adamw_torch", "cpu", PARAMS) == 8 * 64000  # the embedding is largest
    assert memory._optimizer_transient(shape(vocab_size=10), "adamw_torch", "mps", 999) == 8 * 8192
    assert memory._optimizer_transient(s, "adamw_torch_fused", "cuda", PARAMS) == 0
    assert memory._optimizer_transient(s, "adamw_bnb_8bit", "cuda", PARAMS) == 0
    # Muon: one momentum per block matrix; AdamW's two states on the embedding, head and norms
    assert memory._optimizer_state(s, "muon") == 4 * 2 * sum(MATS) + 8 * (norms + embed + head) == 1_419_776
    assert memory._optimizer_state(t, "muon") == 4 * 2 * sum(mats) + 8 * (norms + embed)
    # its step: AdamW over the embedding + head (CPU: single-tensor; CUDA: foreach, norms too) ...
    assert memory._optimizer_transient(s, "muon", "cpu", PARAMS) == 2 * 4 * (embed + head) == 1_024_000
    assert memory._optimizer_transient(s, "muon", "cuda", PARAMS) == 4 * (embed + head + norms) == 513_280
    # ... or Newton-Schulz over the largest matrix (128 x 64): update, x, new x and two 64 x 64 Grams
    assert memory._optimizer_transient(shape(vocab_size=10), "muon", "cpu", 999) == 4 * (3 * 8192 + 2 * 64 * 64)


def test_backward_through_the_layers():
    s, layer = shape(), 226_816
    grads_last = 4 * (PARAMS - 2 * (49152 + 128) + 49152 + 128)  # embedding, head, final norm + the last layer
    transient = 2 * 2 * B * T * 128 + 2 * 4 * BTH
    got = memory._backward_layers(s, layer, p=4, c=2, amp=True, ckpt=False, accum=1, params=PARAMS)
    assert got == {"activations": 2 * layer, "half_weights": 2 * 2 * 49152, "gradients": grads_last,
                   "backward_transient": transient}
    assert grads_last == 709_376 and transient == 65_536
    # checkpointing: the first layer (all gradients) outweighs the last one
    got = memory._backward_layers(s, layer, p=4, c=2, amp=True, ckpt=True, accum=1, params=PARAMS)
    assert got == {"activations": layer, "half_weights": 2 * 49152, "gradients": 4 * PARAMS,
                   "backward_transient": transient}
    # a batch of 64: one layer input (4 x 64 x 32 x 64 bytes) outweighs a layer's gradients (4 x 49,280)
    big = memory._Shape.of(CFG, 64, 32)
    last = memory._backward_layers(big, 10, p=4, c=2, amp=True, ckpt=True, accum=1, params=PARAMS)
    assert last == {"activations": 4 * 64 * 32 * 64 + 10, "half_weights": 2 * 49152,
                    "gradients": 4 * (PARAMS - 49280),
                    "backward_transient": 2 * 2 * 64 * 32 * 128 + 2 * 4 * 64 * 32 * 64}
    got = memory._backward_layers(s, layer, p=4, c=4, amp=False, ckpt=False, accum=2, params=PARAMS)
    assert got == {"activations": 2 * layer, "half_weights": 0, "gradients": 4 * PARAMS,
                   "backward_transient": 4 * B * T * 128 * 2 + 2 * 4 * BTH}


def test_phases_of_an_fp16_step_with_checkpointing():
    s = shape()
    parts, phases = memory._phases(s, amp=True, ckpt=True, accum=1, params=PARAMS, optimizer="adamw_torch",
                                   device="cuda")
    layer, head, half_all = 226_816, 41_216, 2 * (2 * 49152 + 64000)
    assert parts == {"weights": 4 * PARAMS, "half_weights": half_all, "gradients": 4 * PARAMS,
                     "optimizer_state": 8 * PARAMS, "optimizer_transient": 4 * PARAMS,
                     "activations_full": 2 * layer + head, "activations_checkpointed": 2 * 4 * BTH + head + layer,
                     "logits": 12 * B * T * 1000, "batch": 11_264}
    base = {"weights": 4 * PARAMS, "optimizer_state": 8 * PARAMS, "batch": 11_264}
    acts = 2 * 4 * BTH + head
    assert phases["forward end"] == {**base, "gradients": 0, "half_weights": half_all, "activations": acts,
                                     "logits": 10 * B * T * 1000}
    assert phases["backward start"] == {**base, "gradients": 0, "half_weights": 2 * 64000, "activations": acts,
                                        "logits": 12 * B * T * 1000}
    assert phases["backward layers"] == {**base, **memory._backward_layers(
        s, layer, p=4, c=2, amp=True, ckpt=True, accum=1, params=PARAMS)}
    assert phases["embedding backward"] == {**base, "gradients": 4 * PARAMS, "backward_transient": 4 * 64000}
    assert phases["optimizer step"] == {**base, "gradients": 4 * PARAMS, "optimizer_transient": 4 * PARAMS}


def test_phases_of_an_fp32_step_with_accumulation():
    s = shape()
    parts, phases = memory._phases(s, amp=False, ckpt=False, accum=3, params=PARAMS, optimizer="adamw_torch_fused",
                                   device="cpu")
    full = 2 * 337_408 + (4 + 4 + 4) * BTH + 4 * B * T
    assert parts["half_weights"] == 0 and parts["optimizer_transient"] == 0 and parts["activations_full"] == full
    assert phases["forward end"]["logits"] == 8 * B * T * 1000 and phases["forward end"]["gradients"] == 4 * PARAMS
    assert phases["forward end"]["activations"] == full and phases["forward end"]["half_weights"] == 0
    assert phases["backward start"]["half_weights"] == 0 and phases["backward start"]["gradients"] == 4 * PARAMS
    assert phases["backward start"]["activations"] == full


def test_phases_of_an_fp32_step_with_checkpointing():
    # no autocast: no half-precision copies at any moment, the lm_head's included
    p = memory.plan(train(batch_size=60, block_size=32, precision="fp32", activation_checkpointing=True), CFG, "cuda",
                    budget_bytes=BUDGET)
    assert p.peak_phase == "backward start" and p.components["half_weights"] == 0
    assert all(phase.get("half_weights", 0) == 0 for phase in p.phases.values())
    assert p.peak_allocated_bytes == sum(p.phases["backward start"].values())


# ---------------------------------------------------------------------------- plan


def test_plan_on_a_cpu_with_a_budget():
    p = memory.plan(train(batch_size=2, block_size=32, precision="fp32", optimizer="adamw_torch",
                          memory_budget_gb=0.5), CFG, "cpu")
    assert (p.device, p.precision, p.optimizer, p.parameters, p.vocab_size) == ("cpu", "fp32", "adamw_torch",
                                                                                 PARAMS, 1000)
    assert (p.batch_size, p.grad_accum, p.block_size, p.activation_checkpointing) == (2, 1, 32, False)
    parts, phases = memory._phases(shape(), amp=False, ckpt=False, accum=1, params=PARAMS, optimizer="adamw_torch",
                                   device="cpu")
    assert p.components == parts and p.phases == phases
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    assert p.peak_phase == peak == "backward start" and p.peak_allocated_bytes == sum(phases[peak].values())
    assert p.overhead == {"process": GIB} and p.total_bytes == p.peak_allocated_bytes + GIB
    assert p.budget_bytes == GIB // 2 and p.budget_source == "train.memory_budget_gb = 0.5 GiB (code)"
    assert p.fits is False and p.suggestion is None  # the process alone is 1 GiB: nothing fits
    assert p.notes == ()
    roomy = memory.plan(train(batch_size=2, block_size=32, precision="fp32"), CFG, "cpu", budget_bytes=2 * GIB)
    assert roomy.fits is True and roomy.budget_source == "given" and roomy.budget_bytes == 2 * GIB


def test_plan_on_cuda_adds_slack_and_the_context():
    p = memory.plan(train(batch_size=2, block_size=32, precision="bf16", optimizer="adamw_bnb_8bit"), CFG,
                    "cuda", budget_bytes=GIB)
    allocated = p.peak_allocated_bytes
    assert p.overhead == {"allocator_slack": int(0.1 * allocated), "cuda_context": 512 * MIB}
    assert p.optimizer == "adamw_bnb_8bit" and p.precision == "bf16"
    assert p.components["optimizer_state"] == 846_288 and p.fits is True
    assert p.total_bytes == allocated + int(0.1 * allocated) + 512 * MIB


def test_precision_auto_and_what_the_probe_chose():
    s = train(batch_size=2, block_size=32, precision="auto")
    cuda = memory.plan(s, CFG, "cuda", budget_bytes=GIB)
    assert cuda.precision == "fp16" and cuda.notes == (
        "precision auto counted as fp16 (fp16 and bf16 need the same memory)",)
    cpu = memory.plan(s, CFG, "cpu", budget_bytes=GIB)
    assert cpu.precision == "fp32" and cpu.notes == ("precision auto counted as fp32 (the larger of fp32/bf16)",)
    assert memory.plan(s, CFG, "mps", budget_bytes=GIB).precision == "fp32"
    probed = memory.plan(s, CFG, "cpu", precision="bf16", budget_bytes=GIB)
    assert probed.precision == "bf16" and probed.notes == ()
    assert probed.components["half_weights"] == 2 * (2 * 49152 + 64000)
    assert memory.plan(train(precision="fp16"), CFG, "cuda", budget_bytes=GIB).notes == ()


def test_notes_for_compile_and_an_unknown_activation():
    s = train(batch_size=1, block_size=32, precision="fp32", torch_compile=True)
    odd = SimpleNamespace(**{**vars(CFG), "hidden_act": "swish"})
    assert memory.plan(s, odd, "cpu", budget_bytes=GIB).notes == (
        "eager estimate: torch.compile fuses kernels and usually saves less",
        "activation swish may save more than one tensor (counted as one)")
    for act in ("gelu_pytorch_tanh", "silu", "gelu", "relu"):
        assert memory.plan(train(precision="fp32"), SimpleNamespace(**{**vars(CFG), "hidden_act": act}), "cpu",
                           budget_bytes=GIB).notes == ()
    # a config that names no activation has transformers' default, silu: no note, no error
    no_act = SimpleNamespace(**{k: v for k, v in vars(CFG).items() if k != "hidden_act"})
    assert memory.plan(train(precision="fp32"), no_act, "cpu", budget_bytes=GIB).notes == ()


def test_the_attention_setting_is_what_is_planned():
    sdpa = memory.plan(train(batch_size=2, block_size=32, precision="fp32"), CFG, "cpu", budget_bytes=GIB)
    eager = memory.plan(train(batch_size=2, block_size=32, precision="fp32", attention="eager"), CFG, "cpu",
                        budget_bytes=GIB)
    assert CFG._attn_implementation == "sdpa"  # the caller's config is left alone
    assert eager.components["activations_full"] - sdpa.components["activations_full"] == 2 * (360_960 - 337_408)
    as_eager = SimpleNamespace(**{**vars(CFG), "_attn_implementation": "eager"})
    again = memory.plan(train(batch_size=2, block_size=32, precision="fp32", attention="eager"), as_eager, "cpu",
                        budget_bytes=GIB)
    assert again.components == eager.components
    # the setting wins over what the config says, and a config that says nothing counts as sdpa
    sdpa_again = memory.plan(train(batch_size=2, block_size=32, precision="fp32"), as_eager, "cpu", budget_bytes=GIB)
    assert sdpa_again.components == sdpa.components and as_eager._attn_implementation == "eager"
    silent = SimpleNamespace(**{k: v for k, v in vars(CFG).items() if k != "_attn_implementation"})
    for attention, expected in (("sdpa", sdpa), ("eager", eager)):
        got = memory.plan(train(batch_size=2, block_size=32, precision="fp32", attention=attention), silent, "cpu",
                          budget_bytes=GIB)
        assert got.components == expected.components


def test_8bit_adamw_only_where_cuda_is():
    s = train(batch_size=1, block_size=32, precision="fp32", optimizer="adamw_bnb_8bit")
    for device in ("cpu", "mps"):
        p = memory.plan(s, CFG, device, budget_bytes=GIB)
        assert p.optimizer == "adamw_torch" and p.components["optimizer_state"] == 8 * PARAMS
    assert memory.plan(s, CFG, "cuda", budget_bytes=GIB).optimizer == "adamw_bnb_8bit"


# --------------------------------------------------------------------------- budgets


def test_budget_sources(monkeypatch):
    s = Settings()
    assert memory._budget(s, "cuda", 123) == (123, "given")
    assert memory._budget(train(memory_budget_gb=1.5), "cpu", None) == (
        int(1.5 * GIB), "train.memory_budget_gb = 1.5 GiB (code)")
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: False)
    assert memory._budget(s, "cuda", None) == (None, "unknown: no CUDA device here (set train.memory_budget_gb)")
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory.torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(memory.torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=8 * GIB + i, name=f"GPU {i}"))
    assert memory._budget(s, "cuda", None) == (8 * GIB + 3, "GPU 3")
    monkeypatch.setattr(memory, "ram_bytes", lambda: 16 * GIB)
    monkeypatch.setattr(memory, "mps_recommended_bytes", lambda: 11 * GIB)
    assert memory._budget(s, "mps", None) == (
        11 * GIB, "the Apple GPU's recommended working set, 69% of this Mac's 16 GiB unified memory")
    monkeypatch.setattr(memory, "mps_recommended_bytes", lambda: 12 * GIB)
    assert memory._budget(s, "mps", None)[1] == ("the Apple GPU's recommended working set, 75% of this Mac's 16 GiB "
                                                 "unified memory")
    monkeypatch.setattr(memory, "mps_recommended_bytes", lambda: 0)
    assert memory._budget(s, "mps", None) == (
        12 * GIB, "75% of this Mac's 16 GiB unified memory (what Metal recommends on most Apple Silicon)")
    assert memory._budget(s, "cpu", None) == (16 * GIB, "this machine's RAM")


def test_ram_and_metal():
    import psutil

    assert memory.ram_bytes() == psutil.virtual_memory().total > GIB
    assert memory.mps_recommended_bytes() >= 0


def test_metal_answers(monkeypatch):
    monkeypatch.setattr(memory.torch.mps, "recommended_max_memory", lambda: 7 * GIB, raising=False)
    assert memory.mps_recommended_bytes() == 7 * GIB

    def no_mps():
        raise RuntimeError("MPS backend is not available")

    monkeypatch.setattr(memory.torch.mps, "recommended_max_memory", no_mps, raising=False)
    assert memory.mps_recommended_bytes() == 0
    monkeypatch.delattr(memory.torch.mps, "recommended_max_memory", raising=False)
    assert memory.mps_recommended_bytes() == 0


# ------------------------------------------------------------------------ suggestions


def fits_at(budget: int, B: int, A: int, T: int, ckpt: bool) -> bool:
    return memory.plan(train(batch_size=B, grad_accum=A, block_size=T, activation_checkpointing=ckpt,
                             precision="fp16"), CFG, "cuda", budget_bytes=budget).fits


BUDGET = 512 * MIB + 20_000_000  # the CUDA context and 20 MB: batch 60 x 32 needs 45 MB at its peak


def largest_batch(tokens: int, T: int, ckpt: bool, limit: int) -> int:
    """The largest micro-batch that fits at block T, accumulating to `tokens` (a plain scan)."""
    return max(b for b in range(1, limit + 1) if fits_at(BUDGET, b, math.ceil(tokens / (b * T)), T, ckpt))


def test_suggestion_keeps_tokens_per_step_with_an_exact_divisor():
    p = memory.plan(train(batch_size=60, block_size=32, precision="fp16"), CFG, "cuda", budget_bytes=BUDGET)
    assert p.fits is False
    sug = p.suggestion
    assert sug is not None and sug.tokens_per_step == p.tokens_per_step == 60 * 32
    # exact tokens either way (20 x 3 without checkpointing, 30 x 2 with it): the larger batch wins
    assert (sug.batch_size, sug.grad_accum, sug.block_size, sug.activation_checkpointing) == (30, 2, 32, True)
    assert fits_at(BUDGET, 20, 3, 32, False) and not fits_at(BUDGET, 30, 2, 32, False)
    assert not fits_at(BUDGET, 60, 1, 32, True)
    assert sug.total_bytes == memory.plan(train(batch_size=30, grad_accum=2, block_size=32, precision="fp16",
                                                activation_checkpointing=True), CFG, "cuda",
                                          budget_bytes=BUDGET).total_bytes
    assert sug.reason == (f"batch 30 x accumulation 2 x block 32 with activation checkpointing needs "
                          f"{memory.fmt_bytes(sug.total_bytes)} and keeps 1,920 tokens per step")
    assert sug.flags == ("--set train.batch_size=30 --set train.grad_accum=2 --set train.block_size=32 "
                         "--set train.activation_checkpointing=true")
    f = memory.Suggestion(2, 1, 64, False, 0, 128, "").flags
    assert f.endswith("--set train.block_size=64 --set train.activation_checkpointing=false")


def test_options_at_a_block():
    args = dict(config=CFG, precision="fp16", optimizer="adamw_torch", device="cuda", budget=BUDGET,
                budget_source="given", notes=())
    largest = largest_batch(1920, 32, False, 60)
    assert largest not in (20, 30, 60) and 20 < largest < 30
    options = memory._options_at(60 * 32, 32, False, 60, args)
    assert [(o.batch_size, o.grad_accum) for o in options] == [(largest, math.ceil(60 / largest)), (20, 3)]
    assert all(o.block_size == 32 and not o.activation_checkpointing for o in options)
    assert [o.tokens_per_step for o in options] == [largest * math.ceil(60 / largest) * 32, 1920]
    assert [o.total_bytes for o in options] == [
        memory.plan(train(batch_size=b, grad_accum=a, block_size=32, precision="fp16"), CFG, "cuda",
                    budget_bytes=BUDGET).total_bytes for b, a in ((largest, math.ceil(60 / largest)), (20, 3))]
    with_ckpt = memory._options_at(60 * 32, 32, True, 60, args)
    assert largest_batch(1920, 32, True, 60) == 34  # 34 x 2 blocks: 2,176 tokens; 30 x 2 is exact
    assert [(o.batch_size, o.grad_accum, o.tokens_per_step) for o in with_ckpt] == [(34, 2, 2176), (30, 2, 1920)]
    # 1,000 tokens are no whole number of blocks of 32: only the largest batch, accumulated to cover them
    only = memory._options_at(1000, 32, False, 60, args)
    assert [o.batch_size for o in only] == [largest_batch(1000, 32, False, 60)]
    assert memory._options_at(1920, 32, False, 60, {**args, "budget": 100}) == []  # not even batch 1
    assert [o.batch_size for o in memory._options_at(64, 32, False, 2, args)] == [2]  # capped at the asked batch
    assert [o.batch_size for o in memory._options_at(96, 32, False, 3, args)] == [3]


def test_options_at_a_block_keep_the_asked_batch_when_checkpointing_is_enough():
    # batch 60 x 32 does not fit without checkpointing but does with it: no accumulation needed
    args = dict(config=CFG, precision="fp16", optimizer="adamw_torch", device="cuda", budget_source="given", notes=())
    need = memory.plan(train(batch_size=60, block_size=32, precision="fp16", activation_checkpointing=True), CFG,
                       "cuda", budget_bytes=BUDGET).total_bytes
    options = memory._options_at(1920, 32, True, 60, {**args, "budget": need})
    assert [(o.batch_size, o.grad_accum, o.tokens_per_step) for o in options] == [(60, 1, 1920)]


def test_options_at_a_block_find_the_largest_batch_at_every_budget():
    # over budgets from none to batch ~40: the batch found fits and the next one does not
    # (below the asked batch, memory grows with the batch; the asked one is tried first)
    args = dict(config=CFG, precision="fp16", optimizer="adamw_torch", device="cuda", budget_source="given", notes=())
    found = []
    for extra in range(4_000_000, 20_000_001, 2_000_000):
        budget = 512 * MIB + extra
        options = memory._options_at(1920, 32, False, 60, {**args, "budget": budget})
        if not options:
            assert not fits_at(budget, 1, 60, 32, False), extra
            continue
        b = options[0].batch_size
        found.append(b)
        assert fits_at(budget, b, math.ceil(60 / b), 32, False), extra
        assert not fits_at(budget, b + 1, math.ceil(60 / (b + 1)), 32, False), extra
    assert len(found) == 8 and found == sorted(set(found))  # eight budgets where some batch fits, all different


def test_blocks_are_halved_down_to_64():
    # CUDA context + 5.5 MB: only batch 1 at block 64, with checkpointing, fits
    tight = 512 * MIB + 5_500_000
    p = memory.plan(train(batch_size=4, block_size=256, precision="fp16"), CFG, "cuda", budget_bytes=tight)
    assert p.fits is False and p.suggestion is not None
    assert (p.suggestion.block_size, p.suggestion.batch_size, p.suggestion.grad_accum) == (64, 1, 16)
    assert p.suggestion.activation_checkpointing is True
    assert p.suggestion.flags == ("--set train.batch_size=1 --set train.grad_accum=16 --set train.block_size=64 "
                                  "--set train.activation_checkpointing=true")  # a whole number of tokens
    assert not fits_at(tight, 1, 8, 128, True) and fits_at(tight, 1, 16, 64, True)
    assert p.suggestion.reason.endswith(" with activation checkpointing needs "
                                        f"{memory.fmt_bytes(p.suggestion.total_bytes)} and keeps 1,024 tokens per step")
    roomier = memory.plan(train(batch_size=4, block_size=256, precision="fp16"), CFG, "cuda",
                          budget_bytes=512 * MIB + 6_500_000)
    assert (roomier.suggestion.block_size, roomier.suggestion.grad_accum) == (128, 8)  # the longer block first
    none = memory.plan(train(batch_size=4, block_size=100, precision="fp16"), CFG, "cuda", budget_bytes=tight)
    assert none.fits is False and none.suggestion is None  # 100 cannot be halved to 64 or more
    assert memory.plan(train(batch_size=4, block_size=256, precision="fp16"), CFG, "cuda",
                       budget_bytes=512 * MIB + 5_000_000).suggestion is None


def test_rank_orders_exact_tokens_then_busy_then_as_asked_then_batch():
    p = memory.plan(train(batch_size=60, block_size=32, precision="fp16"), CFG, "cuda", budget_bytes=BUDGET)

    def o(B: int, A: int, T: int, ckpt: bool) -> memory.Suggestion:
        return memory.Suggestion(B, A, T, ckpt, 0, B * A * T, "")

    assert memory._rank(o(20, 3, 32, False), p) == (True, False, False, 20)
    assert memory._rank(o(25, 3, 32, False), p) == (False, False, False, 25)
    assert memory._rank(o(256, 1, 32, True), p) == (False, True, False, 256)  # 8,192 tokens: busy
    assert memory._rank(o(256, 1, 32, False), p) == (False, True, True, 256)
    assert memory._rank(o(255, 1, 32, False), p) == (False, False, False, 255)


def test_reason_when_the_tokens_change():
    p = memory.plan(train(batch_size=3, block_size=32, precision="fp16"), CFG, "cuda", budget_bytes=GIB)
    s = memory.Suggestion(2, 1, 32, False, 5 * MIB, 64, "")
    assert memory._reason(p, s) == ("batch 2 x accumulation 1 x block 32 needs 5.0 MiB and gives 64 instead of 96 "
                                    "tokens per step")


# ------------------------------------------------------------------------- rendering


def test_fmt_bytes():
    assert memory.fmt_bytes(None) == "?"
    assert memory.fmt_bytes(GIB) == "1.00 GiB" and memory.fmt_bytes(GIB - 1) == "1024.0 MiB"
    assert memory.fmt_bytes(3 * MIB // 2) == "1.5 MiB" and memory.fmt_bytes(5 * GIB // 2) == "2.50 GiB"


def render(p: memory.MemoryPlan) -> list[str]:
    console = Console(width=250, record=True)
    console.print(p.render())
    lines = [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in console.export_text().splitlines()]
    return [line for line in lines if line and not set(line) <= set("┏━┳┓┡╇┩├─┼┤└┴┘")]


def test_summary_and_table_of_a_plan_that_does_not_fit():
    p = memory.plan(train(batch_size=60, block_size=32, precision="fp16", activation_checkpointing=False,
                          torch_compile=True), CFG, "cuda", budget_bytes=BUDGET)
    f = memory.fmt_bytes
    assert memory.summary(p) == (f"peak {f(p.peak_allocated_bytes)} allocated ({p.peak_phase}), "
                                 f"{f(p.total_bytes)} with overhead: does NOT fit {f(BUDGET)} (given)")
    lines = render(p)
    at = p.phases[p.peak_phase]
    assert lines[0] == "memory plan (cuda, fp16): batch 60 x accumulation 1 x block 32 = 1,920 tokens per step"
    assert lines[1] == "part at peak full size note"
    assert lines[2] == f"weights (fp32 master) {f(at['weights'])} {f(4 * PARAMS)} 226,624 params x 4 B"
    assert lines[3] == (f"fp16 weight copies (autocast) {f(at.get('half_weights'))} {f(p.components['half_weights'])} "
                        "matmul weights cast per step") or "-" in lines[3]
    assert "logits + loss" in " ".join(lines) and "60x32x1,000 logits x 12 B" in " ".join(lines)
    assert f"activations, checkpointing off {f(at['activations']) if 'activations' in at else '-'} " \
           f"{f(p.components['activations_full'])} used" in lines
    assert f"activations, checkpointing on - {f(p.components['activations_checkpointed'])}" in lines
    assert "batch tensors" in " ".join(lines) and "ids, labels, mask" in " ".join(lines)
    assert f"peak allocated {f(p.peak_allocated_bytes)} at {p.peak_phase}" in lines
    assert f"allocator slack (10%) {f(p.overhead['allocator_slack'])} stated constant" in lines
    assert "CUDA context 512.0 MiB stated constant" in lines
    assert f"total {f(p.total_bytes)}" in lines and f"budget {f(BUDGET)} does not fit: given" in lines
    caption = " ".join(lines[lines.index(f"budget {f(BUDGET)} does not fit: given") + 1:])
    assert caption == ("eager estimate: torch.compile fuses kernels and usually saves less "
                       f"suggestion: {p.suggestion.reason}: {p.suggestion.flags}")


def test_table_of_a_plan_that_fits_and_of_one_that_cannot():
    p = memory.plan(train(batch_size=2, block_size=32, precision="bf16", activation_checkpointing=True,
                          optimizer="adamw_torch_fused"), CFG, "cpu", budget_bytes=2 * GIB)
    lines = render(p)
    f = memory.fmt_bytes
    assert memory.summary(p).endswith("with overhead: fits 2.00 GiB (given)")
    assert lines[0] == "memory plan (cpu, bf16): batch 2 x accumulation 1 x block 32 = 64 tokens per step"
    assert any(line.startswith("bf16 weight copies (autocast)") for line in lines)
    assert any(line.startswith("optimizer state: fused AdamW") for line in lines)
    assert not any(line.startswith("optimizer step temporaries") for line in lines)  # fused: none
    assert f"activations, checkpointing on {f(p.phases[p.peak_phase].get('activations'))} " \
           f"{f(p.components['activations_checkpointed'])} used" in lines or \
        f"activations, checkpointing on - {f(p.components['activations_checkpointed'])} used" in lines
    assert "process (python, torch) 1.00 GiB stated constant" in lines
    assert "budget 2.00 GiB fits: given" in lines and lines[-1].startswith("budget")
    unknown = memory.plan(train(batch_size=2, block_size=32, precision="fp32"), CFG, "cpu", budget_bytes=GIB)
    unknown = memory.MemoryPlan(**{**unknown.__dict__, "budget_bytes": None, "budget_source": "unknown"})
    assert unknown.fits is None and memory.summary(unknown).endswith("with overhead: budget unknown for ? (unknown)")
    assert render(unknown)[-1] == "budget ? budget unknown: unknown"
    assert any(line.startswith("weights (fp32) ") for line in render(unknown))
    assert any(line.startswith("optimizer state: AdamW ") for line in render(unknown))
    hopeless = memory.plan(train(batch_size=2, block_size=32, precision="fp32", optimizer="adamw_bnb_8bit"), CFG,
                           "cuda", budget_bytes=100)
    assert hopeless.suggestion is None
    assert render(hopeless)[-1] == ("no batch, block or checkpointing setting fits: use a smaller preset or a "
                                    "larger device")
    assert any(line.startswith("optimizer state: 8-bit AdamW (bitsandbytes) ") for line in render(hopeless))


def test_to_dict():
    p = memory.plan(train(batch_size=60, block_size=32, precision="fp16"), CFG, "cuda", budget_bytes=BUDGET)
    d = p.to_dict()
    assert list(d) == ["device", "precision", "optimizer", "parameters", "batch_size", "grad_accum", "block_size",
                       "vocab_size", "activation_checkpointing", "components", "phases", "peak_phase", "overhead",
                       "budget_bytes", "budget_source", "tokens_per_step", "peak_allocated_bytes", "total_bytes",
                       "fits", "notes", "suggestion"]
    assert d["tokens_per_step"] == 1920 and d["fits"] is False and d["notes"] == []
    sizes = [*d["components"].values(), *d["overhead"].values(), d["peak_allocated_bytes"], d["total_bytes"],
             *(n for phase in d["phases"].values() for n in phase.values())]
    assert all(type(n) is int for n in sizes)  # bytes are whole: 20480.0 would be a wrong sum somewhere
    assert d["suggestion"] == {"batch_size": 30, "grad_accum": 2, "block_size": 32, "activation_checkpointing": True,
                               "total_bytes": p.suggestion.total_bytes, "tokens_per_step": 1920,
                               "reason": p.suggestion.reason, "flags": p.suggestion.flags}


def test_every_row_of_two_plans_exactly():
    # every part's label, both sizes and its note: what `train --dry-run` shows, row by row
    # (checked by hand: the parts at the peak add up to the peak allocated)
    cuda = memory.plan(train(batch_size=60, block_size=32, precision="fp16", activation_checkpointing=False,
                             torch_compile=True), CFG, "cuda", budget_bytes=BUDGET)
    assert render(cuda)[2:16] == [
        "weights (fp32 master) 0.9 MiB 0.9 MiB 226,624 params x 4 B",
        "fp16 weight copies (autocast) 0.3 MiB 0.3 MiB matmul weights cast per step",
        "gradients (fp32) - 0.9 MiB freed after each optimizer step",
        "optimizer state: AdamW 1.7 MiB 1.7 MiB",
        "optimizer step temporaries - 0.9 MiB",
        "activations, checkpointing on - 8.6 MiB",
        "activations, checkpointing off 14.2 MiB 14.2 MiB used",
        "logits + loss 22.0 MiB 22.0 MiB 60x32x1,000 logits x 12 B",
        "batch tensors 0.1 MiB 0.1 MiB ids, labels, mask",
        "peak allocated 39.1 MiB at backward start",
        "allocator slack (10%) 3.9 MiB stated constant",
        "CUDA context 512.0 MiB stated constant",
        "total 555.0 MiB",
        "budget 531.1 MiB does not fit: given",
    ]
    cpu = memory.plan(train(batch_size=2, block_size=32, precision="bf16", activation_checkpointing=True), CFG,
                      "cpu", budget_bytes=2 * GIB)
    assert render(cpu) == [
        "memory plan (cpu, bf16): batch 2 x accumulation 1 x block 32 = 64 tokens per step",
        "part at peak full size note",
        "weights (fp32 master) 0.9 MiB 0.9 MiB 226,624 params x 4 B",
        "bf16 weight copies (autocast) - 0.3 MiB matmul weights cast per step",
        "gradients (fp32) 0.9 MiB 0.9 MiB freed after each optimizer step",
        "optimizer state: AdamW 1.7 MiB 1.7 MiB",
        "optimizer step temporaries 0.5 MiB 0.5 MiB",
        "activations, checkpointing on - 0.3 MiB used",
        "activations, checkpointing off - 0.5 MiB",
        "logits + loss - 0.7 MiB 2x32x1,000 logits x 12 B",
        "batch tensors 0.0 MiB 0.0 MiB ids, labels, mask",
        "peak allocated 4.0 MiB at optimizer step",
        "process (python, torch) 1.00 GiB stated constant",
        "total 1.00 GiB",
        "budget 2.00 GiB fits: given",
    ]


def test_the_table_as_a_terminal_shows_it():
    # column by column, not only the words: a cell in the wrong column, a title or caption
    # centred, or a number not right-aligned shows here. A plan whose peak is in backward
    # through the layers (vocabulary 64), so the backward temporaries and the checkpointed
    # activations are at the peak; the parts at the peak add up to the peak allocated
    small = SimpleNamespace(**{**vars(CFG), "vocab_size": 64})
    p = memory.plan(train(batch_size=8, block_size=32, precision="bf16", activation_checkpointing=True), small,
                    "cuda", budget_bytes=BUDGET)
    assert p.peak_phase == "backward layers" and p.peak_allocated_bytes == sum(p.phases["backward layers"].values())
    console = Console(width=100, record=True, color_system=None)
    console.print(p.render())
    assert [line.rstrip() for line in console.export_text().splitlines()] == [
        "memory plan (cuda, bf16): batch 8 x accumulation 1 x block 32 = 256 tokens per step",
        "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓",
        "┃ part                           ┃   at peak ┃ full size ┃ note                            ┃",
        "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┩",
        "│ weights (fp32 master)          │   0.4 MiB │   0.4 MiB │ 106,816 params x 4 B            │",
        "│ bf16 weight copies (autocast)  │   0.1 MiB │   0.2 MiB │ matmul weights cast per step    │",
        "│ gradients (fp32)               │   0.4 MiB │   0.4 MiB │ freed after each optimizer step │",
        "│ optimizer state: AdamW         │   0.8 MiB │   0.8 MiB │                                 │",
        "│ optimizer step temporaries     │         - │   0.4 MiB │                                 │",
        "│ activations, checkpointing on  │   0.9 MiB │   1.1 MiB │ used                            │",
        "│ activations, checkpointing off │         - │   1.9 MiB │                                 │",
        "│ backward temporaries           │   0.2 MiB │         - │                                 │",
        "│ logits + loss                  │         - │   0.2 MiB │ 8x32x64 logits x 12 B           │",
        "│ batch tensors                  │   0.0 MiB │   0.0 MiB │ ids, labels, mask               │",
        "├────────────────────────────────┼───────────┼───────────┼─────────────────────────────────┤",
        "│ peak allocated                 │   2.9 MiB │           │ at backward layers              │",
        "│ allocator slack (10%)          │   0.3 MiB │           │ stated constant                 │",
        "│ CUDA context                   │ 512.0 MiB │           │ stated constant                 │",
        "│ total                          │ 515.1 MiB │           │                                 │",
        "│ budget                         │ 531.1 MiB │           │ fits: given                     │",
        "└────────────────────────────────┴───────────┴───────────┴─────────────────────────────────┘",
    ]
    # the suggestion under a plan that does not fit starts at the left edge, as the title does
    tight = memory.plan(train(batch_size=60, block_size=32, precision="fp16"), CFG, "cuda", budget_bytes=BUDGET)
    console = Console(width=100, record=True, color_system=None)
    console.print(tight.render())
    text = console.export_text().splitlines()
    assert text[0].startswith("memory plan (cuda, fp16)") and text[-3].startswith("suggestion: batch 30 x")
    # the peak and the total in bold on a terminal, and only they
    console = Console(width=100, record=True, force_terminal=True, color_system="standard")
    console.print(p.render())
    bold = [re.sub(r"\x1b\[[0-9;]*m", "", line).split()[1] for line in console.export_text(styles=True).splitlines()
            if "\x1b[1m" in line and "│" in line]
    assert bold == ["peak", "total"]
