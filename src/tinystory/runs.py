"""Runs: the one artifact that `train` writes and eval, generate, quantize, serve and push read.

A run dir is a standard Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer files) plus settings.toml, run.json, metrics.jsonl,
eval.json and checkpoints/. `Run.open` turns what the user typed (a path, a checkpoint, a
quantized folder or .gguf file inside a run, `latest`, or a hub id) into a `Run`, and every
reader asks the `Run` for what it holds: its settings, run.json, eval.json, the prepared
data it was trained on, the kind of its weights, its latest checkpoint. A checkpoint or a
quantized model finds the run dir's files up to two folders up.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from tinystory import paths
from tinystory.data import PreparedData, open_prepared
from tinystory.errors import DataError, QuantizationError, RunError
from tinystory.net import from_hub
from tinystory.settings import SAMPLING_KEYS, Settings, from_toml
from tinystory.tokenizer import fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RUN_JSON = "run.json"
EVAL_JSON = "eval.json"
SETTINGS_TOML = "settings.toml"
MANIFEST = "quantization.json"  # in a quantized folder; `<name>.json` beside a .gguf file
COMPLETE = "complete.json"  # written last into a checkpoint: only these are resumed from


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run dir, or None."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    found = [p for p in root.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name[11:].isdigit()]
    return max(found, key=lambda p: int(p.name[11:]), default=None)


def rotate_checkpoints(root: Path, keep: int) -> None:
    """Remove the checkpoints under `root` that never got their completion marker (a crash
    in a save; nothing reads them) and the oldest complete ones beyond `keep` (0 = all)."""
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    complete = sorted((p for p in found if (p / COMPLETE).is_file()), key=lambda p: int(p.name[11:]))
    old = complete[:-keep] if keep > 0 else []
    for p in [p for p in found if p not in complete] + old:
        shutil.rmtree(p, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def download_run(repo_id: str) -> Path:
    """snapshot_download a model repo (weights, config, tokenizer), failing fast offline."""

    def fetch() -> Path:
        allow = ["*.json", "*.safetensors", "*.toml", "*.md", "*.txt", "tokenizer.model"]
        return Path(snapshot_download(repo_id, allow_patterns=allow))

    return from_hub(fetch, f"model {repo_id}", "pass a local run dir instead")


def display_name(path: Path) -> str:
    """A readable name: the run dir's name, `run/checkpoint-N`, or a hub snapshot's repo id."""
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    hub = [p for p in path.parts if p.startswith("models--")]  # models--user--name/snapshots/<sha>
    if hub:
        return hub[0].removeprefix("models--").replace("--", "/")
    return path.name


@dataclass(frozen=True)
class Run:
    """A trained model on this machine: a run dir, one of its checkpoints, a quantized
    folder or a .gguf file (`path`), with what it was made with."""

    path: Path
    local: bool = True  # False: a hub download (read-only cache; no eval.json written there)

    @classmethod
    def open(cls, ref: str | Path | None) -> Run:
        """The run `ref` names: a path, `latest`/None (the newest run), or a hub id."""
        if ref is None or str(ref) in ("", "latest"):
            return cls(latest_run())
        path = Path(ref).expanduser()
        if path.exists():
            if path.is_file():
                if path.suffix == ".gguf":
                    return cls(path)
                raise RunError(f"{path} is a file, not a run dir", "pass the folder that holds config.json")
            if path.parent.name == "checkpoints" and path.name.startswith("checkpoint-") and \
                    not (path / COMPLETE).is_file():
                raise RunError(f"checkpoint {path} is incomplete (it has no {COMPLETE}: its save did not finish)",
                               "pass the run dir or another checkpoint")
            if has_model(path) or (path / MANIFEST).is_file():
                return cls(path)
            if (path / "config.json").is_file() and list(path.glob("*.bin")):
                raise RunError(f"{path} holds pickle weights (.bin), which tinystory never loads",
                               "convert them to model.safetensors with transformers (save_pretrained)")
            missing = "config.json" if not (path / "config.json").is_file() else "model.safetensors"
            raise RunError(f"{path} holds no trained model ({missing} is missing)",
                           "train first, or pass a run dir or one of its checkpoints")
        if HUB_ID.match(str(ref)):  # (a letter or digit first: never ".", "/" or "~")
            try:
                validate_repo_id(str(ref))  # no "..", "--" or other names the Hub refuses
            except HFValidationError:
                raise RunError(f"{ref} is not a valid Hub model id", "use owner/name, or a local run dir") from None
            return cls(download_run(str(ref)), local=False)
        raise RunError(f"run {ref} does not exist", "pass a run dir, a checkpoint, a .gguf file or a hub id")

    @classmethod
    def trained(cls, ref: str | Path | None) -> Run:
        """A local run dir that holds a trained model (what `push` publishes)."""
        if ref is None or str(ref) in ("", "latest"):
            return cls(latest_run())
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise RunError(f"run dir {path} does not exist", "pass the folder `tinystory train` wrote")
        if not has_model(path):
            missing = "config.json" if not (path / "config.json").is_file() else "model.safetensors"
            raise RunError(f"{path} holds no trained model ({missing} is missing)",
                           "train first with `tinystory train`, then push its run dir")
        return cls(path.resolve())

    # ------------------------------------------------------------------ what it is

    @property
    def name(self) -> str:
        """How messages, tables and the server name it."""
        return display_name(self.path)

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @property
    def is_quantized(self) -> bool:
        """A quantized folder (int8, bnb) or a .gguf file."""
        return self.is_gguf or (self.path / MANIFEST).is_file()

    @property
    def weights(self) -> str:
        """`fp32` for a run dir or checkpoint, else the quantization method that made it."""
        if not self.is_quantized:
            return "fp32"
        return str(read_json(self._manifest_file).get("method", "quantized"))

    @property
    def _manifest_file(self) -> Path:
        return self.path.with_suffix(".json") if self.is_gguf else self.path / MANIFEST

    @property
    def manifest(self) -> dict[str, Any]:
        """quantization.json of a quantized folder, or the `<name>.json` beside a .gguf file."""
        f = self._manifest_file
        if not f.is_file():
            raise QuantizationError(f"{self.path} is not a quantized model ({f.name} is missing)",
                                    "quantize the run again")
        return json.loads(f.read_text(encoding="utf-8"))

    # ------------------------------------------------------------ what it was made with

    def find(self, name: str) -> Path | None:
        """`name` in the run's folder or up to two folders up, so a checkpoint
        (run/checkpoints/checkpoint-N), a quantized folder (run/quantized/int8) or a .gguf
        file finds the run dir's run.json and settings.toml."""
        folder = self.path if self.path.is_dir() else self.path.parent
        for f in (folder, folder.parent, folder.parent.parent):
            if (f / name).is_file():
                return f / name
        return None

    @cached_property
    def settings(self) -> Settings | None:
        """The settings it was trained with (settings.toml), if it has them."""
        f = self.find(SETTINGS_TOML)
        return from_toml(f.read_text(encoding="utf-8"), str(f)) if f else None

    @cached_property
    def info(self) -> dict[str, Any]:
        """run.json ({} when there is none)."""
        f = self.find(RUN_JSON)
        return read_json(f) if f else {}

    @property
    def data_path(self) -> str | None:
        """The prepared-data folder it was trained on (run.json's data.path), if recorded."""
        data = self.info.get("data")
        return (data.get("path") or None) if isinstance(data, dict) else None

    def data(self, tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None) -> PreparedData:
        """The prepared data at `path` (default: the data it was trained on), refused in one
        line when its tokenizer is not this run's."""
        where = path or self.data_path
        if where is None:
            raise DataError(f"no prepared data known for run {self.path.name} (it has no run.json naming it)",
                            "pass --data with the prepared folder it was trained on")
        data = open_prepared(where)
        ours = fingerprint(tokenizer)
        if data.tokenizer_sha256 != ours:
            raise DataError(
                f"prepared data {data.path} uses tokenizer {data.tokenizer_name} "
                f"({data.tokenizer_sha256[:12]}), not the tokenizer of run {self.path.name} ({ours[:12]})",
                "pass --data with the folder the run was trained on",
            )
        data.check_ids("val", len(tokenizer))
        return data

    def block_size(self, default: int, limit: int | None = None) -> int:
        """Training's block size (its settings.toml, else `default`), capped at `limit`
        (the model's positions)."""
        size = self.settings.train.block_size if self.settings else default
        return min(size, limit) if limit else size

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from generation_config.json (the keys it actually sets)."""
        folder = self.path if self.path.is_dir() else self.path.parent
        data = read_json(folder / "generation_config.json")
        return {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}

    @property
    def eval_results(self) -> dict[str, Any] | None:
        """eval.json of this folder, or None."""
        f = self.path / EVAL_JSON
        return (read_json(f) or None) if f.is_file() else None

    def weights_sha256(self) -> str:
        """sha256 over the weight files (safetensors / gguf), in name order."""
        p = self.path
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".gguf"))
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        return h.hexdigest()

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)
