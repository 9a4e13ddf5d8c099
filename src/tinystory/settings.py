"""One frozen settings object for every command, built in layers, lowest first:

    field defaults < profile (profiles/*.toml) < config file (--config, TINYSTORY_CONFIG,
    else the platformdirs config dir) < TINYSTORY_<SECTION>__<KEY> environment variables
    < flags the user actually typed (dedicated flags and `--set section.key=value`)

Every value remembers the layer it came from (`Settings.sources`), shown by
`--print-settings`. Unknown keys and wrong types raise `SettingsError` naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tinystory.errors import SettingsError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def setting(default: Any, why: str, choices: tuple[str, ...] | None = None) -> Any:
    """A settings field: its default, one line saying why, and the allowed values. List
    values are tuples, so a frozen Settings cannot be changed in place either."""
    meta = {"why": why, "choices": choices}
    return field(default=tuple(default) if isinstance(default, list) else default, metadata=meta)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSettings:
    preset: str = setting("tinystories-40m", "network shape, a name from `tinystory.model.PRESETS`")


@dataclass(frozen=True)
class DataSettings:
    dataset: str = setting("roneneldan/TinyStories", "hub dataset id, local file/folder/glob, or `sample`")
    revision: str = setting("main", "hub dataset branch, tag or commit (the commit it resolves to is recorded)")
    tokenizer: str = setting("mistral", "`mistral` (32k, shipped with tinystory) or `bpe:N` trained here")
    text_field: str = setting("text", "field holding the story in .jsonl/.json/.parquet sources")
    max_stories: int = setting(0, "cap on training stories, 0 = all (quick experiments)")
    val_fraction: float = setting(0.01, "held-out share when the source has no validation split")
    num_proc: int = setting(0, "tokenizer processes, 0 = one per CPU core")
    errors: str = setting("strict", "what to do with bytes that are not UTF-8", ("strict", "replace"))
    out: str = setting("", "prepared-data folder; empty = the cache, named by a fingerprint")


@dataclass(frozen=True)
class TrainSettings:
    data: str = setting("", "prepared-data folder; empty = prepare the data section's dataset")
    out: str = setting("", "run dir; empty = a new timestamped folder under the runs dir")
    auto_prepare: bool = setting(False, "prepare the data section's dataset when no --data is given")
    block_size: int = setting(512, "tokens per training block (context length seen in training)")
    batch_size: int = setting(6, "blocks per device per micro-step")
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    epochs: float = setting(1.0, "passes over the data when no max_steps/max_tokens/minutes is set")
    max_steps: int = setting(0, "stop after this many optimizer steps (0 = no cap)")
    max_tokens: int = setting(0, "stop after this many training tokens (0 = no cap)")
    minutes: float = setting(0.0, "stop after this much wall time, LR schedule fitted to it (0 = no cap)")
    target_bpb: float = setting(0.0, "stop at the first evaluation whose bits per byte on the whole validation "
                                "split is at or below this (0 = off); a length limit still caps the run")
    stop_at_target: bool = setting(True, "stop when target_bpb is reached; false: record the time and tokens to "
                                   "it and train on to the length limit")
    lr: float = setting(6e-4, "peak learning rate (from scratch; the seed's 2e-5 is for fine-tuning)")
    min_lr_ratio: float = setting(0.1, "cosine decay floor as a fraction of the peak LR")
    warmup_steps: int = setting(100, "linear warmup steps before the cosine decay")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices (not norms or biases)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2 (0.95 is steadier than 0.999 for LMs)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    device: str = setting("auto", "auto = a CUDA GPU, else an Apple GPU (MPS) when a probe finds it faster than "
                          "the CPU, else the CPU", ("auto", "cpu", "cuda", "mps"))
    precision: str = setting("auto", "auto picks fp16/bf16/fp32 for the device (CPU: a measured probe)", PRECISIONS)
    optimizer: str = setting(
        "adamw_torch", "optimizer name (muon: torch's Muon on the block matrices, AdamW on the rest)",
        ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "muon")
    )
    activation_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    torch_compile: bool = setting(False, "compile the model with torch.compile (static shapes)")
    compile_mode: str = setting(
        "default", "torch.compile mode: reduce-overhead adds CUDA graphs, max-autotune also tunes matmuls "
        "(minutes of compiling)", ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    attention: str = setting(
        "sdpa", "attention kernel: sdpa (PyTorch's fused kernels) or eager (plain matmuls: compiled on a CPU, "
        "1.2x faster at block 256)", ("sdpa", "eager"))
    eval_every: int = setting(200, "optimizer steps between evaluations (0 = only at the end)")
    eval_every_minutes: float = setting(0.0, "also evaluate when this many minutes of training passed since the "
                                        "last evaluation (0 = off): a steady clock for --target-bpb")
    eval_tokens: int = setting(65536, "validation tokens scored at each evaluation while training: whole blocks "
                               "spread evenly over the split (0 = all); the final figure scores all of it")
    early_stopping_patience: int = setting(2, "evaluations without improvement before stopping (0 = off)")
    save_every: int = setting(200, "optimizer steps between checkpoints")
    keep_checkpoints: int = setting(2, "checkpoints kept in the run dir (oldest deleted)")
    log_every: int = setting(10, "optimizer steps between log lines / metrics.jsonl rows")
    seed: int = setting(1337, "seed for init and data order (reproducible runs)")
    wandb: str = setting("auto", "Weights & Biases: auto = on when logged in", ("auto", "on", "off"))
    wandb_project: str = setting("tinystory", "W&B project name")
    threads: int = setting(0, "torch CPU threads, 0 = one per core")
    memory_budget_gb: float = setting(0.0, "device memory the plan must fit in (0 = the device's own)")
    dataloader_workers: int = setting(0, "DataLoader worker processes (memmap reads are cheap)")


@dataclass(frozen=True)
class EvalSettings:
    metrics: tuple[str, ...] = setting(["loss", "ppl", "bpb"], "metrics to compute (see `tinystory eval --help`)")
    data: str = setting("", "prepared-data folder; empty = the one the run was trained on")
    max_tokens: int = setting(0, "cap on validation tokens scored (0 = the whole split)")
    batch_size: int = setting(8, "blocks per forward pass when scoring")
    num_samples: int = setting(100, "stories generated for the text metrics")
    max_new_tokens: int = setting(256, "token limit of each generated story")
    temperature: float = setting(1.0, "sampling temperature for generated stories")
    top_p: float = setting(0.9, "nucleus sampling for generated stories")
    top_k: int = setting(0, "top-k sampling for generated stories (0 = off)")
    seed: int = setting(1234, "fixed seed so two evals give the same numbers")
    threads: int = setting(0, "torch CPU threads, 0 = torch's default (1 is faster for tiny models, busy CPUs)")
    device: str = setting("auto", "where to run: auto = a CUDA GPU, else an Apple GPU (MPS), else the CPU",
                          ("auto", "cpu", "cuda", "mps"))
    # `--metrics judge`: an OpenAI-compatible model grades stories (tinystory.judge, docs/judge.md)
    judge_url: str = setting("", "the judge's OpenAI-compatible API, e.g. http://localhost:11434/v1 (ollama)")
    judge_model: str = setting("", "the judge's model name as its server knows it, e.g. gpt-4o or llama3.1")
    judge_key_env: str = setting("OPENAI_API_KEY", "environment variable holding the judge's API key ('' = send "
                                 "none); the key itself is never stored")
    judge_openings: int = setting(50, "shipped story openings graded (the first N of 50): fewer cost less")
    judge_samples: int = setting(1, "completions the model writes per opening (seeded, eval's sampling settings)")
    judge_repeats: int = setting(1, "gradings of each story; more than 1 also reports the judge's own spread")
    judge_reference: bool = setting(True, "also grade the real endings of the openings, the scale to read against")
    judge_concurrency: int = setting(4, "judge requests in flight at once")
    judge_timeout: float = setting(60.0, "seconds to wait for one judge answer before a retry")
    judge_retries: int = setting(4, "retries of a request after a 429, a 5xx or a timeout (exponential backoff)")
    judge_max_tokens: int = setting(800, "cap on one judge answer, its assessment and grades (0 = not sent)")
    judge_temperature: float = setting(1.0, "the judge's sampling temperature (1.0: the only one some models take)")
    judge_format: str = setting("json_schema", "how the grades are asked for; a server that refuses one gets the "
                                "next", ("json_schema", "json_object", "text"))


@dataclass(frozen=True)
class GenerateSettings:
    max_new_tokens: int = setting(256, "token limit of a story (stops earlier at EOS)")
    temperature: float = setting(1.0, "sampling temperature (llama2.c's recommendation: 1.0)")
    top_k: int = setting(0, "keep only the k likeliest tokens (0 = off)")
    top_p: float = setting(0.9, "nucleus sampling (llama2.c's recommendation: 0.9)")
    repetition_penalty: float = setting(1.0, "penalise repeated tokens (1.0 = off)")
    num_samples: int = setting(1, "stories per prompt")
    seed: int | None = setting(None, "seed for reproducible samples (unset = random)")
    device: str = setting("auto", "where to run: auto = a CUDA GPU, else an Apple GPU (MPS), else the CPU",
                          ("auto", "cpu", "cuda", "mps"))
    dtype: str = setting("auto", "weights dtype: auto = bf16/fp16 on CUDA, fp32 on CPU", PRECISIONS)
    threads: int = setting(0, "torch CPU threads, 0 = pick for decoding speed")
    compile: str = setting(
        "auto", "compiled decode step with a static cache (CUDA graphs on CUDA): auto = on CUDA, where it "
        "decoded 4-6x faster on an H100; off on CPUs, where its compile takes longer than a story",
        ("auto", "on", "off"))


# The sampling settings a run's generation_config.json also holds (its defaults for
# `generate`, `serve` and plain `model.generate()`).
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = setting(
        "int8", "quantization method", ("int8", "bnb-int8", "bnb-nf4", "gguf-f32", "gguf-f16", "gguf-q8_0")
    )
    out: str = setting("", "output folder or .gguf file; empty = inside the run dir")
    prompt: str = setting("Once upon a time", "prompt of the greedy comparison")
    compare_tokens: int = setting(32, "greedy tokens compared against the unquantized model")
    val_tokens: int = setting(
        8192, "validation tokens scored per variant (eval --max-tokens with the same number gives the same bpb)"
    )


@dataclass(frozen=True)
class PushSettings:
    private: bool = setting(False, "create the Hub repo as private")
    revision: str = setting("main", "branch to commit to")
    commit_message: str = setting("", "commit message; empty = a generated one")
    include_quantized: bool = setting(False, "also upload the quantized variants")


@dataclass(frozen=True)
class ServeSettings:
    host: str = setting("127.0.0.1", "address to bind; anything else is reachable by others")
    port: int = setting(8000, "TCP port")


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "data": DataSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
    "generate": GenerateSettings,
    "quantize": QuantizeSettings,
    "push": PushSettings,
    "serve": ServeSettings,
}

# Keys a profile file may hold beside the sections (profile metadata, not settings).
PROFILE_META = ("description",)


@dataclass(frozen=True)
class Settings:
    profile: str = "cpu"
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    push: PushSettings = field(default_factory=PushSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def get(self, dotted: str) -> Any:
        """The value of `section.key`."""
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def source(self, dotted: str) -> str:
        """Which layer set `section.key` (default, profile:NAME, config:PATH, env:VAR, flag)."""
        return self.sources.get(dotted, "default")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/TOML-ready), sections only, plus the profile name."""
        d: dict[str, Any] = {"profile": self.profile}
        for name in SECTIONS:
            d[name] = dataclasses.asdict(getattr(self, name))
        return d

    def replace(self, **dotted: Any) -> Settings:
        """A copy with `section__key=value` replaced (source recorded as `code`)."""
        overrides = {k.replace("__", "."): (v, "code") for k, v in dotted.items()}
        return _apply(self, overrides)


# ---------------------------------------------------------------------------- types


def field_types(section: str) -> dict[str, Any]:
    """`key -> type` of one section (resolved from the annotations)."""
    return typing.get_type_hints(SECTIONS[section])


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def all_keys() -> list[str]:
    """Every `section.key` there is."""
    return [f"{s}.{k}" for s in SECTIONS for k in _fields(s)]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or nothing"
    if typing.get_origin(tp) is tuple:
        return "list of strings"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _coerce(dotted: str, tp: Any, value: Any, source: str) -> Any:
    """Check (TOML values) or parse (strings from env/--set) `value` as type `tp`."""
    from_text = source.startswith("env:") or source == "--set"

    def bad() -> SettingsError:
        return SettingsError(
            f"{dotted} must be {_type_name(tp)}, got {value!r} from {source}",
            f"fix the value in {source}",
        )

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None or (from_text and str(value).strip().lower() in ("", "none", "null")):
            return None
        return _coerce(dotted, inner, value, source)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise bad() from None
                if as_float.is_integer():  # "1e6" is a fine integer
                    return int(as_float)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise bad()  # pragma: no cover - a field type this module does not know


def _check_key(dotted: str, source: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or key not in _fields(section):
        close = difflib.get_close_matches(dotted, all_keys(), n=1, cutoff=0.5)
        if not close and key:  # a key put in the wrong section
            close = [k for k in all_keys() if k.endswith("." + key)][:1]
        hint = f"did you mean {close[0]}?" if close else "see `tinystory config show` for the valid keys"
        raise SettingsError(f"unknown setting {dotted!r} (from {source})", hint)
    return section, key


def _apply(base: Settings, overrides: Mapping[str, tuple[Any, str]]) -> Settings:
    """A copy of `base` with `section.key -> (value, source)` applied and validated."""
    by_section: dict[str, dict[str, Any]] = {}
    sources = dict(base.sources)
    for dotted, (value, source) in overrides.items():
        section, key = _check_key(dotted, source)
        tp = field_types(section)[key]
        value = _coerce(dotted, tp, value, source)
        choices = _fields(section)[key].metadata.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(choices)}"
            raise SettingsError(f"{dotted} = {value!r} (from {source}) is not one of {', '.join(choices)}", hint)
        by_section.setdefault(section, {})[key] = value
        sources[dotted] = source
    changes: dict[str, Any] = {
        section: dataclasses.replace(getattr(base, section), **values) for section, values in by_section.items()
    }
    return dataclasses.replace(base, sources=sources, **changes)


def _flatten(table: Mapping[str, Any], source: str, allow_meta: tuple[str, ...] = ()) -> dict[str, tuple[Any, str]]:
    """`{section: {key: v}}` from TOML -> `{section.key: (v, source)}`, rejecting stray keys."""
    flat: dict[str, tuple[Any, str]] = {}
    for section, values in table.items():
        if section in allow_meta:
            continue
        if not isinstance(values, dict):
            _check_key(section, source)  # raises: a bare key outside a [section]
            raise SettingsError(f"{section!r} in {source} must be inside a [section]")  # pragma: no cover
        for key, value in values.items():
            flat[f"{section}.{key}"] = (value, source)
    return flat


# ------------------------------------------------------------------------- profiles


def profile_names() -> list[str]:
    """The profiles shipped in the package, sorted."""
    files = resources.files("tinystory.profiles").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".toml"))


def read_profile(name: str) -> dict[str, Any]:
    """The raw TOML table of a shipped profile (or of a profile file path)."""
    if name.endswith(".toml") and Path(name).is_file():
        return tomllib.loads(Path(name).read_text(encoding="utf-8"))
    names = profile_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(names)}"
        raise SettingsError(f"unknown profile {name!r}", hint)
    text = resources.files("tinystory.profiles").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def detect_profile() -> str:
    """`auto`: rtx2070 on a CUDA GPU without bf16, a100 on one with it, cpu otherwise.

    Asks torch (a second of start-up) only where an NVIDIA driver is installed: on a
    machine without one the answer is `cpu` whatever torch would say.
    """
    if not nvidia_driver_present():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "a100" if torch.cuda.is_bf16_supported() else "rtx2070"
    return "cpu"


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (a CUDA GPU may be there), without importing
    torch: Linux's /proc/driver/nvidia, or `nvidia-smi` on PATH (Windows, WSL2). macOS has
    no CUDA."""
    import shutil
    import sys

    if sys.platform == "darwin":
        return False
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


# --------------------------------------------------------------------------- layers


def _read_config(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise SettingsError(f"config file {path} does not exist", "check the --config path")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path} is not valid TOML: {e}", "fix the file") from None


def parse_set(items: list[str] | None) -> dict[str, tuple[Any, str]]:
    """`--set section.key=value` strings -> overrides (values parsed by the field type)."""
    out: dict[str, tuple[Any, str]] = {}
    for item in items or []:
        dotted, eq, value = item.partition("=")
        if not eq or "." not in dotted:
            raise SettingsError(f"--set {item!r} is not section.key=value", "e.g. --set train.lr=1e-3")
        out[dotted.strip()] = (value.strip(), "--set")
    return out


def load_settings(
    profile: str | None = None,
    config: str | os.PathLike | None = None,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve the layers into one frozen `Settings`.

    profile: a shipped profile name, a .toml path, `auto`, or None (TINYSTORY_PROFILE,
        else the config file's top-level `profile`, else `auto`).
    config: a TOML file; None = TINYSTORY_CONFIG, else the platformdirs config file.
    overrides: `section.key -> (value, source)` from the flags the user typed.
    """
    from tinystory import paths

    env = os.environ if env is None else env
    cfg_path = Path(config).expanduser() if config else paths.config_file()
    cfg = _read_config(cfg_path, required=config is not None)
    cfg_source = f"config:{cfg_path}"

    name = profile or env.get("TINYSTORY_PROFILE") or cfg.get("profile") or "auto"
    if not isinstance(name, str):
        raise SettingsError(f"profile in {cfg_source} must be a string", "e.g. profile = \"cpu\"")
    if name == "auto":
        name = detect_profile()
    table = read_profile(name)
    label = Path(name).stem if name.endswith(".toml") else name

    settings = Settings(profile=label)
    settings = _apply(settings, _flatten(table, f"profile:{label}", PROFILE_META))
    settings = _apply(settings, _flatten({k: v for k, v in cfg.items() if k != "profile"}, cfg_source))

    env_layer: dict[str, tuple[Any, str]] = {}
    for var, value in env.items():
        if var.startswith("TINYSTORY_") and "__" in var:
            section, _, key = var[len("TINYSTORY_") :].partition("__")
            env_layer[f"{section.lower()}.{key.lower()}"] = (value, f"env:{var}")
    settings = _apply(settings, env_layer)
    return _apply(settings, overrides or {})


# ------------------------------------------------------------------------ rendering


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def to_toml(settings: Settings, with_sources: bool = True) -> str:
    """The resolved settings as TOML (what `train` writes as settings.toml)."""
    lines = [f"profile = {_toml_value(settings.profile)}"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key, value in dataclasses.asdict(getattr(settings, section)).items():
            dotted = f"{section}.{key}"
            note = f"  # {settings.source(dotted)}" if with_sources and settings.source(dotted) != "default" else ""
            if value is None:
                lines.append(f"# {key} is unset{note}")
            else:
                lines.append(f"{key} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def from_toml(text: str, source: str = "settings.toml") -> Settings:
    """Settings read back from `to_toml` output (e.g. a run dir's settings.toml)."""
    table = tomllib.loads(text)
    name = table.pop("profile", "cpu")
    return _apply(Settings(profile=name), _flatten(table, source))


def explain(dotted: str) -> str:
    """The one-line 'why' of a setting."""
    section, key = dotted.split(".", 1)
    return _fields(section)[key].metadata.get("why", "")


def print_settings(settings: Settings, sections: list[str] | None = None) -> None:
    """A table of every value and where it came from, on stdout (it is the result)."""
    from rich.table import Table

    from tinystory.console import out

    table = Table(title=f"settings (profile {settings.profile})", title_justify="left")
    for col in ("key", "value", "source", "why"):
        table.add_column(col, overflow="fold")
    for section in sections or list(SECTIONS):
        for key, value in dataclasses.asdict(getattr(settings, section)).items():
            dotted = f"{section}.{key}"
            src = settings.source(dotted)
            style = "bold" if src != "default" else ""
            table.add_row(dotted, repr(value) if not isinstance(value, str) else value, src, explain(dotted),
                          style=style)
    out().print(table)
