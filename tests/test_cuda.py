"""The GPU path on a real CUDA GPU: fp16 training with the rtx2070 settings and 8-bit
AdamW, the memory plan against the allocator's peak, bitsandbytes quantization, and
generation on CUDA. Skipped (with the reason) where there is no CUDA GPU; run them with
`pytest -m cuda` on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch here)"),
]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained 40 steps with the rtx2070 settings (fp16, checkpointing, 8-bit AdamW).

    Module-scoped, so every path is explicit: nothing lands in the user's cache or runs dir.
    """
    pytest.importorskip("bitsandbytes", reason="8-bit AdamW needs bitsandbytes (pip install 'tinystory-llm[gpu]')")
    from tinystory.prepare import prepare
    from tinystory.settings import load_settings
    from tinystory.training import train

    root = tmp_path_factory.mktemp("cuda")
    settings = load_settings(profile="rtx2070", env={}).replace(
        model__preset="tiny", data__dataset="sample", data__tokenizer="bpe:512", data__max_stories=600,
        data__out=str(root / "data"), train__data=str(root / "data"), train__out=str(root / "run"),
        train__max_steps=40, train__block_size=64, train__batch_size=8, train__lr=3e-3, train__warmup_steps=4,
        train__eval_every=0, train__save_every=1000, train__log_every=5, train__eval_tokens=4096,
        train__wandb="off", train__early_stopping_patience=0, train__dataloader_workers=0)
    prepare(settings)
    return Path(train(settings))


def test_fp16_training_with_8bit_adamw(fp16_run: Path) -> None:
    import sys

    info = json.loads((fp16_run / "run.json").read_text())
    assert info["precision"] == "fp16" and info["device"].startswith("cuda")
    assert "bitsandbytes" in sys.modules  # the Trainer built adamw_bnb_8bit
    losses = [r["loss"] for r in map(json.loads, (fp16_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 6 and all(x == x for x in losses)  # logged every 5 steps, no NaN
    assert losses[-1] < losses[0] - 0.5  # ln(512) = 6.24 at the start

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp16_run).cuda()
    logits = model(input_ids=torch.tensor([[1, 2, 3]], device="cuda")).logits
    assert torch.isfinite(logits).all()


def test_memory_plan_matches_the_cuda_allocator() -> None:
    """One fp16-autocast step of the 40M model with checkpointing, as the Trainer runs it:
    the plan's peak allocated within 20% of torch.cuda.max_memory_allocated()."""
    from tinystory import memory
    from tinystory.model import build_config, build_model
    from tinystory.settings import load_settings

    B, T = 2, 512
    config = build_config("tinystories-40m", vocab_size=32000)
    settings = load_settings(profile="rtx2070", env={}).replace(train__batch_size=B, train__block_size=T,
                                                                 train__optimizer="adamw_torch_fused")
    plan = memory.plan(settings, config, "cuda")
    torch.manual_seed(0)
    model = build_model(config).cuda().train()
    model.config.use_cache = False
    # transformers 5.24 names it activation_checkpointing_enable; older 5.x gradient_checkpointing_enable
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    ids = torch.randint(0, 32000, (B, T), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # the optimizer state exists from the second step on
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    assert 0.8 <= plan.peak_allocated_bytes / measured <= 1.2, memory.summary(plan) + f"; measured {measured:,}"


def test_bnb_quantize_reload_and_generate(fp16_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="bnb quantization needs bitsandbytes")
    from tinystory import quantization
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams
    from tinystory.settings import load_settings

    for method in ("bnb-int8", "bnb-nf4"):
        settings = load_settings(profile="rtx2070", env={}).replace(quantize__method=method)
        path, rows = quantization.quantize(fp16_run, settings, out=tmp_path / method, val_tokens=1024, gen_tokens=8,
                                           reps=1)
        assert rows[1].bpb is not None and rows[1].bpb < rows[0].bpb * 1.2  # close to the fp32 model
        gen = Generator.load(path, device="cuda")
        text = gen.generate("Once upon a time", SamplingParams(max_new_tokens=12, min_new_tokens=12, greedy=True))
        assert gen.last_stats.tokens == 12 and isinstance(text, str)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_generation_on_cuda(fp16_run: Path, dtype: str) -> None:
    from tinystory.generation import Generator
    from tinystory.sampling import SamplingParams

    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    gen = Generator.load(fp16_run, device="cuda", dtype=dtype)
    assert gen.device == "cuda" and gen.dtype == dtype
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24, greedy=True)
    text = gen.generate("Once upon a time", params)
    assert gen.last_stats.tokens == 24
    # against fp32 on the CPU (not against itself): the first 8 greedy tokens agree
    cpu = Generator.load(fp16_run, device="cpu", dtype="fp32")
    cpu.generate("Once upon a time", params)
    assert gen.last_stats.token_ids[:8] == cpu.last_stats.token_ids[:8], text
    sampled = gen.generate("Once upon a time", SamplingParams(max_new_tokens=24, seed=7))
    assert sampled == gen.generate("Once upon a time", SamplingParams(max_new_tokens=24, seed=7))  # seeded
