"""The one device choice (CUDA, an Apple GPU through MPS, or the CPU), precision per device,
the memory plan on a Mac, and the POSIX-only calls a Windows machine must not make.

There is no Mac and no Windows machine here: every MPS and Windows branch runs with torch's
availability checks (or `sys.platform`) monkeypatched; nothing below ran on real Apple
hardware (the README says so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tinystory import loading, memory, precision
from tinystory.cli.app import main
from tinystory.errors import SettingsError, TrainingError
from tinystory.settings import load_settings


def machine(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, macos14: bool = True) -> None:
    """Pretend this machine has (or lacks) a CUDA GPU and an Apple GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA GeForce RTX 2070")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)


@pytest.mark.parametrize("cuda,mps,device,why", [
    (True, True, "cuda", "auto: a CUDA GPU (NVIDIA GeForce RTX 2070) is here"),
    (True, False, "cuda", "auto: a CUDA GPU (NVIDIA GeForce RTX 2070) is here"),
    (False, True, "mps", "auto: no CUDA GPU, and an Apple GPU (MPS) is here"),
    (False, False, "cpu", "auto: no CUDA GPU and no Apple GPU (MPS) here"),
])
def test_auto_takes_cuda_then_mps_then_cpu_and_says_why(monkeypatch, cuda, mps, device, why):
    machine(monkeypatch, cuda, mps)
    assert loading.device_choice("auto") == (device, why)
    assert loading.device_choice("cpu") == ("cpu", "asked for cpu")  # the CPU is always there


@pytest.mark.parametrize("asked,built,message", [
    ("mps", False, "the device is mps but this torch was built without MPS (use --device auto (or cpu))"),
    ("mps", True, "the device is mps but this machine has no Apple GPU or its macOS is too old for this torch "
                  "(use --device auto (or cpu))"),
    ("cuda", False, "the device is cuda but no CUDA GPU is visible (use --device auto (or cpu))"),
    ("tpu", False, "unknown device 'tpu' (use one of: auto, cpu, cuda, mps)"),
])
def test_a_device_that_is_not_here_is_one_line(monkeypatch, asked, built, message):
    machine(monkeypatch, cuda=False, mps=False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    with pytest.raises(SettingsError) as e:
        loading.device_choice(asked)
    assert str(e.value) == message


@pytest.mark.parametrize("command", [["generate", "Once", "--device", "mps"], ["train", "--device", "mps"],
                                     ["serve", "--device", "mps"], ["eval", "--device", "mps"]])
def test_the_flag_and_the_setting_give_the_same_answer(monkeypatch, capsys, command, random_run):
    # no MPS here: every command refuses it in one line, whether asked by flag or by setting
    machine(monkeypatch, cuda=False, mps=False)
    section = {"serve": "generate"}.get(command[0], command[0])
    by_setting = [*command[:-2], "--set", f"{section}.device=mps"]
    errors = []
    for args in (command, by_setting):
        extra = {"generate": ["--run", str(random_run)], "serve": [str(random_run)],
                 "eval": [str(random_run), "--metrics", "length"]}.get(args[0],
                                                                       ["--profile", "tiny", "--max-steps", "1"])
        with pytest.raises(SystemExit) as e:
            main([*args, *extra])
        errors.append((e.value.code, capsys.readouterr().err.strip().splitlines()[-1]))
    assert errors[0] == errors[1]
    assert errors[0][0] == 1 and errors[0][1].startswith("error: the device is mps but this torch was built without")
    with pytest.raises(SystemExit):
        main([*command[:-2], "--device", "tpu"])
    assert capsys.readouterr().err.strip().endswith(
        f"{section}.device = 'tpu' (from --device) is not one of auto, cpu, cuda, mps (did you mean 'cpu'?)")


# ------------------------------------------------------------------------- precision


def test_precision_per_device(monkeypatch):
    # what each device may train in, and what `auto` probes there (the probe itself faked)
    machine(monkeypatch, cuda=False, mps=True)
    probed = []

    def fake_probe(model, shape, steps=2, names=("fp32", "bf16"), device="cpu"):
        probed.append((device, names))
        return {name: {"fp32": 30.0, "fp16": 10.0, "bf16": 20.0}[name] for name in names}

    monkeypatch.setattr(precision, "probe", fake_probe)
    model = object()
    chosen = precision.resolve("auto", "mps", model)
    assert (chosen.name, chosen.reason) == ("fp16", "auto: fp16 trained 2.00x faster than bf16 on this Apple GPU "
                                                    "(10 vs 20 ms a step in a short probe)")
    assert precision.resolve("auto", "cpu", model).name == "bf16"  # fp16 is never probed on a CPU
    machine(monkeypatch, cuda=False, mps=True, macos14=False)
    precision.resolve("auto", "mps", model)
    assert probed == [("mps", ("fp32", "fp16", "bf16")), ("cpu", ("fp32", "bf16")), ("mps", ("fp32", "fp16"))]
    assert precision.resolve("fp16", "mps").name == "fp16"  # loss-scaled on MPS (torch >= 2.8)
    monkeypatch.setattr(torch, "__version__", "2.7.1")  # accelerate has no MPS loss scaler before 2.8
    assert precision.resolve("auto", "mps", model).reason == "auto: the only precision this torch trains in on mps"
    assert len(probed) == 3  # nothing to choose between: no probe
    with pytest.raises(TrainingError, match=r"fp16 training on an Apple GPU needs torch 2.8 or newer \(its loss "
                                            r"scaler\), this is 2.7.1"):
        precision.resolve("fp16", "mps")
    with pytest.raises(TrainingError, match="bf16 on an Apple GPU needs macOS 14 or newer"):
        precision.resolve("bf16", "mps")
    with pytest.raises(TrainingError, match="fp16 training needs a CUDA GPU"):
        precision.resolve("fp16", "cpu")
    assert loading.pick_dtype("mps", "auto") == "fp32"  # decoding: the safe choice, nothing measured on a Mac
    with pytest.raises(SettingsError, match="bf16 on an Apple GPU needs macOS 14"):
        loading.pick_dtype("mps", "bf16")


@pytest.mark.parametrize("seconds,calls,ms,why", [
    # no native bf16 (a Zen 1 EPYC: 13.6 s against 1.1 s): bf16 runs its warm-up step only
    ({"fp32": [1.2, 1.1, 1.0], "bf16": [13.6]}, ["fp32", "bf16", "fp32", "fp32"],
     {"fp32": 1100.0, "bf16": 13600.0}, "fp32 trained 12.36x faster than bf16 on this CPU (1100 vs 13600 ms"),
    # a close race (bf16 at 0.55x fp32 on a Xeon) is timed in full, alternating
    ({"fp32": [0.6, 0.5, 0.4], "bf16": [1.0, 0.9, 0.8]}, ["fp32", "bf16"] * 3, {"fp32": 500.0, "bf16": 900.0},
     "fp32 trained 1.80x faster than bf16 on this CPU (500 vs 900 ms"),
    # the first precision bears the cold start: timed even when its warm-up is 10x the fastest
    ({"fp32": [5.0, 0.4, 0.4], "bf16": [0.5, 0.3, 0.3]}, ["fp32", "bf16"] * 3, {"fp32": 400.0, "bf16": 300.0},
     "bf16 trained 1.33x faster than fp32 on this CPU (300 vs 400 ms"),
])
def test_the_probe_times_a_far_slower_precision_once(monkeypatch, seconds, calls, ms, why):
    left = {name: list(s) for name, s in seconds.items()}
    made = []

    def fake_step(model, ids, name, device):
        made.append(name)
        return left[name].pop(0)

    monkeypatch.setattr(precision, "_step", fake_step)
    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(vocab_size=10)
    assert precision.probe(model, (2, 8)) == pytest.approx(ms)
    assert made == calls and model.training
    left.update({name: list(s) for name, s in seconds.items()})
    assert precision.resolve("auto", "cpu", model).reason == f"auto: {why} a step in a short probe)"


@pytest.mark.parametrize("cpu_ms,mps_ms,device", [(10.0, 40.0, "cpu"), (40.0, 10.0, "mps")])
def test_auto_trains_on_the_apple_gpu_only_when_the_probe_finds_it_faster(monkeypatch, cpu_ms, mps_ms, device):
    from tinystory import training

    machine(monkeypatch, cuda=False, mps=True)
    moves = []

    class Model:
        def to(self, where):
            moves.append(where)
            return self

    def fake_resolve(asked, where, model=None, shape=(8, 64)):
        ms = {"cpu": cpu_ms, "mps": mps_ms}[where]
        return precision.Precision("fp32", "auto", {"fp32": ms})

    monkeypatch.setattr(training, "resolve", fake_resolve)
    chosen, why, prec = training._mps_or_cpu(load_settings(profile="cpu", env={}), Model())
    assert chosen == device and moves[-1] == device and prec.name == "fp32"
    faster, slower = ("CPU", "Apple GPU") if device == "cpu" else ("Apple GPU", "CPU")
    assert why == f"auto: the {faster} trained 4.00x faster than the {slower} in a probe"


def test_torch_compile_is_off_on_the_apple_gpu(capsys):
    from tinystory.trainer import compile_ok

    assert compile_ok(True, "mps") is False and compile_ok(False, "mps") is False
    assert "torch.compile is off on an Apple GPU (MPS)" in capsys.readouterr().err


# ------------------------------------------------------------------- memory plan


def test_the_mps_plan_uses_its_share_of_unified_memory(monkeypatch):
    from tinystory.model import build_config

    settings = load_settings(profile="cpu", env={})
    config = build_config("cpu-3m", 4096)
    ram = 16 * 2**30
    monkeypatch.setattr(memory, "ram_bytes", lambda: ram)
    monkeypatch.setattr(memory, "mps_recommended_bytes", lambda: int(0.75 * ram))
    plan = memory.plan(settings, config, "mps")
    assert plan.budget_bytes == int(0.75 * ram) and plan.device == "mps"
    assert plan.budget_source == "the Apple GPU's recommended working set, 75% of this Mac's 16 GiB unified memory"
    monkeypatch.setattr(memory, "mps_recommended_bytes", lambda: 0)  # torch could not ask Metal
    plan = memory.plan(settings, config, "mps")
    assert plan.budget_bytes == int(memory.MPS_SHARE * ram)
    assert plan.budget_source == ("75% of this Mac's 16 GiB unified memory (what Metal recommends on most Apple "
                                  "Silicon)")
    assert plan.optimizer == "adamw_torch" and plan.fits


def test_dry_run_plans_for_the_device_asked_for(monkeypatch, capsys):
    # planning a Mac's run on Linux: --device mps --dry-run needs no Apple GPU here
    machine(monkeypatch, cuda=False, mps=False)
    monkeypatch.setattr(memory, "ram_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(memory, "mps_recommended_bytes", lambda: 0)
    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "cpu", "--device", "mps", "--dry-run"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("memory plan (mps, fp32): batch 8 x accumulation 1") and "75% of this Mac's" in out, out


def test_an_rtx2070_plan_on_a_mac_counts_the_optimizer_it_would_use():
    from tinystory.model import build_config

    plan = memory.plan(load_settings(profile="rtx2070", env={}), build_config("tinystories-40m", 32000), "mps",
                       budget_bytes=8 * 2**30)
    assert plan.optimizer == "adamw_torch"  # 8-bit AdamW trains on CUDA only


# --------------------------------------------------------------- the run dir


def test_the_run_dir_records_the_device(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--profile", "tiny", "--max-steps", "2", "--set", "train.eval_every=0", "--device", "cpu",
              "--out", str(tmp_path / "run")])
    assert e.value.code == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["device_type"] == "cpu" and info["device"].startswith("cpu: ")
    assert "device: cpu (asked for cpu)" in capsys.readouterr().err


# ------------------------------------------------------------------- Windows


def test_stale_folder_check_never_kills_on_windows(monkeypatch):
    # os.kill(pid, 0) terminates a process on Windows: the liveness check must not use it there
    from tinystory import prepare

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(prepare.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    monkeypatch.setattr(prepare, "_alive_windows", lambda pid: pid == 42)
    assert prepare._alive(42) is True and prepare._alive(7) is False
