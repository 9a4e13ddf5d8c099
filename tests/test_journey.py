"""The learner's whole journey through the installed `tinystory` command, end to end.

prepare -> train -> eval --metrics distinct-n -> generate -> quantize (int8, gguf-q8_0)
-> push --dry-run, on the tiny profile with real text, checking every artifact the next
step needs and every exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def tinystory(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("tinystory") or f"{sys.executable} -m tinystory"
    cmd = [*exe.split(), *args] if " " in exe else [exe, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"tinystory {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_journey(tmp_path: Path) -> None:
    env = {**os.environ, "TINYSTORY_PLAIN": "1", "COLUMNS": "200"}
    data, run = tmp_path / "data", tmp_path / "run"

    r = tinystory("prepare", "--profile", "tiny", "--out", str(data), env=env)
    assert Path(r.stdout.strip().splitlines()[-1]) == data
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["stories"] > 0 and (data / "train.bin").stat().st_size > 0

    r = tinystory("train", "--profile", "tiny", "--data", str(data), "--out", str(run), "--max-steps", "30", env=env)
    assert Path(r.stdout.strip().splitlines()[-1]) == run
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "settings.toml",
              "metrics.jsonl", "run.json"):
        assert (run / f).is_file(), f

    r = tinystory("eval", str(run), "--metrics", "distinct-n", "--num-samples", "4", "--json", env=env)
    result = json.loads(r.stdout)
    assert 0 < result["metrics"]["distinct-1"] <= 1 if "metrics" in result else True
    assert (run / "eval.json").is_file()

    r = tinystory("generate", "Once upon a time", "--run", str(run), "--greedy", "--max-new-tokens", "20", env=env)
    assert r.stdout.startswith("Once upon a time") or len(r.stdout.strip()) > 0

    r = tinystory("quantize", str(run), "--method", "int8", env=env)
    int8 = Path(r.stdout.strip().splitlines()[-1])
    assert (int8 / "quantization.json").is_file()
    r = tinystory("generate", "Once upon a time", "--run", str(int8), "--greedy", "--max-new-tokens", "10", env=env)
    assert r.stdout.strip()

    r = tinystory("quantize", str(run), "--method", "gguf-q8_0", env=env)
    gguf = Path(r.stdout.strip().splitlines()[-1])
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 0

    r = tinystory("push", str(run), "someone/tiny-stories", "--dry-run", env={**env, "HF_TOKEN": "hf_not_a_real_token"})
    assert "model.safetensors" in r.stdout and "README.md" in r.stdout
    assert "hf_not_a_real_token" not in r.stdout + r.stderr
