"""The model factory: exact parameter counts and the seed's architecture."""

from __future__ import annotations

import math

import pytest
import torch

from tinystory.errors import SettingsError
from tinystory.model import PRESETS, build_config, build_model, count_parameters, preset


def test_seed_preset_has_exactly_40_609_152_parameters():
    config = build_config("tinystories-40m", 32000)
    model = build_model(config, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 40_609_152
    assert count_parameters(config) == 40_609_152


def test_seed_architecture():
    c = build_config("tinystories-40m", 32000)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (12, 384, 6, 6)
    assert (c.intermediate_size, c.sliding_window, c.max_position_embeddings) == (1536, 384, 4096)
    assert c.hidden_act == "gelu_pytorch_tanh" and c.tie_word_embeddings is True
    assert c.rope_parameters["rope_theta"] == 10000.0
    assert type(build_model(c, device="meta")).__name__ == "MistralForCausalLM"


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_matches_the_built_model(name):
    config = build_config(name, 4096)
    model = build_model(config, device="meta")
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_llama2c_shapes():
    # llama2.c README: stories15M dim 288 / 6 layers / 6 heads; stories42M 512 / 8 / 8;
    # stories260K 64 / 5 / 8 heads / 4 kv heads.
    assert (PRESETS["stories15m"]["hidden_size"], PRESETS["stories15m"]["num_hidden_layers"]) == (288, 6)
    assert (PRESETS["stories42m"]["hidden_size"], PRESETS["stories42m"]["num_hidden_layers"]) == (512, 8)
    assert PRESETS["stories260k"]["num_key_value_heads"] == 4
    # with llama2.c's 32000 vocab, stories15M has the same order of parameters (15.2M)
    assert count_parameters(build_config("stories15m", 32000)) == 15_191_712


def test_vocab_comes_from_the_tokenizer():
    assert build_config("tiny", 777).vocab_size == 777


def test_initial_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    config = build_config("tiny", 512)
    model = build_model(config)
    x = torch.randint(3, 512, (4, 64))
    loss = model(input_ids=x, labels=x).loss.item()
    assert abs(loss - math.log(512)) < 0.15


def test_unknown_preset():
    with pytest.raises(SettingsError, match=r"unknown model preset 'tinystories-4m'.*did you mean 'tinystories-40m'"):
        preset("tinystories-4m")
