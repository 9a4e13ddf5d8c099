"""Run dirs: the one artifact that train writes and eval, generate, quantize and push read.

A run dir is a standard Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer files) plus settings.toml, metrics.jsonl and
checkpoints/. `resolve_run` turns what the user typed (a path, a checkpoint, `latest`,
or a hub id) into a local folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from tinystory import paths
from tinystory.errors import RunError

if TYPE_CHECKING:
    from tinystory.settings import Settings

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def has_model(path: Path) -> bool:
    """Does `path` hold a loadable HF model (config + safetensors weights)?"""
    return (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHTS)


def latest_run(root: Path | None = None) -> Path:
    """The most recently trained run under the runs dir."""
    root = root or paths.runs_dir()
    runs = [p for p in root.iterdir() if p.is_dir() and has_model(p)] if root.is_dir() else []
    if not runs:
        raise RunError(f"no trained run in {root}", "train one with `tinystory train`, or pass a run dir")
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime)


def resolve_run(ref: str | Path | None) -> Path:
    """A local folder (or .gguf file) for `ref`: a path, `latest`/None, or a hub id."""
    if ref is None or str(ref) in ("", "latest"):
        return latest_run()
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return path
            raise RunError(f"{path} is a file, not a run dir", "pass the folder that holds config.json")
        if has_model(path) or (path / "quantization.json").is_file():
            return path
        missing = "config.json" if not (path / "config.json").is_file() else "model.safetensors"
        raise RunError(f"{path} holds no trained model ({missing} is missing)",
                       "train first, or pass a run dir or one of its checkpoints")
    if HUB_ID.match(str(ref)) and not str(ref).startswith((".", "/", "~")):
        return download_run(str(ref))
    raise RunError(f"run {ref} does not exist", "pass a run dir, a checkpoint, a .gguf file or a hub id")


def download_run(repo_id: str) -> Path:
    """snapshot_download a model repo (weights, config, tokenizer), failing fast offline."""
    from tinystory.net import from_hub

    def fetch() -> Path:
        from huggingface_hub import snapshot_download

        allow = ["*.json", "*.safetensors", "*.toml", "*.md", "*.txt", "tokenizer.model"]
        return Path(snapshot_download(repo_id, allow_patterns=allow))

    return from_hub(fetch, f"model {repo_id}", "pass a local run dir instead")


def run_settings(run: Path) -> Settings | None:
    """The settings a run was trained with (settings.toml), if it has them."""
    from tinystory.settings import from_toml

    f = run / "settings.toml"
    return from_toml(f.read_text(encoding="utf-8"), str(f)) if f.is_file() else None
