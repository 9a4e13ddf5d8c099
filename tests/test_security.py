"""Security defaults: no secret in any output or file, no code or pickle from a model folder.

(The server's own defaults, loopback binding and paths in requests, are in test_serve_load.py;
damaged and hostile model folders in test_bad_inputs.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRETS = {"HF_TOKEN": "hf_secretTOKENvalue1234567890", "WANDB_API_KEY": "wandbsecretKEY0123456789abcdef01",
           "OPENAI_API_KEY": "sk-secretOPENAIkey0123456789"}


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "tinystory", *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


@pytest.mark.slow
def test_no_secret_in_any_output_or_file(tmp_path: Path) -> None:
    # guards tokens and keys that reach tinystory through the environment: printed settings,
    # a push's listing and its upload folder, training's logs, run dir and the W&B files
    env = {**os.environ, **SECRETS, "WANDB_BASE_URL": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_MODE", None)  # logged in by key, W&B unreachable: an offline run
    env.pop("WANDB_DIR", None)  # its files go into the run dir, where this test reads them
    outputs = []
    for args in (["train"], ["push", "latest", "someone/x"], ["config", "show"]):
        extra = [] if args[0] == "config" else ["--print-settings"]
        r = run(*args, "--profile", "tiny", *extra, env=env, cwd=tmp_path)
        outputs.append(r.stdout + r.stderr)
    run_dir = tmp_path / "run"
    r = run("train", "--profile", "tiny", "--max-steps", "3", "--out", str(run_dir), "--wandb", env=env, cwd=tmp_path)
    outputs.append(r.stdout + r.stderr)
    assert "W&B offline" in r.stderr
    r = run("push", str(run_dir), "someone/tiny-stories", "--dry-run", env=env, cwd=tmp_path)
    outputs.append(r.stdout + r.stderr)
    assert leaks("\n".join(outputs)) == []
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "README.md" for p in files)  # what was checked
    assert [str(p) for p in files if leaks(p.read_bytes().decode("utf-8", "replace"))] == []


def test_no_product_code_unpickles() -> None:
    # guards against a torch.load / pickle.load creeping into the product: weights are
    # safetensors only (a folder with pickle weights is refused: test_bad_inputs.py)
    src = Path(__file__).resolve().parents[1] / "src" / "tinystory"
    found = [f"{p.name}:{i}" for p in src.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if ("torch.load(" in line or "pickle.load" in line) and not line.lstrip().startswith("#")]
    assert found == []
