"""tinystory.settings value by value: how text from the environment and --set is parsed,
the exact refusals and their hints, profiles, the TOML written and read back, and the
settings table (issue #37's mutants)."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
from rich.console import Console

from tinystory import settings as S
from tinystory.errors import SettingsError
from tinystory.settings import Settings, load_settings, parse_set


def set_one(dotted: str, value, source: str = "--set") -> Settings:
    """Settings() with one value applied from `source`."""
    return S._apply(Settings(), {dotted: (value, source)})


def refusal(dotted: str, value, source: str = "--set") -> tuple[str, str | None]:
    with pytest.raises(SettingsError) as e:
        set_one(dotted, value, source)
    return e.value.message, e.value.hint


# ------------------------------------------------------------------------ parsing text


@pytest.mark.parametrize("text, expected", [
    ("1", True), (" TRUE ", True), ("yes", True), ("On", True),
    ("0", False), ("false", False), (" No", False), ("OFF ", False),
])
def test_booleans_from_text(text, expected):
    assert set_one("train.torch_compile", text).train.torch_compile is expected
    assert set_one("train.torch_compile", text, "env:TINYSTORY_TRAIN__TORCH_COMPILE").train.torch_compile is expected


def test_booleans_refused():
    assert refusal("train.torch_compile", "maybe") == (
        "train.torch_compile must be true/false, got 'maybe' from --set", "fix the value in --set")
    assert refusal("train.torch_compile", "true", "config:c.toml") == (  # TOML has real booleans
        "train.torch_compile must be true/false, got 'true' from config:c.toml", "fix the value in config:c.toml")
    assert refusal("train.torch_compile", 1, "config:c.toml")[0].startswith("train.torch_compile must be true/false")


def test_integers_from_text_and_toml():
    for text, n in (("12", 12), ("1_000", 1000), ("1e6", 1_000_000), ("-3", -3), ("2.0", 2)):
        assert set_one("train.max_steps", text).train.max_steps == n
    assert set_one("train.max_steps", 7, "config:c.toml").train.max_steps == 7
    assert refusal("train.max_steps", "1.5") == ("train.max_steps must be integer, got '1.5' from --set",
                                                 "fix the value in --set")
    assert refusal("train.max_steps", "ten")[0] == "train.max_steps must be integer, got 'ten' from --set"
    assert refusal("train.max_steps", True, "config:c")[0] == "train.max_steps must be integer, got True from config:c"
    assert refusal("train.max_steps", 2.0, "config:c")[0] == "train.max_steps must be integer, got 2.0 from config:c"
    assert refusal("train.max_steps", "5", "config:c")[0] == "train.max_steps must be integer, got '5' from config:c"


def test_numbers_from_text_and_toml():
    assert set_one("train.lr", "3e-4").train.lr == 3e-4
    got = set_one("train.lr", 2, "config:c").train.lr
    assert got == 2.0 and isinstance(got, float)
    assert refusal("train.lr", "fast") == ("train.lr must be number, got 'fast' from --set", "fix the value in --set")
    assert refusal("train.lr", False, "config:c")[0] == "train.lr must be number, got False from config:c"
    assert refusal("train.lr", "0.1", "config:c")[0] == "train.lr must be number, got '0.1' from config:c"


def test_strings_lists_and_optional_values():
    assert set_one("train.data", 12, "config:c").train.data == "12"
    assert set_one("train.data", 1.5, "config:c").train.data == "1.5"
    assert refusal("train.data", True, "config:c")[0] == "train.data must be string, got True from config:c"
    assert refusal("train.data", [1], "config:c")[0] == "train.data must be string, got [1] from config:c"
    assert set_one("eval.metrics", " ppl,, bpb ,").eval.metrics == ("ppl", "bpb")
    assert set_one("eval.metrics", ["loss", "bleu"], "config:c").eval.metrics == ("loss", "bleu")
    assert set_one("eval.metrics", ("loss",), "config:c").eval.metrics == ("loss",)
    assert refusal("eval.metrics", ["loss", 3], "config:c")[0] == \
        "eval.metrics must be list of strings, got ['loss', 3] from config:c"
    assert refusal("eval.metrics", 3, "config:c")[0] == "eval.metrics must be list of strings, got 3 from config:c"
    for empty in ("", " none ", "NULL", "None"):
        assert set_one("generate.seed", empty).generate.seed is None
        assert set_one("generate.seed", empty, "env:X").generate.seed is None
    assert set_one("generate.seed", None, "config:c").generate.seed is None
    assert set_one("generate.seed", "42").generate.seed == 42
    assert set_one("generate.seed", 42, "config:c").generate.seed == 42
    # (the message says "integer", not _type_name's "integer or nothing": see the issue #37 report)
    message, hint = refusal("generate.seed", "none", "config:c")
    assert message.startswith("generate.seed must be integer") and message.endswith(", got 'none' from config:c")
    assert hint == "fix the value in config:c"
    assert refusal("generate.seed", "x")[0].endswith(", got 'x' from --set")


def test_choices_with_and_without_a_close_one():
    assert refusal("train.precision", "bf61") == (
        "train.precision = 'bf61' (from --set) is not one of auto, fp32, bf16, fp16", "did you mean 'bf16'?")
    assert refusal("train.device", "tpu-pod-v5") == (
        "train.device = 'tpu-pod-v5' (from --set) is not one of auto, cpu, cuda, mps",
        "use one of: auto, cpu, cuda, mps")
    assert set_one("train.precision", "fp16").train.precision == "fp16"


def test_unknown_keys():
    assert refusal("train.lrr", 1) == ("unknown setting 'train.lrr' (from --set)", "did you mean train.lr?")
    assert refusal("model.warmup_steps", 1, "config:c") == (
        "unknown setting 'model.warmup_steps' (from config:c)", "did you mean train.warmup_steps?")
    assert refusal("trian.qqqqqqqq", 1) == ("unknown setting 'trian.qqqqqqqq' (from --set)",
                                            "see `tinystory config show` for the valid keys")
    assert refusal("zzzz", 1) == ("unknown setting 'zzzz' (from --set)",
                                  "see `tinystory config show` for the valid keys")
    with pytest.raises(SettingsError) as e:
        S._flatten({"lr": 0.1}, "config:c")  # a key outside any [section]
    assert str(e.value) == "unknown setting 'lr' (from config:c) (see `tinystory config show` for the valid keys)"
    assert S._flatten({"description": "x", "train": {"lr": 0.1}}, "p", ("description",)) == {"train.lr": (0.1, "p")}


def test_type_names():
    assert [S._type_name(t) for t in (bool, int, float, str)] == ["true/false", "integer", "number", "string"]
    assert S._type_name(int | None) == "integer or nothing" and S._type_name(tuple[str, ...]) == "list of strings"
    assert S._type_name(bytes) == str(bytes)


# ---------------------------------------------------------------------- the object


def test_get_source_replace_to_dict():
    s = load_settings(profile="tiny", env={"TINYSTORY_TRAIN__LR": "0.01"})
    assert s.get("train.lr") == 0.01 and s.get("model.preset") == "tiny" and s.get("eval.metrics") == (
        "loss", "ppl", "bpb")
    assert s.source("train.lr") == "env:TINYSTORY_TRAIN__LR" and s.source("train.beta1") == "default"
    r = s.replace(train__lr=0.5, eval__seed=3)
    assert (r.train.lr, r.eval.seed, r.source("train.lr"), r.source("eval.seed")) == (0.5, 3, "code", "code")
    assert s.train.lr == 0.01 and r.source("model.preset") == "profile:tiny"
    d = s.to_dict()
    assert list(d) == ["profile", "model", "data", "train", "eval", "generate", "quantize", "push", "serve"]
    assert d["profile"] == "tiny" and d["train"]["lr"] == 0.01 and d["serve"] == {"host": "127.0.0.1", "port": 8000}
    assert S.field_types("serve") == {"host": str, "port": int}
    assert S.all_keys()[:2] == ["model.preset", "data.dataset"] and "serve.port" in S.all_keys()
    assert len(S.all_keys()) == sum(len(dataclasses.fields(c)) for c in S.SECTIONS.values())


def test_setting_keeps_lists_as_tuples_and_its_why():
    f = S.setting(["a", "b"], "why not", ("a", "b"))
    assert f.default == ("a", "b") and f.metadata == {"why": "why not", "choices": ("a", "b")}
    assert S.setting(3, "three").default == 3 and S.setting(3, "three").metadata["choices"] is None
    assert S.explain("train.lr") == "peak learning rate (from scratch; the seed's 2e-5 is for fine-tuning)"
    assert S.explain("serve.port") == "TCP port"


# -------------------------------------------------------------------------- layers


def test_environment_variables_need_the_prefix_and_a_double_underscore():
    env = {"TINYSTORY_TRAIN__LR": "0.02", "TINYSTORY_PROFILE": "tiny", "TINYSTORY_TRAINLR": "9",
           "OTHER_TRAIN__LR": "9", "tinystory_train__beta1": "0.5", "TINYSTORY_EVAL__TOP_K": "3"}
    s = load_settings(env=env)
    assert (s.profile, s.train.lr, s.train.beta1, s.eval.top_k) == ("tiny", 0.02, 0.9, 3)
    assert s.source("eval.top_k") == "env:TINYSTORY_EVAL__TOP_K"
    with pytest.raises(SettingsError) as e:
        load_settings(profile="tiny", env={"TINYSTORY_TRAIN__NOPE_NOPE": "1"})
    assert e.value.message == "unknown setting 'train.nope_nope' (from env:TINYSTORY_TRAIN__NOPE_NOPE)"


def test_profile_names_paths_and_errors(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('description = "mine"\n[train]\nlr = 0.25\n')
    s = load_settings(profile=str(f), env={})
    assert (s.profile, s.train.lr, s.source("train.lr")) == ("mine", 0.25, "profile:mine")
    assert S.read_profile(str(f)) == {"description": "mine", "train": {"lr": 0.25}}
    assert S.read_profile("tiny")["train"]["block_size"] == 64
    with pytest.raises(SettingsError) as e:
        S.read_profile("tinny")
    assert (e.value.message, e.value.hint) == ("unknown profile 'tinny'", "did you mean 'tiny'?")
    with pytest.raises(SettingsError) as e:
        S.read_profile(str(tmp_path / "missing.toml"))
    assert (e.value.message, e.value.hint) == (f"unknown profile '{tmp_path / 'missing.toml'}'",
                                               "use one of: a100, cpu, rtx2070, tiny")


def test_the_config_file_names_the_profile(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("profile = 3\n")
    with pytest.raises(SettingsError) as e:
        load_settings(config=cfg, env={})
    assert (e.value.message, e.value.hint) == (f"profile in config:{cfg} must be a string", 'e.g. profile = "cpu"')
    cfg.write_text('profile = "tiny"\n[train]\nlr = 0.125\n')
    s = load_settings(config=cfg, env={})
    assert (s.profile, s.train.lr, s.source("train.lr")) == ("tiny", 0.125, f"config:{cfg}")
    assert "profile" not in s.sources


def test_the_default_config_file_is_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSTORY_CONFIG", str(tmp_path / "none.toml"))
    assert load_settings(profile="tiny", env={}).train.lr == 0.003
    (tmp_path / "none.toml").write_text("[train]\nlr = 0.5\n")
    assert load_settings(profile="tiny", env={}).train.lr == 0.5
    (tmp_path / "none.toml").write_text("[train\n")
    with pytest.raises(SettingsError) as e:
        load_settings(profile="tiny", env={})
    assert e.value.message.startswith(f"config file {tmp_path / 'none.toml'} is not valid TOML: ")
    assert e.value.hint == "fix the file"
    with pytest.raises(SettingsError) as e:
        load_settings(profile="tiny", config=tmp_path / "gone.toml", env={})
    assert (e.value.message, e.value.hint) == (f"config file {tmp_path / 'gone.toml'} does not exist",
                                               "check the --config path")


def test_auto_profile_from_nothing(monkeypatch):
    monkeypatch.setattr(S, "detect_profile", lambda: "rtx2070")
    assert load_settings(env={}).profile == "rtx2070"
    assert load_settings(profile="auto", env={}).profile == "rtx2070"
    assert load_settings(env={"TINYSTORY_PROFILE": "auto"}).profile == "rtx2070"


def test_nvidia_driver_detection(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(sys, "platform", "darwin")
    assert S.nvidia_driver_present() is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert S.nvidia_driver_present() is True
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(S, "Path", lambda p: tmp_path / p.lstrip("/"))
    assert S.nvidia_driver_present() is False
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "proc" / "driver" / "nvidia" / "version").write_text("NVRM")
    assert S.nvidia_driver_present() is True


def test_detect_profile_without_cuda(monkeypatch):
    monkeypatch.setattr(S, "nvidia_driver_present", lambda: True)
    cuda = types.SimpleNamespace(is_available=lambda: False, is_bf16_supported=lambda: True)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert S.detect_profile() == "cpu"


def test_parse_set():
    assert parse_set([" train.lr = 0.1 ", "eval.metrics=a=b"]) == {"train.lr": ("0.1", "--set"),
                                                                  "eval.metrics": ("a=b", "--set")}
    assert parse_set(None) == {} and parse_set([]) == {}
    for bad in ("train.lr", "lr=1"):
        with pytest.raises(SettingsError) as e:
            parse_set([bad])
        assert (e.value.message, e.value.hint) == (f"--set {bad!r} is not section.key=value",
                                                   "e.g. --set train.lr=1e-3")


# ---------------------------------------------------------------------------- TOML


def test_to_toml_exactly():
    s = S._apply(Settings(profile="tiny"), {"train.lr": (0.5, "--lr"), "train.torch_compile": (True, "code"),
                                            "generate.seed": (None, "code"), "eval.metrics": (("a", "b"), "c"),
                                            "train.data": ('say "hi"', "code")})
    text = S.to_toml(s)
    lines = text.splitlines()
    assert lines[:4] == ['profile = "tiny"', "", "[model]", 'preset = "tinystories-40m"']
    assert 'data = "say \\"hi\\""  # code' in lines and "lr = 0.5  # --lr" in lines
    assert "torch_compile = true  # code" in lines and "activation_checkpointing = false" in lines
    assert "# seed is unset  # code" in lines and 'metrics = ["a", "b"]  # c' in lines
    assert "max_steps = 0" in lines and "epochs = 1.0" in lines and "[serve]" in lines
    assert text.endswith('host = "127.0.0.1"\nport = 8000\n')
    plain = S.to_toml(s, with_sources=False).splitlines()
    assert "lr = 0.5" in plain and "# seed is unset" in plain and not any("  # " in line for line in plain)
    back = S.from_toml(text, "run/settings.toml")
    assert back == s and back.source("train.lr") == "run/settings.toml"
    assert S.from_toml("[train]\nlr = 0.5\n").profile == "cpu"
    assert S.from_toml("[train]\nlr = 0.5\n").source("train.lr") == "settings.toml"
    assert [S._toml_value(v) for v in (False, 3, 1e-05, [], "x")] == ["false", "3", "1e-05", "[]", '"x"']


def test_print_settings_table(monkeypatch):
    console = Console(width=300, record=True)
    monkeypatch.setattr("tinystory.console.out", lambda: console)
    s = load_settings(profile="tiny", env={}, overrides={"serve.port": (9000, "--port")})
    S.print_settings(s, ["serve", "model"])
    lines = [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in console.export_text().splitlines()]
    body = [line for line in lines if line and not set(line) <= set("┏━┳┓┡╇┩├─┼┤└┴┘")]
    assert body == ["settings (profile tiny)", "key value source why",
                    "serve.host 127.0.0.1 default address to bind; anything else is reachable by others",
                    "serve.port 9000 --port TCP port",
                    "model.preset tiny profile:tiny network shape, a name from `tinystory.model.PRESETS`"]
    console = Console(width=300, record=True)
    monkeypatch.setattr("tinystory.console.out", lambda: console)
    S.print_settings(Settings())
    text = console.export_text()
    assert "settings (profile cpu)" in text and "eval.metrics ('loss', 'ppl', 'bpb') default" in " ".join(
        text.replace("│", " ").split())
    assert "serve.port" in text and "data.dataset" in text


def test_print_settings_layout_left_title_folded_values_and_bold_for_what_was_set(monkeypatch):
    console = Console(width=60, record=True, force_terminal=True, color_system="standard")
    monkeypatch.setattr("tinystory.console.out", lambda: console)
    s = load_settings(profile="tiny", env={}, overrides={"serve.host": ("x" * 30, "--host")})
    S.print_settings(s, ["serve"])
    styled = console.export_text(styles=True, clear=False)
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert lines[0] == "settings (profile tiny)"  # left, not centred
    host = next(line for line in lines if "serve.host" in line)
    assert "xxxxxxxxxxxx" in host and "…" not in "".join(lines)  # a long value folds onto more lines
    assert "\x1b[1mserve.host" in styled  # set by a flag: bold
    assert "\x1b[1mserve.port" not in styled and "serve.port" in styled  # a default: plain


def test_no_nvidia_driver_on_a_mac_whatever_is_on_path(monkeypatch):
    monkeypatch.setattr("sys.platform", "darwin")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/local/bin/nvidia-smi")
    assert S.nvidia_driver_present() is False
    monkeypatch.setattr("sys.platform", "linux")
    assert S.nvidia_driver_present() is True


def test_close_keys_bare_names_and_keys_in_a_far_off_section():
    # a bare name close to one key (difflib cutoff 0.5: "port" is 0.57 like "serve.port")
    assert refusal("port", 1) == ("unknown setting 'port' (from --set)", "did you mean serve.port?")
    # nothing close as a whole, but the key exists in another section
    assert refusal("zzzzzzzzzzzzzzzzzzzzzz.lr", 1) == ("unknown setting 'zzzzzzzzzzzzzzzzzzzzzz.lr' (from --set)",
                                                       "did you mean train.lr?")


def test_integers_take_underscores_and_the_environment_is_read_by_default(monkeypatch):
    assert set_one("train.max_steps", "1_000").train.max_steps == 1000
    monkeypatch.setenv("TINYSTORY_TRAIN__LR", "0.5")
    s = load_settings(profile="tiny")  # env=None: the process environment
    assert s.train.lr == 0.5 and s.source("train.lr") == "env:TINYSTORY_TRAIN__LR"
