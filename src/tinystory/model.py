"""The model factory: one function builds `transformers.MistralForCausalLM` for a preset.

Presets are plain data. `tinystories-40m` is the seed's model; the `stories*` presets take
the shapes of llama2.c's stories260K / 15M / 42M (README table there); `cpu-3m` is the
shape that trains best in 15 minutes on a 2-core CPU; `tiny` is for tests. The vocab size
always comes from the tokenizer, never from the preset.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from transformers import MistralConfig, MistralForCausalLM

from tinystory.errors import SettingsError

# hidden, layers, heads, kv heads, MLP width, sliding window (None = full causal), max positions
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=192, sliding_window=None, max_position_embeddings=512),
    "stories260k": dict(hidden_size=64, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=172, sliding_window=None, max_position_embeddings=512),
    "cpu-3m": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                   intermediate_size=512, sliding_window=None, max_position_embeddings=1024),
    "stories15m": dict(hidden_size=288, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                       intermediate_size=768, sliding_window=None, max_position_embeddings=1024),
    "stories42m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                       intermediate_size=1376, sliding_window=None, max_position_embeddings=1024),
    "tinystories-40m": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=6,
                            intermediate_size=1536, sliding_window=384, max_position_embeddings=4096),
}

# Shared by every preset: the seed's block (GELU-tanh gated MLP, RMSNorm, tied embeddings).
COMMON: dict[str, Any] = dict(
    hidden_act="gelu_pytorch_tanh",
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
    attention_dropout=0.0,
    use_cache=True,
)


def preset(name: str) -> dict[str, Any]:
    """The shape of a named preset (a copy), or a SettingsError naming the valid ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(PRESETS)}"
        raise SettingsError(f"unknown model preset {name!r}", hint)
    return dict(PRESETS[name])


def build_config(
    name: str, vocab_size: int, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int | None = None
) -> MistralConfig:
    """A `MistralConfig` for preset `name` with the tokenizer's vocab and special ids."""

    shape = preset(name)
    return MistralConfig(
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        **shape,
        **COMMON,
    )


def build_model(config: MistralConfig, device: str | None = None) -> MistralForCausalLM:
    """A freshly initialised model (`device="meta"` builds it without memory)."""

    if device == "meta":
        with torch.device("meta"):
            return MistralForCausalLM(config)
    model = MistralForCausalLM(config)
    return model.to(device) if device else model  # type: ignore[arg-type]  # transformers' .to() wrapper


def count_parameters(config: Any) -> int:
    """Exact parameter count from the config alone (tied embeddings counted once).

    Matches `sum(p.numel() for p in model.parameters())`; used by the memory plan
    without building the model.
    """
    h, n, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = h * config.num_attention_heads * hd
    kv = 2 * h * config.num_key_value_heads * hd
    o = config.num_attention_heads * hd * h
    mlp = 3 * h * config.intermediate_size
    per_layer = q + kv + o + mlp + 2 * h  # two RMSNorm weights
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    return embed + n * per_layer + h  # + final norm


def describe(config: Any) -> dict[str, Any]:
    """The architecture facts shown in dry runs and model cards."""
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "mlp": config.intermediate_size,
        "vocab": config.vocab_size,
        "sliding_window": config.sliding_window,
        "max_positions": config.max_position_embeddings,
        "activation": config.hidden_act,
        "parameters": count_parameters(config),
    }
