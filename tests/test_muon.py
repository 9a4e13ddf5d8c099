"""train.optimizer = muon: torch's Muon on the block matrices, AdamW on the rest, as one
optimizer the Trainer steps, schedules, checkpoints and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import prepared, rows, stopped_copy, tiny  # noqa: F401  (prepared is a fixture)

from tinystory.model import build_config, build_model
from tinystory.muon import MuonAdamW, split


def test_the_split_pinned_on_cpu_3m() -> None:
    model = build_model(build_config("cpu-3m", 4096))
    muon, decay, plain = split(model)
    # 6 layers x (q, k, v, o 192x192; gate, up 512x192; down 192x512)
    assert len(muon) == 42 and sum(p.numel() for p in muon) == 6 * (4 * 192 * 192 + 3 * 512 * 192) == 2_654_208
    assert [tuple(p.shape) for p in decay] == [(4096, 192)]  # the embedding, tied to the head: once
    assert decay[0] is model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert len(plain) == 13 and {tuple(p.shape) for p in plain} == {(192,)}  # 2 norms per layer + the final one
    assert sum(p.numel() for p in muon + decay + plain) == sum(p.numel() for p in model.parameters()) == 3_443_136
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".layers." in names[id(p)] and "norm" not in names[id(p)] for p in muon)

    opt = MuonAdamW(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    groups = opt.param_groups
    assert [len(g["params"]) for g in groups] == [42, 1, 13]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]
    assert groups[0]["adjust_lr_fn"] == "match_rms_adamw" and groups[1]["betas"] == (0.9, 0.95)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(build_config("tiny", 64))
    return model, torch.randint(0, 64, (4, 16))


def _step(model, opt, x) -> None:
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def test_one_step_is_the_libraries_muon_and_adamw() -> None:
    """MuonAdamW adds nothing to the two library optimizers: the same updates, bf16 as torch does it."""
    a, x = _pair()
    b, _ = _pair()
    ours = MuonAdamW(a, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    muon, decay, plain = split(b)
    lib = [torch.optim.Muon(muon, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
           torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95))]
    for _ in range(3):
        _step(a, ours, x)
        b(input_ids=x, labels=x).loss.backward()
        for o in lib:
            o.step()
            o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, _pair()[0].model.layers[0].mlp.up_proj.weight)


def test_fp32_newton_schulz_is_the_library_iteration_in_fp32() -> None:
    import torch.optim._muon as lib

    from tinystory.muon import _newton_schulz_fp32, _zeropower_fp32

    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(1))
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    ours, theirs = _zeropower_fp32(g, *args), lib._zeropower_via_newtonschulz(g, *args)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16 and ours.shape == (96, 32)
    assert torch.allclose(ours, theirs.float(), atol=0.03)  # bf16 keeps ~3 significant digits
    sv = torch.linalg.svdvals(ours)
    assert sv.min() > 0.5 and sv.max() < 1.3  # orthogonalized: singular values near 1, not g's
    library = lib._zeropower_via_newtonschulz
    with _newton_schulz_fp32(True):
        assert lib._zeropower_via_newtonschulz is _zeropower_fp32
    with _newton_schulz_fp32(False):
        assert lib._zeropower_via_newtonschulz is library
    assert lib._zeropower_via_newtonschulz is library  # restored


def test_the_factory_runs_newton_schulz_in_bf16_only_where_training_does() -> None:
    from tinystory.precision import Precision
    from tinystory.settings import load_settings
    from tinystory.trainer import optimizer_factory, optimizer_name

    s = load_settings(profile="tiny", env={}).replace(train__optimizer="muon", train__lr=5e-3)
    cls, kw = optimizer_factory(s, Precision("fp32", "probe", {}))
    assert kw == {"lr": 5e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "ns_fp32": True}
    assert optimizer_factory(s, Precision("bf16", "probe", {}))[1]["ns_fp32"] is False
    assert isinstance(cls()(_pair()[0], **kw), MuonAdamW)
    assert optimizer_name(s, "cpu") == "adamw_torch"  # what TrainingArguments is told; the factory wins
    assert optimizer_factory(load_settings(profile="tiny", env={}), Precision("fp32", "probe", {})) is None


def test_a_muon_run_learns_and_resumes_to_the_uninterrupted_losses(prepared: Path, tmp_path: Path) -> None:  # noqa: F811
    from tinystory.training import train

    def settings(out: Path):  # type: ignore[no-untyped-def]
        return tiny(prepared, out, optimizer="muon", max_steps=24, eval_every=0, save_every=8,
                    keep_checkpoints=5, log_every=4, precision="fp32")

    run = train(settings(tmp_path / "whole"))
    state = torch.load(run / "checkpoints" / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert len(state["param_groups"]) == 3 and "momentum_buffer" in state["state"][0]  # Muon's, in the checkpoint
    resumed = stopped_copy(run, tmp_path / "resumed", at_step=8)
    train(settings(resumed), resume=True)
    before = {r["step"]: r for r in rows(run) if "loss" in r}
    after = {r["step"]: r for r in rows(resumed) if "loss" in r}
    assert sorted(after) == [4, 8, 12, 16, 20, 24] and before[24]["loss"] < before[4]["loss"] - 0.5
    for step in (12, 16, 20, 24):
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-5)
        assert after[step]["lr"] == pytest.approx(before[step]["lr"], rel=1e-9)
    assert json.loads((resumed / "run.json").read_text())["steps"] == 24
