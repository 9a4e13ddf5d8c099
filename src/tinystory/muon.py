"""Muon for the hidden matrices, AdamW for the rest, stepped as one optimizer.

The split of modded-nanogpt and nanochat: `torch.optim.Muon` orthogonalizes the updates of
the 2-D weights inside the transformer blocks (attention and MLP projections); embeddings
(tied to the output head here) and norms take `torch.optim.AdamW`. Muon's learning rate is
matched to AdamW's update size (`adjust_lr_fn="match_rms_adamw"`), so one learning rate and
one schedule drive both. The Trainer builds it through its optimizer-factory hook
(`optimizer_cls_and_kwargs`).

torch's Newton-Schulz iteration runs in bf16. Where training does not run in bf16 (a CPU
whose probe found bf16 slow, a GPU without bf16), bf16 matmuls are slow or emulated: on a
2-core AMD EPYC (Zen 1) the iteration took 4.4 s per step over the `cpu-3m` matrices in bf16
and 0.22 s in fp32. So there it runs the same iteration in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.optim._muon as _torch_muon
from torch import Tensor, nn


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(Muon, AdamW with weight decay, AdamW without) parameters of `model`: the 2-D weights
    inside the decoder layers go to Muon; the other matrices (the embedding, an untied
    head) to AdamW with decay; vectors (norms, biases) to AdamW without."""
    muon: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 2 and ".layers." in f".{name}":
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            plain.append(p)
    return muon, decay, plain


class MuonAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` and `torch.optim.AdamW` as one optimizer: the param groups and the
    state are shared with the two, so the LR scheduler, checkpoints and a resume see one."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float = 1e-8, momentum: float = 0.95, ns_fp32: bool = False) -> None:
        muon, decay, plain = split(model)
        if not muon:
            raise ValueError("Muon found no 2-D weights inside decoder layers (`.layers.`) to orthogonalize")
        self.ns_fp32 = ns_fp32
        self._muon = torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      adjust_lr_fn="match_rms_adamw")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self._adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
        super().__init__(self._muon.param_groups + self._adamw.param_groups, {})
        self._link()

    def _link(self) -> None:
        """Point the two optimizers at this one's param groups and state (after a load too)."""
        n = len(self._muon.param_groups)
        self._muon.param_groups, self._adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self._muon.state = self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _newton_schulz_fp32(self.ns_fp32):
            self._muon.step()
        self._adamw.step()
        return loss


class MuonAdamWFactory:
    """The Trainer's optimizer factory: called with (model, **kwargs), returns a MuonAdamW."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> MuonAdamW:
        return MuonAdamW(model, **kwargs)


@contextlib.contextmanager
def _newton_schulz_fp32(on: bool) -> Iterator[None]:
    """Inside the block, torch's Muon runs its Newton-Schulz iteration in fp32 (when `on`)."""
    if not on:
        yield
        return
    library = _torch_muon._zeropower_via_newtonschulz
    _torch_muon._zeropower_via_newtonschulz = _zeropower_fp32
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = library


def _zeropower_fp32(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> Tensor:
    """torch.optim._muon's quintic Newton-Schulz iteration, in fp32 instead of bf16."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x
