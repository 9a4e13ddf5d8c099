"""Faults, counted: `kill -9` at random moments of every command that writes, and a full disk.

    python benchmarks/bench_faults.py [--kills 30] [--seed 0] [--out benchmarks/results/faults.json]

1. Training: an uninterrupted `train --profile tiny` run is the reference. Then `--kills`
   runs of the same command are killed with SIGKILL: most at a random moment of the run,
   the rest at chosen moments inside a checkpoint save (after its weights, after the
   optimizer state, after the old checkpoints were rotated, before the completion
   marker) and inside the final save. After each kill: the checkpoint `--resume` would
   pick (if any) must load, and `train --resume` (a fresh `train` when the kill came
   before the first checkpoint) must end with the reference's final eval loss.
2. Elsewhere: `prepare` (Mistral, 2 processes, the whole bundled sample), `quantize
   --method int8` and `gguf-q8_0`, `generate --out` and `push` to a stand-in Hub on
   127.0.0.1, each killed at random moments; the rerun must give the uninterrupted result
   (byte-identical shards, weights, files) and nothing partial may be picked up between.
3. A full disk: each writing command run with RLIMIT_FSIZE (the write fails with EFBIG):
   one line, exit 1, nothing half-written, and the previous checkpoint intact.

Every command runs as a user would run it (`python -m tinystory ...`, in its own
process). Prints a table and writes the counts as JSON, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import cpu_id, cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the stand-in Hub of the push tests

TRAIN = ["--profile", "tiny", "--max-steps", "60", "--set", "train.save_every=5", "--set", "train.eval_every=20",
         "--set", "train.log_every=5", "--set", "train.threads=1"]
# sitecustomize hooks: SIGKILL inside a checkpoint save, at a chosen point (the Trainer's own
# steps, patched from outside: no hook in the product)
SAVE_HOOK = """
import os, signal, sys
POINT = {point!r}
STEP = {step}
if sys.orig_argv[1:4] == ["-m", "tinystory", "train"]:
    import transformers.trainer as T
    from tinystory import callbacks, training

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if POINT in ("after-weights", "after-optimizer"):
        original = T.Trainer._save_optimizer_and_scheduler
        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == STEP and POINT == "after-weights":
                die()
            original(self, output_dir)
            if self.state.global_step == STEP and POINT == "after-optimizer":
                die()
        T.Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    if POINT == "before-marker":
        original_on_save = callbacks.CheckpointMarker.on_save
        def on_save(self, args, state, control, **kw):
            if state.global_step == STEP:
                die()
            return original_on_save(self, args, state, control, **kw)
        callbacks.CheckpointMarker.on_save = on_save
    if POINT == "final-save":
        original_save = training.save_model_atomic
        def save_model_atomic(model, tokenizer, run_dir):
            (run_dir / "config.json").write_text("{{partial")  # as if the rename of one file had happened
            die()
        training.save_model_atomic = save_model_atomic
"""
TARGETED = [("after-weights", 10), ("after-optimizer", 15), ("before-marker", 20), ("before-marker", 5),
            ("after-weights", 35), ("final-save", 0)]


def tinystory(args: list[str], env: dict[str, str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinystory", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]


def kill_after(args: list[str], env: dict[str, str], seconds: float) -> int:
    """Start `tinystory ARGS`, SIGKILL it after `seconds` (if still running); its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "tinystory", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: prepare's workers too
        proc.wait()
    return proc.returncode


def final_loss(run: Path) -> float:
    info = json.loads((run / "run.json").read_text())
    return float(info["last_eval"]["eval_loss"])


def checkpoint_loads(run: Path) -> bool | None:
    """The checkpoint `--resume` would pick loads (weights, optimizer; RNG state present); None: none yet."""
    import torch
    from transformers import AutoModelForCausalLM

    from tinystory.runs import latest_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None
    AutoModelForCausalLM.from_pretrained(str(ckpt))
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    return (ckpt / "rng_state.pth").stat().st_size > 0  # the Trainer's own format (numpy state: not loaded here)


# ---------------------------------------------------------------------- training


def train_faults(work: Path, env: dict[str, str], kills: int, rng: random.Random) -> dict:
    data = work / "data"
    r = tinystory(["prepare", "--profile", "tiny", "--out", str(data)], env)
    assert r.returncode == 0, r.stderr
    t0 = time.perf_counter()
    r = tinystory(["train", *TRAIN, "--data", str(data), "--out", str(work / "reference")], env)
    duration = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    reference = final_loss(work / "reference")
    trials = []
    plan = [("random", rng.uniform(4.0, duration), 0) for _ in range(kills - len(TARGETED))]
    plan += [(point, 0.0, step) for point, step in TARGETED]
    for i, (kind, seconds, step) in enumerate(plan):
        run = work / f"run-{i}"
        env_i = dict(env)
        if kind != "random":
            hooks = work / f"hooks-{i}"
            hooks.mkdir()
            (hooks / "sitecustomize.py").write_text(SAVE_HOOK.format(point=kind, step=step))
            env_i["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), env.get("PYTHONPATH")) if p)
            seconds = duration * 3
        code = kill_after(["train", *TRAIN, "--data", str(data), "--out", str(run)], env_i, seconds)
        loads = checkpoint_loads(run)
        resumed = tinystory(["train", "--resume", "--out", str(run), "--set", "train.threads=1"], env)
        fresh = False
        if resumed.returncode == 1 and ("has no complete checkpoint" in resumed.stderr
                                        or "does not exist" in resumed.stderr):
            fresh = True  # killed before the first checkpoint (or the run dir): train it again
            resumed = tinystory(["train", *TRAIN, "--data", str(data), "--out", str(run)], env)
        ok = resumed.returncode == 0 and abs(final_loss(run) / reference - 1) < 1e-4
        trials.append({"kind": kind, "kill_after_s": round(seconds, 2), "step": step, "exit": code,
                       "checkpoint_loads": loads, "fresh_start": fresh, "resumed": resumed.returncode == 0,
                       "final_eval_loss": final_loss(run) if resumed.returncode == 0 else None, "ok": ok,
                       "stderr": "" if ok else resumed.stderr[-500:]})
        print(f"train kill {i + 1}/{len(plan)} ({kind}, {seconds:.1f} s): resume {'ok' if ok else 'FAILED'}",
              file=sys.stderr)
        shutil.rmtree(run, ignore_errors=True)
    return {"reference_eval_loss": reference, "reference_s": round(duration, 1), "trials": trials,
            "survived": sum(t["ok"] for t in trials), "killed": len(trials),
            "checkpoints_that_did_not_load": sum(t["checkpoint_loads"] is False for t in trials)}


# ------------------------------------------------------------------ other commands


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file below `path` (or of the file), by relative name."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent if path.is_file() else path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def command_faults(name: str, args: Callable[[Path], list[str]], result: Callable[[Path], Path], work: Path,
                   env: dict[str, str], kills: int, rng: random.Random, stable: Callable[[Path], dict]) -> dict:
    """Kill `tinystory ARGS` at random moments; the rerun must equal the uninterrupted result."""
    base = work / f"{name}-reference"
    t0 = time.perf_counter()
    r = tinystory(args(base), env)
    duration = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    expected = stable(result(base))
    survived = picked_partial = 0
    for i in range(kills):
        out = work / f"{name}-{i}"
        kill_after(args(out), env, rng.uniform(0.5, duration))
        target = result(out)
        if target.exists():  # whatever the kill left must be either whole or refused
            try:
                partial = stable(target) != expected
            except (OSError, ValueError, KeyError):
                partial = True
            picked_partial += partial and _accepted(name, target, env)
        r = tinystory(args(out), env)
        survived += r.returncode == 0 and stable(result(out)) == expected
        print(f"{name} kill {i + 1}/{kills}: {'ok' if r.returncode == 0 else 'FAILED'}", file=sys.stderr)
    return {"killed": kills, "survived": survived, "partial_output_picked_up": picked_partial,
            "uninterrupted_s": round(duration, 2)}


def _accepted(name: str, target: Path, env: dict[str, str]) -> bool:
    """Would a later command take this (partial) output as valid?"""
    if name == "prepare":
        code = "from tinystory.data import open_prepared; import sys; open_prepared(sys.argv[1])"
    elif name.startswith("quantize"):
        code = "from tinystory.runs import Run; import sys; Run.open(sys.argv[1]).manifest"
    else:
        return False
    return subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True).returncode == 0


def other_faults(work: Path, env: dict[str, str], kills: int, rng: random.Random) -> dict:
    out: dict = {}
    run = work / "trained"
    r = tinystory(["train", "--profile", "tiny", "--max-steps", "20", "--out", str(run)], env)
    assert r.returncode == 0, r.stderr
    shards = ("train.bin", "val.bin", "tokenizer.json")
    out["prepare"] = command_faults(
        "prepare", lambda o: ["prepare", "--dataset", "sample", "--tokenizer", "mistral", "--num-proc", "2",
                              "--out", str(o)],
        lambda o: o, work, env, kills, rng, lambda p: {k: v for k, v in digest(p).items() if k in shards})
    out["quantize int8"] = command_faults(
        "quantize-int8", lambda o: ["quantize", str(run), "--method", "int8", "--out", str(o), "--profile", "tiny",
                                    "--set", "quantize.val_tokens=1024", "--set", "generate.threads=1"],
        lambda o: o, work, env, kills, rng, lambda p: {k: v for k, v in digest(p).items()
                                                       if k == "model-int8.safetensors"})
    out["quantize gguf-q8_0"] = command_faults(
        "quantize-gguf", lambda o: ["quantize", str(run), "--method", "gguf-q8_0", "--out", str(o / "m.gguf"),
                                    "--profile", "tiny", "--set", "quantize.val_tokens=1024"],
        lambda o: o / "m.gguf", work, env, kills, rng, digest)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(["Once upon a time", "The dog", "A little girl"] * 10) + "\n")
    out["generate --out"] = command_faults(
        "generate", lambda o: ["generate", "--run", str(run), "--prompts-file", str(prompts), "--greedy", "-n", "30",
                               "--out", str(o / "stories.jsonl")],
        lambda o: o / "stories.jsonl", work, env, kills, rng,
        lambda p: [json.loads(line)["story"] for line in p.read_text().splitlines()])
    out["push"] = push_faults(run, work, env, kills, rng)
    return out


def push_faults(run: Path, work: Path, env: dict[str, str], kills: int, rng: random.Random) -> dict:
    """`push` killed while it uploads (the stand-in Hub answers the commit late); the rerun
    must leave the Hub with every file of an uninterrupted push, in one commit each."""
    from hub_server import StandInHub

    token = "hf_faults_not_a_real_token"
    survived = 0
    with StandInHub(token=token) as hub:
        hub.delay["commit"] = 1.0
        env = {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HOME": str(work / "hf")}
        r = tinystory(["push", str(run), "learner/reference"], env)
        assert r.returncode == 0, r.stderr
        expected = {k: hashlib_hex(v) for k, v in hub.repos["learner/reference"].branches["main"].items()
                    if k != "README.md"}
        for i in range(kills):
            repo = f"learner/faults-{i}"
            kill_after(["push", str(run), repo], env, rng.uniform(0.3, 2.5))
            r = tinystory(["push", str(run), repo], env)
            files = hub.repos[repo].branches["main"] if repo in hub.repos else {}
            same = {k: hashlib_hex(v) for k, v in files.items() if k != "README.md"} == expected
            survived += r.returncode == 0 and same
            print(f"push kill {i + 1}/{kills}: {'ok' if r.returncode == 0 and same else 'FAILED'}", file=sys.stderr)
        assert token not in json.dumps([s.path for s in hub.seen])
    return {"killed": kills, "survived": survived, "partial_output_picked_up": 0}


def hashlib_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------- full disk


def full_disk(work: Path, env: dict[str, str]) -> dict:
    """Each writing command with a file-size limit: one line, exit 1, nothing half-written."""
    def limited(limit: int) -> Callable[[], None]:
        def set_limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return set_limit

    run = work / "disk-run"
    r = tinystory(["train", "--profile", "tiny", "--max-steps", "10", "--set", "train.save_every=5", "--out",
                   str(run)], env)
    assert r.returncode == 0, r.stderr
    before = digest(run / "checkpoints" / "checkpoint-10")
    prompts = work / "disk-prompts.txt"
    prompts.write_text("Once upon a time\n" * 40)
    cases = {
        "prepare": (["prepare", "--dataset", "sample", "--tokenizer", "mistral", "--out", str(work / "disk-p")],
                    lambda: not (work / "disk-p").exists() and not list(work.glob(".disk-p.*"))),
        "train checkpoint": (["train", "--resume", "--out", str(run), "--set", "train.max_steps=20"],
                             lambda: digest(run / "checkpoints" / "checkpoint-10") == before
                             and not [p for p in (run / "checkpoints").glob("checkpoint-*")
                                      if not (p / "complete.json").is_file()]),
        "quantize": (["quantize", str(run), "--method", "int8", "--out", str(work / "disk-q"), "--profile", "tiny"],
                     lambda: not (work / "disk-q").exists() and not list(work.glob(".disk-q.*"))),
        "generate --out": (["generate", "--run", str(run), "--prompts-file", str(prompts), "--greedy", "-n", "40",
                            "--out", str(work / "disk.jsonl")],
                           lambda: not (work / "disk.jsonl").exists() and not list(work.glob(".disk.jsonl.*"))),
    }
    limits = {"quantize": 100 * 1024, "generate --out": 4 * 1024}  # the tiny model's outputs are small
    out = {}
    for name, (args, clean) in cases.items():
        r = subprocess.run([sys.executable, "-m", "tinystory", *args], env=env, capture_output=True, text=True,
                           preexec_fn=limited(limits.get(name, 256 * 1024)), timeout=600)
        lines = r.stderr.strip().splitlines()
        one_line = len([x for x in lines if x.startswith(("error", "Traceback"))]) == 1 and lines[-1].startswith(
            "error: ")
        out[name] = {"exit": r.returncode, "one_line": one_line, "clean": bool(clean()),
                     "message": lines[-1] if lines else ""}
        print(f"full disk, {name}: exit {r.returncode}: {out[name]['message']}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30, help="kill points in training (the other commands: a third)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "TINYSTORY_PLAIN": "1", "HF_HUB_OFFLINE": "1", "TINYSTORY_CACHE_DIR": str(work / "cache"),
               "TINYSTORY_RUNS_DIR": str(work / "runs"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        result = {"cpu": cpu_name(), "cpu_id": cpu_id(), "cores": os.cpu_count(), "seed": args.seed,
                  "training": train_faults(work, env, args.kills, rng),
                  "commands": other_faults(work, env, max(3, args.kills // 3), rng),
                  "full_disk": full_disk(work, env)}
    t, c = result["training"], result["commands"]
    print(f"\nCPU: {result['cpu']} ({result['cpu_id']})")
    print("| fault | injected | survived | partial output picked up |\n|---|---:|---:|---:|")
    print(f"| kill -9 during train | {t['killed']} | {t['survived']} | {t['checkpoints_that_did_not_load']} |")
    for name, v in c.items():
        print(f"| kill -9 during {name} | {v['killed']} | {v['survived']} | {v['partial_output_picked_up']} |")
    for name, v in result["full_disk"].items():
        print(f"| full disk during {name} | 1 | {int(v['exit'] == 1 and v['one_line'] and v['clean'])} | 0 |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
