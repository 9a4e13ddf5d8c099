"""The GPU benchmark's pure parts on a fake result: ratios, table rows, the JSON file and
its merge, story splitting and throughput from metrics rows (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake() -> dict:
    """What one run on an H100 could write (figures made up, shapes real)."""
    return {
        "device": {"name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "transformers": "5.17.0"},
        "peak": {"n": 8192, "bf16_flops": 790e12, "fp16_flops": 780e12},
        "rtx2070": {"steps": 200, "batch": 6, "block": 512, "tok_s": 26_000.0, "cap_bytes": 8 * 2**30,
                    "loss_first": 10.4, "loss_last": 4.1, "peak_allocated": int(1.6 * 2**30),
                    "peak_reserved": int(2.0 * 2**30), "plan_peak_allocated": int(1.48 * 2**30),
                    "plan_total": int(2.13 * 2**30), "parameters": 40_609_152},
        "seed": {"steps": 80, "batch": 6, "useful_tok_s": 3_500.0, "padded_tok_s": 5_500.0, "padding_share": 0.36,
                 "peak_allocated": 2 * 2**30, "peak_reserved": int(7.8 * 2**30)},
        "big": {"batch": 64, "block": 512, "tok_s": 800_000.0, "parameters": 40_609_152,
                "peak_allocated": 10 * 2**30, "plan_peak_allocated": 22 * 2**30},
        "plain": {"batch": 64, "block": 512, "tok_s": 650_000.0, "parameters": 40_609_152},
        "generate": {"rows": [{"dtype": "bf16", "path": "tinystory Generator", "tok_s": 400.0},
                              {"dtype": "bf16", "path": "generate() static cache + compile", "tok_s": 1500.0},
                              {"dtype": "fp16", "path": "generate() static cache", "error": "ValueError: no"}]},
        "quant": {"rows": [{"model": "fp16 (CUDA)", "size_bytes": 81_218_304, "bpb": 1.10, "tok_s": 400.0},
                           {"model": "bnb-nf4 (reloaded)", "size_bytes": 30 * 2**20, "bpb": 1.13, "tok_s": 150.0}]},
        "quality": {"minutes": 7.5, "wall_s": 480.0, "steps": 12000, "val_bpb": 0.9876, "val_file": "valid.txt",
                    "greedy": "Once upon a time, there was a girl.", "sampled": "Once upon a time, a cat.",
                    "tok_s": 700_000.0, "parameters": 40_609_152},
        "errors": {"quant": "timed out after 180 s"},
    }


def test_derive(bench):
    d = bench.derive(fake())
    assert d["rtx2070_vs_seed"] == pytest.approx(26_000 / 3_500)
    assert d["big_vs_plain"] == pytest.approx(800 / 650)
    assert d["big_mfu"] == pytest.approx(6 * 40_609_152 * 800_000 / 790e12)  # 24.7%
    assert d["rtx2070_plan_error"] == pytest.approx(1.48 / 1.6 - 1)
    assert d["fastest_generation"] == "bf16 generate() static cache + compile"
    assert bench.derive({}) == {}


def test_rows_name_every_part_and_verdict(bench):
    table = {(part, measure): (value, note) for part, measure, value, note in bench.rows(fake())}
    assert table[("rtx2070", "vs seed recipe")] == ("7.4x", "meets target >=5x")
    assert table[("big", "vs plain loop")] == ("1.23x", "meets target >=1.2x")
    assert table[("rtx2070", "loss first -> last")] == ("10.400 -> 4.100", "falling")
    assert table[("rtx2070", "plan: peak allocated / total")] == ("1.48 GiB / 2.13 GiB",
                                                                   "plan -8% vs measured: within +-20%")
    assert table[("big", "tinystory train (a100) tokens/s")] == ("800,000", "batch 64 x 512, MFU 24.7%")
    assert table[("seed", "useful tokens/s")] == ("3,500", "5,500 with padding (36% padding)")
    assert table[("generate", "fp16 generate() static cache")] == ("- tok/s", "ValueError: no")
    assert table[("quant", "bnb-nf4 (reloaded)")] == ("30.0 MiB, bpb 1.1300, 150 tok/s", "")
    assert table[("quality", "val bits per byte")] == ("0.9876", "valid.txt, after 8.0 min (12000 steps)")
    assert table[("quant", "ERROR")] == ("timed out after 180 s", "")
    slow = fake()
    slow["rtx2070"]["tok_s"] = 10_000.0
    slow["rtx2070"]["peak_allocated"] = int(1.5 * 2**30)
    slow["rtx2070"]["plan_peak_allocated"] = 2**30
    table = {(p, m): (v, n) for p, m, v, n in bench.rows(slow)}
    assert table[("rtx2070", "vs seed recipe")] == ("2.9x", "MISSES target >=5x")
    assert table[("rtx2070", "plan: peak allocated / total")][1] == "plan -33% vs measured: OUTSIDE +-20%"


def test_render_titles_the_device(bench):
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench.render(fake()))
    text = console.export_text()
    assert "GPU benchmark: NVIDIA H100 80GB HBM3 (2.11.0+cu130, transformers 5.17.0)" in text
    assert "meets target >=5x" in text


def test_write_results_merges_parts(bench, tmp_path):
    first = fake()
    path = bench.write_results(first, tmp_path)
    assert path.name == "gpu-nvidia-h100-80gb-hbm3.json"
    saved = json.loads(path.read_text())
    assert saved["derived"]["big_vs_plain"] == pytest.approx(800 / 650)
    # a second call measures only the quality part (and fixes quant): the rest is kept
    second = {"device": first["device"], "quality": {**first["quality"], "val_bpb": 0.95},
              "quant": first["quant"], "errors": {}}
    bench.write_results(second, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["quality"]["val_bpb"] == 0.95 and saved["rtx2070"]["tok_s"] == 26_000.0
    assert saved["errors"] == {}  # quant ran again without error
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_device_slug(bench):
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.device_slug("NVIDIA GeForce RTX 2070") == "nvidia-geforce-rtx-2070"
    assert bench.device_slug("???") == "unknown"


def test_split_stories_and_throughput(bench):
    import numpy as np

    stream = np.array([1, 5, 6, 2, 1, 7, 8, 9, 10, 2, 1, 2], dtype=np.uint16)  # BOS ... EOS per story
    stories = bench.split_stories(stream, eos=2, max_len=4)
    assert [s.tolist() for s in stories] == [[1, 5, 6, 2], [1, 7, 8, 9], [1, 2]]
    rows = [{"step": 10, "tokens": 100, "wall_time_s": 10.0, "loss": 9.0},  # compile in here
            {"step": 20, "tokens": 200, "wall_time_s": 11.0, "loss": 8.0},
            {"step": 20, "tokens": 200, "wall_time_s": 11.5, "eval_loss": 8.0},
            {"step": 40, "tokens": 400, "wall_time_s": 13.0, "loss": 7.0}]
    assert bench.throughput(rows) == pytest.approx(200 / 2.0)
    assert bench.throughput(rows[:1]) is None


def test_importing_the_bench_imports_no_torch():
    import subprocess

    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('b', {str(BENCH)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_set_overrides_and_variants(bench, tmp_path):
    assert bench.overrides(["train.attention=eager", "train.batch_size=128", "train.torch_compile=false"]) == {
        "train__attention": "eager", "train__batch_size": 128, "train__torch_compile": False}
    with pytest.raises(SystemExit, match=r"use SECTION\.KEY=VALUE"):
        bench.overrides(["batch_size=3"])
    first = fake()
    first["variants"] = {"cudagraphs": {"tok_s": 668_000.0, "peak_allocated": 16 * 2**30,
                                        "overrides": {"train.compile_mode": "reduce-overhead"}}}
    path = bench.write_results(first, tmp_path)
    # a later call adds another variant: both are kept, each against the plain loop
    bench.write_results({"device": first["device"], "variants": {"b128": {"tok_s": 910_000.0, "overrides": {
        "train.batch_size": 128}}}, "errors": {}}, tmp_path)
    saved = json.loads(path.read_text())
    assert set(saved["variants"]) == {"cudagraphs", "b128"}
    table = {(p, m): (v, n) for p, m, v, n in bench.rows(saved)}
    assert table[("variant", "cudagraphs: train.compile_mode=reduce-overhead")] == ("668,000",
                                                                                   "peak 16.00 GiB, 1.03x plain")
    assert table[("variant", "b128: train.batch_size=128")] == ("910,000", "peak -, 1.40x plain")
