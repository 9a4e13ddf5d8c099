"""Release 0.1.0: the learner's whole journey, from a wheel in a fresh virtualenv.

The module builds the sdist and the wheel (`python -m build`), checks them with `twine
check` and by their contents, installs the wheel into a new virtualenv (CPU torch first,
as the README says), and drives that installed `tinystory` command through prepare ->
train -> eval --metrics distinct-n -> generate -> quantize (int8, gguf-q8_0) -> push
--dry-run on the tiny profile with real text, checking every artifact the next step needs
and every exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tinystory

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel of this checkout (no build isolation: setuptools and wheel come with
    the dev extra, so the build needs no network)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)])
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def tinystory_exe(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tinystory` of the wheel installed into a fresh virtualenv: CPU torch (the version
    this suite runs with) first, then the wheel with its dependencies."""
    import torch

    venv = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, f"torch=={torch.__version__.split('+')[0]}"])
    run([*pip, str(dists["wheel"])])
    return venv / "bin" / "tinystory"


@pytest.mark.slow
def test_dists_pass_twine_and_carry_what_they_must(dists: dict[str, Path]) -> None:
    v = tinystory.__version__
    assert dists["wheel"].name == f"tinystory_llm-{v}-py3-none-any.whl"
    assert dists["sdist"].name == f"tinystory_llm-{v}.tar.gz"
    r = run([sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])])
    assert r.stdout.count("PASSED") == 2, r.stdout
    wheel = set(zipfile.ZipFile(dists["wheel"]).namelist())
    for f in ("py.typed", "profiles/tiny.toml", "profiles/cpu.toml", "profiles/rtx2070.toml", "profiles/a100.toml",
              "sample/train.txt.gz", "sample/valid.txt.gz", "sample/LICENSE-CDLA-Sharing-1.0.txt",
              "sample/README.md", "web/index.html", "cli/app.py"):
        assert f"tinystory/{f}" in wheel, f
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in wheel)
    entry = zipfile.ZipFile(dists["wheel"]).read(f"tinystory_llm-{v}.dist-info/entry_points.txt").decode()
    assert "tinystory = tinystory.cli.app:main" in entry
    top = f"tinystory_llm-{v}/"
    with tarfile.open(dists["sdist"]) as tar:
        sdist = {n.removeprefix(top) for n in tar.getnames()}
    for f in ("CHANGELOG.md", "README.md", "LICENSE", "pyproject.toml", "completions/tinystory.bash",
              "completions/_tinystory", "completions/tinystory.fish", "tests/conftest.py", "tests/test_journey.py",
              "src/tinystory/sample/LICENSE-CDLA-Sharing-1.0.txt", "src/tinystory/py.typed"):
        assert f in sdist, f


@pytest.mark.slow
def test_journey(tinystory_exe: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TINYSTORY_PLAIN": "1", "COLUMNS": "200"}
    data, run_dir = tmp_path / "data", tmp_path / "run"

    def tinystory_(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run([str(tinystory_exe), *args], env={**env, **(extra_env or {})}, cwd=tmp_path)

    r = tinystory_("--version")
    assert r.stdout.strip() == f"tinystory {tinystory.__version__}"
    r = run([str(tinystory_exe.parent / "python"), "-c", "import tinystory; print(tinystory.__file__)"])
    assert "site-packages" in r.stdout  # the wheel's copy, not this checkout

    r = tinystory_("prepare", "--profile", "tiny", "--out", str(data))
    assert r.stdout.strip().splitlines()[-1] == str(data)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["stories"] > 500 and meta["splits"]["val"]["stories"] > 0
    assert (data / "train.bin").stat().st_size == 2 * meta["splits"]["train"]["tokens"]  # uint16

    r = tinystory_("train", "--profile", "tiny", "--data", str(data), "--out", str(run_dir), "--max-steps", "30")
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "settings.toml",
              "metrics.jsonl", "run.json"):
        assert (run_dir / f).is_file(), f
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == 30 and info["data"]["path"] == str(data)
    losses = [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert losses[-1] < losses[0] - 0.5  # it learned on real text

    r = tinystory_("eval", str(run_dir), "--metrics", "distinct-n", "--num-samples", "4", "--json")
    distinct = json.loads(r.stdout)["metrics"]
    assert 0 < distinct["distinct-1"] <= 1 and 0 < distinct["distinct-2"] <= 1
    assert json.loads((run_dir / "eval.json").read_text())["metrics"]["distinct-1"] == distinct["distinct-1"]

    r = tinystory_("generate", "Once upon a time", "--run", str(run_dir), "--greedy", "--max-new-tokens", "20")
    assert r.stdout.startswith("Once upon a time") and len(r.stdout.rstrip("\n")) > len("Once upon a time")
    assert "20 tokens in" in r.stderr and "ended by length" in r.stderr  # 30 steps: not yet a storyteller

    r = tinystory_("quantize", str(run_dir), "--method", "int8")
    int8 = Path(r.stdout.strip().splitlines()[-1])
    assert int8 == run_dir / "quantized" / "int8" and (int8 / "quantization.json").is_file()
    r = tinystory_("generate", "Once upon a time", "--run", str(int8), "--greedy", "--max-new-tokens", "10")
    assert r.stdout.startswith("Once upon a time") and "10 tokens in" in r.stderr

    r = tinystory_("quantize", str(run_dir), "--method", "gguf-q8_0")
    gguf = Path(r.stdout.strip().splitlines()[-1])
    assert gguf == run_dir / "quantized" / "run-q8_0.gguf" and gguf.stat().st_size > 0
    assert json.loads(gguf.with_suffix(".json").read_text())["method"] == "gguf-q8_0"

    r = tinystory_("push", str(run_dir), "someone/tiny-stories", "--dry-run",
                   extra_env={"HF_TOKEN": "hf_not_a_real_token"})
    assert "model.safetensors" in r.stdout and "README.md" in r.stdout
    assert "hf_not_a_real_token" not in r.stdout + r.stderr


@pytest.mark.slow
def test_rtx2070_journey_without_extras(tinystory_exe: Path, tmp_path: Path) -> None:
    """The RTX 2070 owner's path from the same plain install (no extras), as far as a CPU
    goes: the Mistral tokenizer shipped in the wheel (no mistral-common, no conversion),
    the memory plan, a few steps of the 40M preset, and W&B offline."""
    py = tinystory_exe.parent / "python"
    r = run([str(py), "-c", "import importlib.util as u; print([m for m in ('mistral_common', 'bitsandbytes', "
             "'wandb', 'fastapi', 'llama_cpp') if u.find_spec(m)])"])
    assert r.stdout.strip() == "['bitsandbytes', 'wandb']"  # core dependencies; the extras stay out
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"TINYSTORY_PLAIN": "1", "COLUMNS": "200", "HOME": str(home), "WANDB_API_KEY": ""})
    env.pop("WANDB_API_KEY")

    def tinystory_(*args: str) -> subprocess.CompletedProcess:
        return run([str(tinystory_exe), *args], env=env, cwd=tmp_path)

    data = tmp_path / "mistral-data"
    r = tinystory_("prepare", "--profile", "rtx2070", "--dataset", "sample", "--max-stories", "200",
                   "--out", str(data))
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["tokenizer"]["name"], meta["tokenizer"]["vocab_size"], meta["splits"]["train"]["stories"]) == (
        "mistral", 32000, 200)
    import sentencepiece as spm
    from conftest import sample_stories

    from tinystory.tokenizer import mistral_model_file

    expected = spm.SentencePieceProcessor(model_file=str(mistral_model_file())).encode(sample_stories("train", 1)[0])
    stream = np.fromfile(data / "train.bin", dtype=np.uint16, count=len(expected) + 2).tolist()
    assert stream == [1, *expected, 2]  # BOS + the first story + EOS, sentencepiece's ids

    r = tinystory_("train", "--profile", "rtx2070", "--dry-run")
    assert "40,609,152 params" in r.stdout + r.stderr and "fits" in r.stdout + r.stderr

    run_dir = tmp_path / "run40m"
    r = tinystory_("train", "--profile", "rtx2070", "--data", str(data), "--out", str(run_dir), "--precision", "fp32",
                   "--max-steps", "3", "--set", "train.batch_size=2", "--set", "train.block_size=128",
                   "--set", "train.eval_tokens=2048", "--set", "train.dataloader_workers=0", "--wandb")
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)
    assert "optimizer: torch AdamW (8-bit AdamW steps ~30x slower on a CPU)" in r.stderr
    assert "W&B offline: not logged in" in r.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == 3 and info["precision"] == "fp32"
    assert list(run_dir.glob("wandb/offline-run-*")), "no offline W&B run folder"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (12, 384, 32000)
