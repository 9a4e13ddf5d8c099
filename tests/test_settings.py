"""Settings: layering order, provenance, validation messages, every shipped profile."""

from __future__ import annotations

import pytest

from tinystory.errors import SettingsError
from tinystory.settings import (
    Settings,
    all_keys,
    from_toml,
    load_settings,
    parse_set,
    profile_names,
    read_profile,
    to_toml,
)


def test_defaults_then_profile_then_config_then_env_then_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = 0.005\nbatch_size = 3\nwarmup_steps = 7\n")
    env = {"TINYSTORY_TRAIN__BATCH_SIZE": "5", "TINYSTORY_TRAIN__WARMUP_STEPS": "9"}
    s = load_settings(profile="tiny", config=cfg, env=env, overrides={"train.warmup_steps": (11, "--warmup")})
    assert s.profile == "tiny"
    assert s.train.grad_accum == 1 and s.source("train.grad_accum") == "default"
    assert s.train.block_size == 64 and s.source("train.block_size") == "profile:tiny"
    assert s.train.lr == 0.005 and s.source("train.lr") == f"config:{cfg}"
    assert s.train.batch_size == 5 and s.source("train.batch_size") == "env:TINYSTORY_TRAIN__BATCH_SIZE"
    assert s.train.warmup_steps == 11 and s.source("train.warmup_steps") == "--warmup"


def test_profile_from_env_and_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('profile = "rtx2070"\n')
    assert load_settings(config=cfg, env={}).profile == "rtx2070"
    assert load_settings(config=cfg, env={"TINYSTORY_PROFILE": "tiny"}).profile == "tiny"
    assert load_settings(profile="cpu", config=cfg, env={"TINYSTORY_PROFILE": "tiny"}).profile == "cpu"


def test_auto_profile_is_cpu_without_cuda(monkeypatch):
    # no NVIDIA driver (mocked, so the test holds on a GPU machine too): the cpu profile
    from tinystory import settings as S

    monkeypatch.setattr(S, "nvidia_driver_present", lambda: False)
    assert load_settings(profile="auto", env={}).profile == "cpu"


def test_unknown_key_suggests_closest():
    with pytest.raises(SettingsError) as e:
        load_settings(profile="tiny", env={}, overrides=parse_set(["train.lrr=1"]))
    assert str(e.value) == "unknown setting 'train.lrr' (from --set) (did you mean train.lr?)"


def test_key_in_wrong_section_suggests_the_right_one(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nwarmup_steps = 4\n")
    with pytest.raises(SettingsError, match=r"did you mean train.warmup_steps\?"):
        load_settings(profile="tiny", config=cfg, env={})


def test_wrong_type_names_key_type_and_source(tmp_path):
    with pytest.raises(SettingsError) as e:
        load_settings(profile="tiny", env={"TINYSTORY_TRAIN__BATCH_SIZE": "many"})
    msg = str(e.value)
    assert "train.batch_size must be integer" in msg and "'many'" in msg and "env:TINYSTORY_TRAIN__BATCH_SIZE" in msg
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(SettingsError, match=r"train.lr must be number, got 'fast' from config:"):
        load_settings(profile="tiny", config=cfg, env={})


def test_choices_are_checked():
    with pytest.raises(SettingsError, match=r"train.precision = 'bf61'.*did you mean 'bf16'\?"):
        load_settings(profile="tiny", env={}, overrides={"train.precision": ("bf61", "--precision")})


def test_text_values_are_parsed_by_type():
    s = load_settings(
        profile="tiny",
        env={},
        overrides=parse_set(
            ["train.max_tokens=1e6", "train.torch_compile=yes", "eval.metrics=ppl, bpb", "generate.seed=none",
             "train.lr=3e-4"]
        ),
    )
    assert s.train.max_tokens == 1_000_000
    assert s.train.torch_compile is True
    assert s.eval.metrics == ("ppl", "bpb")
    assert s.generate.seed is None
    assert s.train.lr == 3e-4


def test_bad_set_syntax():
    with pytest.raises(SettingsError, match=r"is not section\.key=value"):
        parse_set(["lr"])


def test_missing_config_file_named_by_flag_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(profile="tiny", config=tmp_path / "nope.toml", env={})


def test_bad_toml_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train\n")
    with pytest.raises(SettingsError, match="is not valid TOML"):
        load_settings(profile="tiny", config=cfg, env={})


def test_toml_round_trip():
    s = load_settings(profile="rtx2070", env={}, overrides={"generate.seed": (7, "--seed")})
    back = from_toml(to_toml(s))
    assert back == s
    assert back.generate.seed == 7 and back.train.optimizer == "adamw_bnb_8bit"


def test_settings_are_frozen():
    # guards against a settings object that a library call could change under another's feet:
    # a field set on a frozen section, and a list-valued setting changed in place
    import dataclasses

    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):  # a tuple: no append
        s.eval.metrics.append("bleu")  # type: ignore[attr-defined]
    assert s.eval.metrics == ("loss", "ppl", "bpb")
    assert s.replace(train__lr=0.1).train.lr == 0.1 and s.train.lr == 6e-4
    assert s.replace(eval__metrics="bpb,distinct-n").eval.metrics == ("bpb", "distinct-n")


def test_shipped_profiles():
    assert profile_names() == ["a100", "cpu", "rtx2070", "tiny"]


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_is_valid_and_builds_its_model_on_meta(name):
    from tinystory.model import build_config, build_model
    from tinystory.tokenizer import parse_spec

    s = load_settings(profile=name, env={})
    raw = read_profile(name)
    assert raw.get("description"), f"profile {name} needs a description"
    for section, values in raw.items():
        if isinstance(values, dict):
            for key in values:
                assert f"{section}.{key}" in all_keys()
                assert s.source(f"{section}.{key}") == f"profile:{name}"
    _, n = parse_spec(s.data.tokenizer)
    config = build_config(s.model.preset, n or 32000)
    model = build_model(config, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert s.train.block_size <= config.max_position_embeddings


def test_rtx2070_is_the_seed_setup():
    s = load_settings(profile="rtx2070", env={})
    t = s.train
    assert (s.model.preset, s.data.tokenizer) == ("tinystories-40m", "mistral")
    assert (t.batch_size, t.precision, t.activation_checkpointing, t.optimizer) == (6, "fp16", True, "adamw_bnb_8bit")
    assert t.early_stopping_patience == 2 and t.memory_budget_gb == 8.0 and t.wandb == "auto"


def test_auto_profile_needs_torch_only_where_an_nvidia_driver_is(monkeypatch):
    import sys
    import types

    from tinystory import settings as S

    monkeypatch.setattr(S, "nvidia_driver_present", lambda: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would raise ImportError
    assert S.detect_profile() == "cpu"
    monkeypatch.setattr(S, "nvidia_driver_present", lambda: True)
    for bf16, expected in ((True, "a100"), (False, "rtx2070")):
        cuda = types.SimpleNamespace(is_available=lambda: True, is_bf16_supported=lambda b=bf16: b)
        monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
        assert S.detect_profile() == expected
