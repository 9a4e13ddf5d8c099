"""The `int8` model format: torch.ao dynamic int8 Linear layers, written and read again.

`quantize_dynamic` with per-channel int8 weights and dynamic int8 activations (fbgemm/x86
kernels) was the fastest int8 path on our CPUs (docs/notes/quantize.md). A folder holds
`model-int8.safetensors` (int8 weights + per-row scales, norms in fp32; no pickle),
config.json, generation_config.json and the tokenizer; `load_int8` rebuilds the same
modules. Plain `from_pretrained` cannot read it: transformers has no loader for torch.ao
dynamic modules.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.ao.nn.quantized.dynamic import Linear as DynLinear
from torch.ao.quantization import default_per_channel_weight_observer, per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from tinystory.errors import QuantizationError
from tinystory.paths import atomic_path
from tinystory.tokenizer import load_tokenizer

INT8_WEIGHTS = "model-int8.safetensors"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (the path is deprecated but the fastest here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(deprecated|quantized tensor).*")
        yield


def int8_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Per-channel int8 weights of every Linear (+ an untied embedding), fp32 for the rest.

    The int8 values and scales are exactly those `quantize_dynamic` with
    `per_channel_dynamic_qconfig` puts in its modules: `<name>.weight` (int8, (out, in)),
    `<name>.weight_scale` (fp32, (out,)); zero points are 0 (symmetric).
    """
    with quiet():
        qmodel = quantize_dynamic(copy.deepcopy(model).float().eval(), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                  dtype=torch.qint8)
    state: dict[str, torch.Tensor] = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, DynLinear):
            w, b = mod._weight_bias()  # quantized (out, in), fp32 bias or None
            state.update(_int8_entry(name, w))
            if b is not None:
                state[f"{name}.bias"] = b.detach().float().contiguous()
    tied = model.config.tie_word_embeddings
    for name, p in qmodel.named_parameters():
        if name.endswith("embed_tokens.weight"):
            if not tied:  # an untied embedding gets the same per-row int8 scheme
                obs = default_per_channel_weight_observer()
                obs(p.detach())
                scale, zero = obs.calculate_qparams()
                with quiet():
                    q = torch.quantize_per_channel(p.detach(), scale, zero, 0, torch.qint8)
                state.update(_int8_entry(name.removesuffix(".weight"), q))
        elif name not in state:
            state[name] = p.detach().float().contiguous()  # RMSNorm weights (tiny)
    return state


def _int8_entry(name: str, q: torch.Tensor) -> dict[str, torch.Tensor]:
    assert int(q.q_per_channel_zero_points().abs().max()) == 0, "symmetric int8 expected"
    return {f"{name}.weight": q.int_repr().contiguous(),
            f"{name}.weight_scale": q.q_per_channel_scales().float().contiguous()}


class Int8Embedding(torch.nn.Module):
    """Embedding lookup from per-row int8 weights (the tied output head's own int8 rows)."""

    weight_int8: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight_int8", weight, persistent=False)  # (V, H) int8
        self.register_buffer("scale", scale, persistent=False)  # (V,) fp32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        rows = torch.nn.functional.embedding(ids, self.weight_int8).float()
        return rows * self.scale[ids].unsqueeze(-1)


class FullRangeDynLinear(DynLinear):
    """torch.ao's dynamic int8 Linear with 8-bit activations (`reduce_range=False`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return y.to(x.dtype)


@functools.cache
def full_range_activations() -> bool:
    """Whether dynamic int8 Linear may use all 8 bits for activations on this CPU.

    fbgemm quantizes activations to 7 bits by default (`reduce_range`), because its
    AVX2 kernels multiply u8 x s8 pairs into int16, which can saturate. CPUs with VNNI
    (avx512_vnni, avx_vnni) accumulate into int32 instead, so the 8th bit is free there:
    measured on a cpu-profile model after 15 minutes of training, +0.60% validation bpb
    against fp32 instead of +2.01%, at the same speed (docs/notes/quantize.md). The
    GELU output that feeds `down_proj` is where the lost bit hurt."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni"))


def build_int8(config: Any, state: dict[str, torch.Tensor], reduce_range: bool | None = None) -> PreTrainedModel:
    """The HF model of `config` with torch.ao dynamic int8 Linear layers holding `state`;
    activations in 8 bits where this CPU allows it (`full_range_activations`), unless
    `reduce_range` says otherwise."""
    with no_init_weights():  # shapes only: every weight comes from `state`
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    reduce = not full_range_activations() if reduce_range is None else reduce_range
    linear = DynLinear if reduce else FullRangeDynLinear
    if any(f"{n}.weight" not in state for n, _ in linears):
        raise QuantizationError("int8 weights do not fit the config", "quantize the run again")
    with quiet():
        for name, mod in linears:
            w, s = state[f"{name}.weight"], state[f"{name}.weight_scale"]  # (out, in) int8, (out,)
            q = torch._make_per_channel_quantized_tensor(w, s.double(), torch.zeros(len(s), dtype=torch.int64), 0)
            new = linear(mod.in_features, mod.out_features, bias_=mod.bias is not None, dtype=torch.qint8)
            new.set_weight_bias(q, state.get(f"{name}.bias"))
            model.set_submodule(name, new)
    src = "lm_head" if config.tie_word_embeddings else "model.embed_tokens"
    model.set_input_embeddings(Int8Embedding(state[f"{src}.weight"], state[f"{src}.weight_scale"]))
    with torch.no_grad():
        for k, p in model.named_parameters():  # what is left in fp32: the RMSNorm weights
            p.copy_(state[k])
    return model.eval()


def save_int8(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write config, generation config, tokenizer and `model-int8.safetensors` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with atomic_path(folder / INT8_WEIGHTS) as tmp:
        save_file(int8_state(model), str(tmp), metadata={"format": "pt"})  # one key: the same bytes every save


def load_int8(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of an `int8` folder: an HF causal LM (generate, KV cache) on CPU."""
    path = Path(path)
    if not (path / INT8_WEIGHTS).is_file():
        raise QuantizationError(f"{path} holds no int8 model ({INT8_WEIGHTS} is missing)",
                                "run `tinystory quantize RUN --method int8`")
    model = build_int8(AutoConfig.from_pretrained(path), load_file(str(path / INT8_WEIGHTS)))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, load_tokenizer(path)
