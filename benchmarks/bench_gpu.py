"""The GPU path, measured on a CUDA machine in one command (issue 14).

Parts (each in its own process, so memory peaks and `set_per_process_memory_fraction`
stay separate, and a failing part cannot take the others down):

  peak      dense bf16/fp16 matmul throughput (8192^3): the MFU denominator
  rtx2070   `tinystory train --profile rtx2070` on the 40M preset, capped at 8 GiB:
            loss falling, peak allocated/reserved against `train --dry-run`'s plan (+-20%),
            useful tokens/s
  seed      the seed's recipe, same cap: the Trainer fed one story per example, dynamic
            padding, batch 6, fp16, checkpointing, 8-bit AdamW: useful tokens/s
  big       `tinystory train --profile a100`: tokens/s, MFU, peak memory against the plan
  plain     a plain compiled PyTorch loop (nanoGPT style) over the same model and data:
            bf16 autocast, fused AdamW, random 512-token blocks, the a100 batch
  generate  decoding tokens/s, fp16 and bf16: tinystory's Generator (eager, and its
            compiled static-cache step, the CUDA default), transformers' generate() with
            the dynamic cache, the static cache, static cache + compile
  quant     bnb-int8 and bnb-nf4 through `tinystory.quantization`: size, val bits per
            byte, tokens/s against the fp16 model on CUDA
  quality   `tinystory train --profile a100 --minutes M` on the whole training text, then
            bits per byte on the whole validation split and two stories
  profile   (only when named) torch.profiler tables of a few steady steps of the a100 run
            and of the plain loop, and a cProfile of the Trainer loop: --work/profile-*.txt

`--set KEY=VALUE` (repeatable) changes the a100 settings of big, profile and quality;
with `--tag NAME`, big's result is stored as a variant beside the shipped profile's.

    python benchmarks/bench_gpu.py --make-data .devdata/gpu-data.tgz   # here, once: the data to carry
    python benchmarks/bench_gpu.py --data .devdata/gpu-data.tgz        # on the GPU: all parts, 9.5 min budget
    python benchmarks/bench_gpu.py --data .devdata/gpu-data.tgz --parts quality --quality-minutes 5
    python benchmarks/bench_gpu.py --data DIR --smoke                  # CPU check of the code (no figures)

Prints a table and writes benchmarks/results/gpu-<device>.json (merged with an earlier
file of the same device, so parts can be run in separate calls). docs/notes/gpu.md has the
device-tool command and the wheels to carry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = ("peak", "rtx2070", "seed", "big", "plain", "generate", "quant", "quality", "profile")
CAP_S = {"peak": 60, "rtx2070": 180, "seed": 150, "big": 200, "plain": 150, "generate": 240, "quant": 180,
         "quality": 600, "profile": 240}  # seconds a part may take (quality: its minutes + eval and stories)
GIB = 2**30
PROMPT = "Once upon a time"
TARGETS = {"rtx2070_vs_seed": 5.0, "big_vs_plain": 1.2, "plan_error": 0.20}


# ============================================================ pure: results -> table, file


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the JSON file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the targets, and MFU against the peak measured in the same run."""
    d: dict[str, Any] = {}
    peak = (results.get("peak") or {}).get("bf16_flops")
    for name in ("big", "plain", "quality"):
        part = results.get(name) or {}
        if peak and part.get("tok_s") and part.get("parameters"):
            d[f"{name}_mfu"] = 6 * part["parameters"] * part["tok_s"] / peak
    ours, seed = results.get("rtx2070") or {}, results.get("seed") or {}
    if ours.get("tok_s") and seed.get("useful_tok_s"):
        d["rtx2070_vs_seed"] = ours["tok_s"] / seed["useful_tok_s"]
    big, plain = results.get("big") or {}, results.get("plain") or {}
    if big.get("tok_s") and plain.get("tok_s"):
        d["big_vs_plain"] = big["tok_s"] / plain["tok_s"]
    for name in ("rtx2070", "big"):
        part = results.get(name) or {}
        if part.get("plan_peak_allocated") and part.get("peak_allocated"):
            d[f"{name}_plan_error"] = part["plan_peak_allocated"] / part["peak_allocated"] - 1
    gen = (results.get("generate") or {}).get("rows") or []
    ok = [r for r in gen if r.get("tok_s")]
    if ok:
        best = max(ok, key=lambda r: r["tok_s"])
        d["fastest_generation"] = f"{best['dtype']} {best['path']}"
    return d


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _verdict(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return ""
    ok = value >= target if higher else abs(value) <= target
    return ("meets" if ok else "MISSES") + f" target {'>=' if higher else '+-'}{target:g}" + ("x" if higher else "")


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(part, measure, value, note) lines of the table; parts that did not run are left out."""
    d = derive(results)
    out: list[tuple[str, str, str, str]] = []
    add = out.append
    if p := results.get("peak"):
        add(("peak", "bf16 / fp16 matmul", f"{p['bf16_flops'] / 1e12:,.0f} / {p['fp16_flops'] / 1e12:,.0f} TFLOP/s",
             f"{p['n']}^3, same run"))
    if r := results.get("rtx2070"):
        add(("rtx2070", "useful tokens/s", _num(r["tok_s"]), f"{r['steps']} steps, capped at {_gib(r['cap_bytes'])}"))
        add(("rtx2070", "loss first -> last", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
             "falling" if r["loss_last"] < r["loss_first"] else "NOT falling"))
        add(("rtx2070", "peak allocated / reserved", f"{_gib(r['peak_allocated'])} / {_gib(r['peak_reserved'])}", ""))
        add(("rtx2070", "plan: peak allocated / total", f"{_gib(r['plan_peak_allocated'])} / {_gib(r['plan_total'])}",
             _plan_note(d.get("rtx2070_plan_error"))))
    if s := results.get("seed"):
        add(("seed", "useful tokens/s", _num(s["useful_tok_s"]),
             f"{_num(s['padded_tok_s'])} with padding ({s['padding_share']:.0%} padding)"))
        add(("seed", "peak allocated / reserved", f"{_gib(s['peak_allocated'])} / {_gib(s['peak_reserved'])}", ""))
    if "rtx2070_vs_seed" in d:
        add(("rtx2070", "vs seed recipe", f"{d['rtx2070_vs_seed']:.1f}x", _verdict(d["rtx2070_vs_seed"], 5.0)))
    for name, label in (("big", "tinystory train (a100)"), ("plain", "plain compiled loop")):
        if b := results.get(name):
            mfu = d.get(f"{name}_mfu")
            add((name, f"{label} tokens/s", _num(b["tok_s"]),
                 f"batch {b['batch']} x {b['block']}" + (f", MFU {mfu:.1%}" if mfu is not None else "")))
    if b := results.get("big"):
        add(("big", "peak allocated / plan", f"{_gib(b['peak_allocated'])} / {_gib(b.get('plan_peak_allocated'))}",
             _plan_note(d.get("big_plan_error"), eager_only=True)))
    if "big_vs_plain" in d:
        add(("big", "vs plain loop", f"{d['big_vs_plain']:.2f}x", _verdict(d["big_vs_plain"], 1.2)))
    plain_tok_s = (results.get("plain") or {}).get("tok_s")
    for tag, v in (results.get("variants") or {}).items():
        sets = " ".join(f"{k}={val}" for k, val in (v.get("overrides") or {}).items())
        ratio = f", {v['tok_s'] / plain_tok_s:.2f}x plain" if plain_tok_s and v.get("tok_s") else ""
        add(("variant", f"{tag}: {sets}", _num(v.get("tok_s")), f"peak {_gib(v.get('peak_allocated'))}{ratio}"))
    for r in (results.get("generate") or {}).get("rows", []):
        add(("generate", f"{r['dtype']} {r['path']}", _num(r.get("tok_s")) + " tok/s", r.get("error", "")))
    if "fastest_generation" in d:
        add(("generate", "fastest", d["fastest_generation"], ""))
    for r in (results.get("quant") or {}).get("rows", []):
        add(("quant", r["model"], f"{r['size_bytes'] / 2**20:.1f} MiB, bpb {_num(r.get('bpb'), '.4f')}, "
                                  f"{_num(r.get('tok_s'))} tok/s", r.get("note", "")))
    if q := results.get("quality"):
        add(("quality", "val bits per byte", _num(q.get("val_bpb"), ".4f"),
             f"{q['val_file']}, after {q['wall_s'] / 60:.1f} min ({q['steps']} steps)"))
        add(("quality", "greedy story", q.get("greedy", "")[:200], ""))
        add(("quality", "sampled story", q.get("sampled", "")[:200], ""))
    for part, message in (results.get("errors") or {}).items():
        add((part, "ERROR", message[:300], ""))
    return out


def _plan_note(err: float | None, eager_only: bool = False) -> str:
    if err is None:
        return ""
    note = f"plan {err:+.0%} vs measured: " + ("within" if abs(err) <= TARGETS["plan_error"] else "OUTSIDE") + " +-20%"
    return note + (" (the plan is an eager estimate; compiled)" if eager_only else "")


def render(results: dict[str, Any]) -> Any:
    """The table as a rich Table, titled with the device."""
    from rich.table import Table

    dev = results.get("device") or {}
    table = Table(title=f"GPU benchmark: {dev.get('name', '?')} ({dev.get('torch', '?')}, "
                        f"transformers {dev.get('transformers', '?')})", title_justify="left")
    for col in ("part", "measure", "value", "note"):
        table.add_column(col, overflow="fold")
    for row in rows(results):
        table.add_row(*row)
    return table


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Parts measured now replace the same parts of an earlier file; the rest is kept."""
    merged = {**old, **{k: v for k, v in new.items() if k != "errors"}}
    merged["variants"] = {**(old.get("variants") or {}), **(new.get("variants") or {})}
    errors = {k: v for k, v in (old.get("errors") or {}).items() if k not in new}
    errors.update(new.get("errors") or {})
    merged["errors"] = errors
    merged["derived"] = derive(merged)
    return merged


def write_results(results: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write (merged) gpu-<device>.json atomically and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gpu-{device_slug((results.get('device') or {}).get('name', 'unknown'))}.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    merged = merge(old, results)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def split_stories(tokens: Any, eos: int, max_len: int) -> list[Any]:
    """The token stream cut into stories (each ends with its EOS), cut to max_len tokens."""
    import numpy as np

    ends = np.flatnonzero(np.asarray(tokens) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [np.asarray(tokens[s : e + 1][:max_len], dtype=np.int64) for s, e in zip(starts, ends, strict=True) if e > s]


def throughput(metrics: list[dict[str, Any]], skip: int = 2) -> float | None:
    """Tokens/s between the `skip`-th training log row and the last (warm-up, compile left out)."""
    train = [r for r in metrics if "loss" in r]
    if len(train) <= skip:
        return None
    a, b = train[skip - 1] if skip else {"tokens": 0, "wall_time_s": 0.0}, train[-1]
    dt = b["wall_time_s"] - a["wall_time_s"]
    return (b["tokens"] - a["tokens"]) / dt if dt > 0 else None


# ===================================================== adapter: the project's public API
# The only place that names other modules' functions; fix names here when they change.


def ts_settings(profile: str, **overrides: Any) -> Any:
    from tinystory.settings import load_settings

    return load_settings(profile=profile, env={}).replace(**overrides)


def ts_prepare(settings: Any) -> Path:
    """`tinystory prepare`: returns the prepared folder."""
    from tinystory.prepare import prepare

    return Path(prepare(settings))


def ts_train(settings: Any) -> Path:
    """`tinystory train`: returns the run dir."""
    from tinystory.training import train

    return Path(train(settings))


def ts_plan(settings: Any, run: Path, device: str) -> Any:
    """`tinystory train --dry-run`'s plan, for the model the run really has."""
    from transformers import AutoConfig

    from tinystory import memory

    return memory.plan(settings, AutoConfig.from_pretrained(str(run)), device)


def ts_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ts_quantize(run: Path, method: str, out: Path) -> tuple[Path, list[Any]]:
    """`tinystory quantize --method M`: (folder, its comparison rows)."""
    from tinystory import quantization

    return quantization.quantize(run, ts_settings("a100", quantize__method=method), out=out)


def ts_score(name: str, size: int, model: Any, run: Path) -> dict[str, Any]:
    """A quantization-table row (val bpb, tok/s) for `model`, measured as `tinystory quantize` does."""
    from dataclasses import asdict

    from tinystory import quantization as q
    from tinystory.tokenizer import load_tokenizer

    tok = load_tokenizer(run)
    scorer = q.torch_scorer(model, tok.eos_token_id)
    settings = ts_settings("a100")
    val = q.val_data(run, model, tok, settings, settings.quantize.val_tokens)
    row, _ = q.measure(name, size, scorer, val, tok(PROMPT)["input_ids"], None, 32, q.GEN_TOKENS)
    return asdict(row)


def ts_reload(path: Path) -> Any:
    from tinystory.loading import load_model
    from tinystory.runs import Run

    return load_model(Run(path))[0]


def ts_generator(run: Path, dtype: str, device: str, compile: bool | None = None) -> Any:
    from tinystory.generation import Generator

    return Generator.load(str(run), device=device, dtype=dtype, compile=compile)


def ts_decode(gen: Any, n: int, greedy: bool = True, seed: int = 0) -> tuple[str, Any]:
    """Decode `n` new tokens (EOS forbidden before n when timing) -> (text, stats)."""
    from tinystory.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=n, greedy=greedy, seed=seed, min_new_tokens=n if greedy else 0)
    text = gen.generate(PROMPT, params)
    return text, gen.last_stats


def ts_evaluate(run: Path, data: str) -> dict[str, Any]:
    """`tinystory eval --metrics loss,bpb --data DATA` over the whole validation split."""
    from tinystory.evaluation import evaluate

    return evaluate(str(run), ts_settings("a100"), metrics=["loss", "bpb"], data=data, save=False)


# ============================================================================== the parts


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _memory() -> dict[str, int]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated": 0, "peak_reserved": 0}
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}


def _cap(gib: float) -> int:
    """Cap this process's CUDA allocator at `gib` (the RTX 2070's memory)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total))
    return int(min(total, gib * GIB))


def _smoke(a: argparse.Namespace, profile: str) -> dict[str, Any]:
    """With --smoke (no GPU): the same code on a tiny model in fp32 on CPU, a few steps."""
    if not a.smoke:
        return {}
    return dict(model__preset="tiny", train__precision="fp32", train__optimizer="adamw_torch",
                train__torch_compile=False, train__batch_size=4, train__block_size=64, train__eval_tokens=4096,
                train__dataloader_workers=0)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set train.attention=eager` pairs -> settings.replace() keywords (values parsed as
    TOML scalars: numbers, true/false, else the string)."""
    import tomllib

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {pair!r}: use SECTION.KEY=VALUE, e.g. train.attention=eager")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.replace(".", "__")] = value
    return out


def _train_part(a: argparse.Namespace, profile: str, name: str, steps: int, cap_gib: float = 0,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our `tinystory train` for `steps` steps: throughput, loss, memory against the plan."""
    import torch

    cap = _cap(cap_gib) if cap_gib else 0
    settings = ts_settings(profile, train__data=a.data, train__out=str(Path(a.work) / f"{name}-run"),
                           train__max_steps=steps, train__eval_every=0, train__save_every=100_000,
                           train__log_every=max(1, steps // 20), train__wandb="off",
                           train__warmup_steps=min(20, steps // 4), train__early_stopping_patience=0,
                           **{**_smoke(a, profile), **(extra or {})})
    t0 = time.perf_counter()
    run = ts_train(settings)
    wall = time.perf_counter() - t0
    mem = _memory()
    metrics = ts_metrics(run)
    losses = [r["loss"] for r in metrics if "loss" in r]
    plan = ts_plan(settings, run, "cuda" if torch.cuda.is_available() else "cpu")
    t = settings.train
    return {"steps": steps, "batch": t.batch_size, "block": t.block_size, "tokens_per_step": plan.tokens_per_step,
            "tok_s": throughput(metrics), "wall_s": wall, "loss_first": losses[0], "loss_last": losses[-1],
            "parameters": plan.parameters, "cap_bytes": cap, **mem,
            "plan_peak_allocated": plan.peak_allocated_bytes, "plan_total": plan.total_bytes,
            "plan_fits": plan.fits, "plan_phase": plan.peak_phase, "run_dir": str(run),
            "overrides": {k.replace("__", "."): v for k, v in (extra or {}).items()}}


def part_peak(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    n = 8192 if torch.cuda.is_available() else 512
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            x @ y
        _sync()
        t0, reps = time.perf_counter(), 10
        for _ in range(reps):
            x @ y
        _sync()
        out[f"{name}_flops"] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return out


def part_rtx2070(a: argparse.Namespace) -> dict[str, Any]:
    return _train_part(a, "rtx2070", "rtx2070", a.rtx_steps, cap_gib=8.0)


def part_big(a: argparse.Namespace) -> dict[str, Any]:
    """The a100 profile as shipped, or with --set overrides (then stored as variant --tag)."""
    return _train_part(a, "a100", f"big-{a.tag}" if a.tag else "big", a.big_steps, extra=overrides(a.set))


def part_profile(a: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler over a few steady steps of our a100 run (with --set overrides) and of
    the plain loop: the kernels where the time goes, as tables in --work/profile-*.txt."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tinystory import training as training_mod
    from tinystory.trainer import StoryTrainer

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    first, n = 30, 5
    tables: dict[str, str] = {}

    class Profiled(StoryTrainer):
        def training_step(self, *args: Any, **kw: Any) -> Any:
            step = self.state.global_step
            if step == first:
                _sync()
                self._prof = profile(activities=acts)
                self._prof.__enter__()
            if step == first + n:  # the Python of the whole loop (Trainer, callbacks), 10 steps
                _sync()
                self._t0, self._py = time.perf_counter(), cProfile.Profile()
                self._py.enable()
            out = super().training_step(*args, **kw)
            if step == first + n - 1:
                _sync()
                self._prof.__exit__(None, None, None)
                avg = self._prof.key_averages()
                tables["ours"] = avg.table(sort_by=sort, row_limit=45, max_name_column_width=70)
                tables["ours-cpu"] = avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
            if step == first + n + 9:
                _sync()
                self._py.disable()
                buf = io.StringIO()
                pstats.Stats(self._py, stream=buf).sort_stats("cumulative").print_stats(60)
                tables["ours-python"] = f"10 steps, {time.perf_counter() - self._t0:.3f} s wall\n" + buf.getvalue()
            return out

    training_mod.StoryTrainer = Profiled  # what `train` builds
    _train_part(a, "a100", "profile", first + n + 12, extra=overrides(a.set))
    tables["plain"] = part_plain(a, profile_steps=(acts, sort, n))["profile_table"]
    out = {}
    for name, text in tables.items():
        path = Path(a.work) / f"profile-{name}.txt"
        path.write_text(text)
        out[name] = str(path)
    return out


def part_seed(a: argparse.Namespace) -> dict[str, Any]:
    """The seed's recipe: one story per example, padded to the longest in the batch."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tinystory.data import open_prepared
    from tinystory.model import build_config, build_model

    cap = _cap(8.0)
    cuda = torch.cuda.is_available()
    data = open_prepared(a.data)
    tok = data.tokenizer
    B, steps, warm = 6, a.seed_steps, max(1, a.seed_steps // 5)
    stories = split_stories(np.asarray(data.tokens("train")), tok.eos_token_id, 512)
    order = np.random.default_rng(0).permutation(len(stories))[: B * steps]
    examples = [{"input_ids": stories[i]} for i in order]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    counts: list[tuple[int, int]] = []  # (useful, padded) tokens of each batch, in order

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        L = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e["input_ids"])] = torch.from_numpy(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        counts.append((int(mask.sum()), mask.numel()))
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            _sync()
            times.append(time.perf_counter())

    fields = TrainingArguments.__dataclass_fields__
    ckpt = {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}
    args = TrainingArguments(
        output_dir=str(Path(a.work) / "seed"), per_device_train_batch_size=B, max_steps=steps, learning_rate=2e-5,
        fp16=cuda and not a.smoke, use_cpu=not cuda, optim="adamw_bnb_8bit" if cuda else "adamw_torch",
        logging_steps=max(1, steps // 10), report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_drop_last=True, remove_unused_columns=False, seed=0, **ckpt)
    config = build_config("tiny" if a.smoke else "tinystories-40m", len(tok), tok.bos_token_id, tok.eos_token_id, pad)
    torch.manual_seed(0)
    trainer = Trainer(model=build_model(config), args=args, train_dataset=examples, data_collator=collate,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    dt = times[-1] - times[warm - 1]
    useful = sum(c[0] for c in counts[warm:steps])
    padded = sum(c[1] for c in counts[warm:steps])
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"steps": steps, "batch": B, "useful_tok_s": useful / dt, "padded_tok_s": padded / dt,
            "padding_share": 1 - useful / padded, "wall_s": wall, "cap_bytes": cap, **_memory(),
            "loss_first": losses[0], "loss_last": losses[-1]}


def part_plain(a: argparse.Namespace, profile_steps: tuple[Any, str, int] | None = None) -> dict[str, Any]:
    """nanoGPT/llama2.c style: compiled model + loss, bf16 autocast, fused AdamW, random blocks."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tinystory.data import open_prepared
    from tinystory.model import build_config, build_model, count_parameters

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    s = ts_settings("a100", **_smoke(a, "a100"))
    B, T = s.train.batch_size, s.train.block_size
    data = open_prepared(a.data)
    tok = data.tokenizer
    tokens = torch.from_numpy(np.asarray(data.tokens("train"), dtype=np.int64)).to(dev)
    config = build_config(s.model.preset, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = build_model(config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.train.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)

    def loss_fn(x: Any, y: Any) -> Any:
        logits = model(input_ids=x).logits  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    compiled = torch.compile(loss_fn) if cuda else loss_fn
    gen = torch.Generator(device=dev).manual_seed(0)

    def step() -> Any:
        ix = torch.randint(len(tokens) - T - 1, (B,), device=dev, generator=gen)
        blk = torch.stack([tokens[i : i + T + 1] for i in ix.tolist()])  # (B, T+1)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            loss = compiled(blk[:, :-1], blk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = float(step())
    for _ in range(a.plain_warmup - 1):
        step()
    _sync()
    if profile_steps:
        from torch.profiler import profile

        acts, sort, n = profile_steps
        with profile(activities=acts) as prof:
            for _ in range(n):
                step()
            _sync()
        return {"profile_table": prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)}
    t0 = time.perf_counter()
    for _ in range(a.plain_steps):
        last = step()
    _sync()
    dt = time.perf_counter() - t0
    return {"steps": a.plain_steps, "batch": B, "block": T, "tok_s": a.plain_steps * B * T / dt,
            "parameters": count_parameters(config), "loss_first": first, "loss_last": float(last), **_memory()}


def _model_run(a: argparse.Namespace) -> Path:
    """A trained 40M run for generate/quant: the quality run, else the big run, else a short one."""
    for name in ("quality-run", "big-run"):
        run = Path(a.work) / name
        if (run / "model.safetensors").is_file():
            return run
    return Path(_train_part(a, "a100", "model", 30)["run_dir"])


def part_generate(a: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s of --gen-tokens new tokens (greedy, EOS forbidden), median of 3 after a warm-up."""
    import torch

    cuda = torch.cuda.is_available()
    run, n = _model_run(a), a.gen_tokens
    out: list[dict[str, Any]] = []
    for dtype in ("fp16", "bf16") if cuda else ("fp32",):
        out += [_time_generator(run, dtype, n, compile) for compile in (False, True)]
        if a.gen_paths == "all":
            out += _time_hf_generate(run, dtype, n)
        torch.cuda.empty_cache() if cuda else None
    return {"run": str(run), "new_tokens": n, "rows": out}


def _time_generator(run: Path, dtype: str, n: int, compile: bool) -> dict[str, Any]:
    """tinystory's own decoding loop (`Generator`): eager with a dynamic cache, or its
    compiled static-cache step (the CUDA default)."""
    import torch

    gen = ts_generator(run, dtype, "cuda" if torch.cuda.is_available() else "cpu", compile)
    path = "tinystory Generator " + ("static cache + compile" if compile else "eager")
    return {"dtype": dtype, "path": path, **_timed(lambda: ts_decode(gen, n)[1].seconds, n, warm=2 if compile else 1)}


def _time_hf_generate(run: Path, dtype: str, n: int) -> list[dict[str, Any]]:
    """transformers' generate(): dynamic cache, static cache, static cache + its auto-compile."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(run), dtype=torch_dtype).to("cuda" if cuda else "cpu").eval()
    ids = torch.tensor([_encode(run, PROMPT)], device=model.device)  # (1, T) BOS + prompt
    rows = []
    for path, kw in (("generate() dynamic cache", {}),
                     ("generate() static cache", {"cache_implementation": "static", "disable_compile": True}),
                     ("generate() static cache + compile", {"cache_implementation": "static"})):
        if not cuda and "static" in path:
            continue

        def once(kw: dict[str, Any] = kw) -> float:
            t0 = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, **kw)
            _sync()
            return time.perf_counter() - t0

        try:
            rows.append({"dtype": dtype, "path": path, **_timed(once, n, warm=2 if "compile" in path else 1)})
        except Exception as e:  # one variant failing should not hide the others
            rows.append({"dtype": dtype, "path": path, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def _timed(once: Any, n: int, warm: int = 1, reps: int = 3) -> dict[str, float]:
    for _ in range(warm):
        once()
    secs = [once() for _ in range(reps)]
    return {"tok_s": n / statistics.median(secs)}


def _encode(run: Path, text: str) -> list[int]:
    from tinystory.tokenizer import load_tokenizer

    tok = load_tokenizer(run)
    return [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]


def part_quant(a: argparse.Namespace) -> dict[str, Any]:
    """bnb-int8 / bnb-nf4 through `tinystory quantize`, reloaded, against fp16 on the same GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()  # without CUDA (--smoke): fp32 and the CPU int8 method
    run = _model_run(a)
    dtype = torch.float16 if cuda else torch.float32
    ref = AutoModelForCausalLM.from_pretrained(str(run), dtype=dtype).to("cuda" if cuda else "cpu").eval()
    n_params = sum(p.numel() for p in {p.data_ptr(): p for p in ref.parameters()}.values())
    table = [ts_score("fp16 (CUDA)" if cuda else "fp32 (CPU)", (2 if cuda else 4) * n_params, ref, run)]
    del ref
    from_quantize: dict[str, Any] = {}
    for method in ("bnb-int8", "bnb-nf4") if cuda else ("int8",):
        path, qrows = ts_quantize(run, method, Path(a.work) / method)
        from_quantize[method] = [r.__dict__ for r in qrows]
        reloaded = ts_reload(path)  # what `tinystory generate` would load
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        table.append(ts_score(f"{method} (reloaded)", size, reloaded, run))
        reloaded = None  # free the GPU copy before the next method
        torch.cuda.empty_cache() if cuda else None
    return {"run": str(run), "rows": table, "quantize_rows": from_quantize}


def part_quality(a: argparse.Namespace) -> dict[str, Any]:
    """The a100 profile for `minutes` on all the training text; whole-val bpb and two stories."""
    import torch

    settings = ts_settings("a100", train__data=a.data, train__out=str(Path(a.work) / "quality-run"),
                           train__minutes=a.quality_minutes, train__eval_every=50, train__save_every=100_000,
                           train__log_every=25, train__wandb="off", **{**_smoke(a, "a100"), **overrides(a.set)})
    t0 = time.perf_counter()
    run = ts_train(settings)
    wall = time.perf_counter() - t0
    info = json.loads((run / "run.json").read_text())
    metrics = ts_metrics(run)
    ev = ts_evaluate(run, a.data)
    gen = ts_generator(run, "auto", "cuda" if torch.cuda.is_available() else "cpu")
    greedy, _ = ts_decode(gen, 200, greedy=True)
    sampled, _ = ts_decode(gen, 200, greedy=False, seed=1234)
    meta = json.loads((Path(a.data) / "meta.json").read_text())
    val_file = next((Path(s["path"]).name for s in meta.get("sources", []) if s.get("split") == "val"), "val.bin")
    return {"minutes": a.quality_minutes, "wall_s": wall, "steps": info.get("steps"), "tokens": info.get("tokens_seen"),
            "stopped_because": info.get("stopped_because"), "best_eval_bpb": info.get("best_eval_bpb"),
            "tok_s": throughput(metrics), "parameters": info.get("parameters"),
            "val_bpb": _find(ev, "bpb"), "val_loss": _find(ev, "loss"), "val_file": val_file,
            "greedy": PROMPT + greedy, "sampled": PROMPT + sampled, "run_dir": str(run)}


def _find(d: Any, key: str) -> Any:
    """The first value of `key` anywhere in a nested dict (eval.json's layout may change)."""
    if isinstance(d, dict):
        if key in d and isinstance(d[key], (int, float)):
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


PART_FUNCS = {"peak": part_peak, "rtx2070": part_rtx2070, "seed": part_seed, "big": part_big, "plain": part_plain,
              "generate": part_generate, "quant": part_quant, "quality": part_quality, "profile": part_profile}


# ========================================================================= orchestration


def device_info() -> dict[str, Any]:
    """GPU name and memory (nvidia-smi, so this process never opens CUDA) and versions."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"name": "cpu (smoke)"}
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        name, mem, driver = (x.strip() for x in line.split(","))
        info = {"name": name, "memory": mem, "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        pass
    for pkg in ("torch", "transformers", "accelerate", "bitsandbytes"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def make_data(tgz: Path, source: Path) -> Path:
    """Prepare `source` with the Mistral tokenizer and pack it as a .tgz to carry to the GPU
    machine (it has no ../shared and no mistral-common): ~2.4 MB for the shared text."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = ts_prepare(ts_settings("rtx2070", data__dataset=str(source), data__tokenizer="mistral",
                                        data__out=str(Path(tmp) / "gpu-tinystories-mistral")))
        tgz.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    return tgz


def unpack_data(tgz: Path, work: Path) -> Path:
    """The prepared folder inside `tgz`, unpacked once under `work`."""
    import tarfile

    with tarfile.open(tgz) as tar:
        top = tar.getnames()[0].split("/")[0]
        if not (work / top / "meta.json").is_file():
            tar.extractall(work, filter="data")
    return work / top


def run_part(name: str, a: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One part in a fresh process; its JSON result, or {'error': ...}."""
    out = Path(a.work) / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", name, "--data", a.data, "--work", a.work,
           "--quality-minutes", str(a.quality_minutes)] + (["--smoke"] if a.smoke else [])
    for k in ("rtx_steps", "seed_steps", "big_steps", "plain_steps", "plain_warmup", "gen_tokens", "gen_paths", "tag"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    for pair in a.set:
        cmd += ["--set", pair]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return {"error": f"timed out after {timeout:.0f} s"}
    if rc != 0 or not out.is_file():
        return {"error": f"exit code {rc} (see the log above)"}
    result = json.loads(out.read_text())
    result.setdefault("wall_s", time.perf_counter() - t0)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared folder or its .tgz (shared TinyStories, Mistral tokenizer)")
    ap.add_argument("--make-data", metavar="TGZ", help="prepare --source with the Mistral tokenizer into TGZ and exit")
    ap.add_argument("--source", default=str(HERE.parents[1] / "shared" / "data" / "tinystories"),
                    help="text for --make-data (default: ../shared/data/tinystories)")
    ap.add_argument("--parts", default="all", help=f"comma list of {', '.join(PARTS)} (default all but profile)")
    ap.add_argument("--time-budget", type=float, default=570, help="seconds for the whole command")
    ap.add_argument("--quality-minutes", type=float, default=8.0, help="training minutes of the quality part (at most)")
    ap.add_argument("--work", default="/tmp/tinystory-gpu-bench", help="scratch folder (runs, quantized models)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of gpu-<device>.json")
    ap.add_argument("--smoke", action="store_true", help="run the code on CPU with a tiny model (no figures)")
    ap.add_argument("--rtx-steps", type=int, default=200)
    ap.add_argument("--seed-steps", type=int, default=80)
    ap.add_argument("--big-steps", type=int, default=150)
    ap.add_argument("--plain-steps", type=int, default=50)
    ap.add_argument("--plain-warmup", type=int, default=10)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gen-paths", default="all", choices=("all", "ours"),
                    help="generate: tinystory's Generator and transformers' generate() paths, or ours alone")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings override for big, profile and quality (repeatable), e.g. train.attention=eager")
    ap.add_argument("--tag", default="", help="store big's result as this variant (with --set)")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    a = ap.parse_args()
    if a.make_data:
        print(make_data(Path(a.make_data), Path(a.source)))
        return 0
    if not a.data:
        ap.error("--data is required (a prepared folder or the .tgz of --make-data)")
    _environment(a)
    if a.part:
        result = PART_FUNCS[a.part](a)
        (Path(a.work) / f"{a.part}.json").write_text(json.dumps(result, default=str))
        return 0
    return orchestrate(a)


def _environment(a: argparse.Namespace) -> None:
    """Offline, no W&B, our own cache/runs dirs, plain log lines; the data path made absolute."""
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.data.endswith((".tgz", ".tar.gz")):
        a.data = str(unpack_data(Path(a.data), Path(a.work)))
    a.data = str(Path(a.data).resolve())
    if a.smoke and a.out == str(RESULTS):  # smoke figures mean nothing: keep them out of results/
        a.out = a.work
    for k, v in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TINYSTORY_PLAIN": "1",
                 "TINYSTORY_CACHE_DIR": f"{a.work}/cache", "TINYSTORY_RUNS_DIR": f"{a.work}/runs",
                 "TINYSTORY_CONFIG": f"{a.work}/config.toml", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def orchestrate(a: argparse.Namespace) -> int:
    parts = [p for p in PARTS if p != "profile"] if a.parts == "all" else [
        p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {', '.join(unknown)}: use {', '.join(PARTS)}")
    for name in parts:  # a fresh command re-trains what it measures
        shutil.rmtree(Path(a.work) / f"{name}-run", ignore_errors=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"device": device_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "settings": {k: v for k, v in vars(a).items() if k not in ("part",)}, "errors": {}}
    for name in parts:
        left = a.time_budget - (time.perf_counter() - start)
        if name == "quality":  # whatever time is left, up to --quality-minutes (+ start, eval, stories)
            minutes = min(a.quality_minutes, (left - 150) / 60)
            if minutes < min(1.0, a.quality_minutes):
                results["errors"][name] = f"skipped: {left:.0f} s left of the time budget"
                continue
            a.quality_minutes = round(minutes, 2)
        timeout = min(CAP_S[name] if name != "quality" else a.quality_minutes * 60 + 150, left - 5)
        if timeout < 20:
            results["errors"][name] = f"skipped: {left:.0f} s left of the time budget"
            continue
        print(f"== {name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
        result = run_part(name, a, timeout)
        key = f"big-{a.tag}" if name == "big" and a.tag else name
        if "error" in result:
            results["errors"][key] = result["error"]
        elif key != name:
            results.setdefault("variants", {})[a.tag] = result
        else:
            results[name] = result
    results["wall_s"] = time.perf_counter() - start
    path = write_results(results, Path(a.out))
    from rich.console import Console

    Console(width=160).print(render(json.loads(path.read_text())))
    print(f"wrote {path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
