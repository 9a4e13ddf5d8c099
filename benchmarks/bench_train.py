"""Training benchmarks for the cpu profile, all in one run on this machine.

    python benchmarks/bench_train.py [--short]          # (a) throughput + (b) seed recipe
    python benchmarks/bench_train.py --quality          # (c) the 15-minute race of issue 12
    python benchmarks/bench_train.py --time-to-target   # (d) time to llama2.c's 15-minute result

(a) Throughput: tokens/s and MFU of `tinystory train` (the Trainer + our callbacks) on the
    cpu profile's model and batch, against a plain PyTorch loop (llama2.c `train.py`
    style: the same model, data, batch, precision and AdamW, no Trainer) timed in the same
    run. MFU = 6 x parameters x tokens/s / the dense matmul peak measured here in the dtype
    the run trains in.
(b) The seed's recipe (Trainer, one story per example, dynamic padding to the longest in
    the batch, lr 2e-5, linear decay, no warmup) against ours (packed blocks, the cpu
    profile's lr and schedule fitted to the time) for the same wall time: useful (non-pad)
    tokens/s and validation bits per byte on the same validation slice.
(c) `--quality`: `tinystory train --profile cpu --minutes 15` on the four original shared
    training files (prepared with the cpu profile's BPE), then bits per byte on
    ../shared/data/tinystories/valid.txt and greedy + sampled "Once upon a time" stories.

(d) `--time-to-target`, side by side in one run on this machine, on the four shared
    training files with valid.txt as the validation split: first llama2.c's recipe as a
    plain PyTorch loop over llama2.c's own model.py (benchmarks/llama2c_baseline.py) for
    15 minutes; its bits per byte on the whole of valid.txt is the target X. Then
    `tinystory train --profile cpu --target-bpb X` (`--runs` times, capped at `--minutes`),
    timed from the command's start (run.json time_to_target_s: start-up, prepare of the
    cached data, compile and the precision probe included), and one plain
    `tinystory train --profile cpu` run of the same 15 minutes for the bpb at equal time,
    with its greedy and sampled stories. `--set KEY=VALUE` (repeatable) is passed to the
    `--target-bpb` runs, e.g. `--set train.eval_every_minutes=1` to check the target every
    minute; `--no-equal-time` leaves out the 15-minute run. With `--ab "SETTINGS"` (repeatable)
    each arm gets its own `--target-bpb` runs, interleaved round by round against the one
    llama2.c target, and its own 15-minute run. `--train-on` lets each `--target-bpb` run
    train on past the target to `--minutes` (train.stop_at_target=false): every run then
    gives both its time to target and its bpb at `--minutes`, medians of `--runs`.

(e) `--ab "SETTINGS" --ab "SETTINGS" ...`: an A/B of cpu-profile variants on the race data at
    equal wall time (`--minutes`, default 5), each arm a space-separated list of KEY=VALUE
    (`""` = the profile as shipped), `--runs` rounds with the arms interleaved; the final
    bits per byte on the whole of valid.txt, steps and tokens per run, the median per arm.

Each part prints a table; results go to benchmarks/results/train-<part>-<cpu>.json.
Run it on a quiet machine: other processes on a 2-core CPU change every number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_id, cpu_name

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tinystories"
RACE_FILES = str(SHARED / "train-0[0-3]-*.txt")
RESULTS = ROOT / "benchmarks" / "results"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def save(part: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    fm = re.sub(r"family (\d+) model (\d+)", r"f\1m\2", cpu_id())  # "AMD EPYC" covers several generations
    path = RESULTS / f"train-{part}-{slug(f'{cpu_name()} {fm}')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def cpu_settings(**train: object):
    """The cpu profile as shipped, with train.* overrides (wandb off, quiet)."""
    from tinystory.settings import load_settings

    s = load_settings(profile="cpu", env={})
    return s.replace(train__wandb="off", **{f"train__{k}": v for k, v in train.items()})


def prepared_sample() -> Path:
    """The bundled sample prepared with the cpu profile's tokenizer (cached by prepare)."""
    from tinystory.prepare import prepare

    return prepare(cpu_settings())


def peak_flops(dtype) -> float:  # type: ignore[no-untyped-def]
    """The best dense matmul FLOP/s over a few square sizes, in `dtype`."""
    from tinystory.precision import peak_flops as measured_peak

    return measured_peak(dtype, "cpu", seconds=1.0)


# ------------------------------------------------------------------- (a) throughput


def plain_loop(data_path: Path, settings, precision: str, steps: int) -> float:  # type: ignore[no-untyped-def]
    """tokens/s of a hand-written loop over the same model, data order, batch and AdamW."""
    import numpy as np
    import torch

    from tinystory.data import BlockDataset, open_prepared
    from tinystory.model import build_config, build_model
    from tinystory.trainer import SeededOrder

    t = settings.train
    data = open_prepared(data_path)
    tok = data.tokenizer
    ds = BlockDataset(data.tokens("train"), t.block_size)
    torch.manual_seed(t.seed)
    model = build_model(build_config(settings.model.preset, len(tok), tok.bos_token_id, tok.eos_token_id))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), fused=t.optimizer == "adamw_torch_fused")
    order = iter(SeededOrder(len(ds), t.seed))
    B, T = t.batch_size, t.block_size

    def step() -> None:
        idx = [next(order) for _ in range(B)]
        x = torch.from_numpy(np.stack([np.asarray(ds.tokens[i * T:(i + 1) * T], dtype=np.int64) for i in idx]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss  # (B, T) -> scalar
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * B * T / (time.perf_counter() - t0)


def trainer_run(data_path: Path, precision: str, steps: int, out: Path) -> float:
    """tokens/s of `tinystory train` (training time only), from its metrics.jsonl."""
    from tinystory.training import train

    log_every = max(1, steps // 5)
    settings = cpu_settings(data=str(data_path), out=str(out), max_steps=steps + log_every, minutes=0.0,
                            precision=precision, eval_every=0, save_every=10**9, log_every=log_every,
                            eval_tokens=4096)
    run = train(settings)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r]
    rates = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # the first window holds the start-up
    return sorted(rates)[len(rates) // 2]


def part_a(short: bool) -> dict:
    import torch

    from tinystory.model import build_config, count_parameters
    from tinystory.precision import resolve

    data = prepared_sample()
    settings = cpu_settings()
    t = settings.train
    from tinystory.data import open_prepared

    tok = open_prepared(data).tokenizer
    config = build_config(settings.model.preset, len(tok))
    from tinystory.model import build_model

    torch.set_num_threads(t.threads or os.cpu_count() or 1)
    prec = resolve(t.precision, "cpu", build_model(config), (t.batch_size, t.block_size))
    print(f"precision: {prec.name} ({prec.reason})", file=sys.stderr)
    steps = 20 if short else 100
    n = count_parameters(config)
    peak = peak_flops(prec.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ours = trainer_run(data, prec.name, steps, Path(tmp) / "run")
    plain = plain_loop(data, settings, prec.name, steps)
    rows = {"tinystory train": ours, "plain PyTorch loop": plain}
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "preset": settings.model.preset,
              "parameters": n, "batch": t.batch_size, "block": t.block_size, "precision": prec.name,
              "precision_reason": prec.reason, "peak_flops": peak, "steps": steps,
              "tok_per_s": rows, "mfu": {k: 6 * n * v / peak for k, v in rows.items()},
              "ratio": ours / plain}
    print(f"\n(a) throughput, {settings.model.preset} ({n / 1e6:.2f}M), batch {t.batch_size} x {t.block_size}, "
          f"{prec.name}, peak {peak / 1e9:.0f} GFLOP/s ({cpu_name()})")
    for k, v in rows.items():
        print(f"  {k:22s} {v:9,.0f} tok/s   MFU {100 * 6 * n * v / peak:5.1f}%")
    print(f"  ratio {ours / plain:.2f}x")
    return result


# ----------------------------------------------------------------- (b) seed recipe


def seed_recipe(data_path: Path, settings, precision: str, seconds: float) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    """The seed's recipe for `seconds`: (useful tokens/s, the trained model)."""
    import numpy as np
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from tinystory.data import open_prepared
    from tinystory.model import build_config, build_model

    t = settings.train
    data = open_prepared(data_path)
    tok = data.tokenizer
    stream = np.asarray(data.tokens("train"), dtype=np.int64)
    ends = np.flatnonzero(stream == tok.eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    stories = [{"input_ids": stream[a:b + 1][: t.block_size].tolist()} for a, b in zip(starts, ends, strict=True)]
    torch.manual_seed(t.seed)
    model = build_model(build_config(settings.model.preset, len(tok), tok.bos_token_id, tok.eos_token_id))
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    useful = [0]

    def counting(batch):  # type: ignore[no-untyped-def]
        out = collate(batch)
        useful[0] += int(out["attention_mask"].sum())
        return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t0 = time.monotonic()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.elapsed = time.monotonic() - self.t0
            control.should_training_stop = self.elapsed >= seconds

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=t.batch_size, learning_rate=2e-5,
                                 num_train_epochs=100, use_cpu=True, bf16=precision == "bf16", report_to=[],
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=t.seed)
        trainer = Trainer(model=model, args=args, train_dataset=stories, data_collator=counting, callbacks=[clock])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints a dict on stdout
        trainer.train()
    return useful[0] / clock.elapsed, trainer.model


def val_bpb(model, data_path: Path, block: int, tokens: int = 65536) -> float:  # type: ignore[no-untyped-def]
    from tinystory.data import open_prepared
    from tinystory.evaluation import score_stream
    from tinystory.metrics import bits_per_byte
    from tinystory.tokenizer import token_byte_lengths

    data = open_prepared(data_path)
    model = model.float()
    sums = score_stream(model, data.tokens("val")[:tokens], block, 16, token_byte_lengths(data.tokenizer), "cpu")
    return bits_per_byte(sums["text_nats"], sums["bytes"])


def part_b(short: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tinystory.training import train

    data = prepared_sample()
    seconds = 60.0 if short else 300.0
    with tempfile.TemporaryDirectory() as tmp:
        run = train(cpu_settings(data=str(data), out=str(Path(tmp) / "ours"), minutes=seconds / 60))
        info = json.loads((run / "run.json").read_text())
        prec = info["precision"]
        ours_tps = info["tokens_seen"] / info["wall_time_s"]
        ours_bpb = val_bpb(AutoModelForCausalLM.from_pretrained(str(run)), data, 256)
    settings = cpu_settings()
    torch.set_num_threads(settings.train.threads or os.cpu_count() or 1)
    seed_tps, seed_model = seed_recipe(data, settings, prec, seconds)
    seed_bpb = val_bpb(seed_model, data, 256)
    result = {"cpu": cpu_name(), "seconds": seconds, "precision": prec,
              "ours": {"useful_tok_per_s": ours_tps, "val_bpb": ours_bpb},
              "seed": {"useful_tok_per_s": seed_tps, "val_bpb": seed_bpb},
              "speedup": ours_tps / seed_tps}
    print(f"\n(b) against the seed's recipe, {seconds:.0f} s each, {prec} ({cpu_name()})")
    print(f"  {'recipe':28s} {'useful tok/s':>12s} {'val bpb':>8s}")
    print(f"  {'seed (stories, pad, 2e-5)':28s} {seed_tps:12,.0f} {seed_bpb:8.3f}")
    print(f"  {'tinystory train --profile cpu':28s} {ours_tps:12,.0f} {ours_bpb:8.3f}")
    print(f"  useful tokens/s {ours_tps / seed_tps:.2f}x")
    return result


# ------------------------------------------------------------------- (c) quality


def stream_of(text_file: Path, tok) -> list[int]:  # type: ignore[no-untyped-def]
    """A text file of stories split on <|endoftext|> as training sees it: BOS + ids + EOS each."""
    stories = [s.strip() for s in text_file.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    ids: list[int] = []
    for enc in tok(stories, add_special_tokens=False)["input_ids"]:
        ids += [tok.bos_token_id, *enc, tok.eos_token_id]
    return ids


def part_c(minutes: float) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinystory.evaluation import score_stream
    from tinystory.metrics import bits_per_byte
    from tinystory.prepare import prepare
    from tinystory.settings import load_settings
    from tinystory.tokenizer import token_byte_lengths

    settings = load_settings(profile="cpu", overrides={"data.dataset": (RACE_FILES, "bench")})
    data = prepare(settings)
    cmd = [sys.executable, "-m", "tinystory", "train", "--profile", "cpu", "--data", str(data),
           "--minutes", f"{minutes:g}", "--no-wandb"]
    print("$", " ".join(cmd), file=sys.stderr)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    wall = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(proc.returncode)
    run = Path(proc.stdout.strip().splitlines()[-1])
    info = json.loads((run / "run.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(run)).eval()
    tok = AutoTokenizer.from_pretrained(str(run))
    ids = np.asarray(stream_of(SHARED / "valid.txt", tok), dtype=np.int64)
    block = settings.train.block_size
    sums = score_stream(model, ids, block, 16, token_byte_lengths(tok), "cpu")
    bpb = bits_per_byte(sums["text_nats"], sums["bytes"])
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(prompt, do_sample=False, max_new_tokens=200)
        torch.manual_seed(0)
        sampled = model.generate(prompt, do_sample=True, temperature=1.0, top_p=0.9, max_new_tokens=200)
    result = {"cpu": cpu_name(), "minutes": minutes, "command": " ".join(cmd[1:]), "wall_s": wall,
              "run": str(run), "steps": info["steps"], "tokens_seen": info["tokens_seen"],
              "tok_per_s": info["tokens_seen"] / info["wall_time_s"], "precision": info["precision"],
              "valid_txt_bpb": bpb, "valid_txt_loss": sums["nats"] / sums["tokens"],
              "greedy": tok.decode(greedy[0], skip_special_tokens=True),
              "sampled": tok.decode(sampled[0], skip_special_tokens=True)}
    print(f"\n(c) quality: {minutes:g} min of `tinystory train --profile cpu` on the four shared files "
          f"({cpu_name()}, {info['precision']})")
    print(f"  {info['steps']} steps, {info['tokens_seen']:,} tokens, {result['tok_per_s']:,.0f} tok/s")
    print(f"  valid.txt bits per byte: {bpb:.4f}")
    print(f"  greedy:  {result['greedy']}\n  sampled: {result['sampled']}")
    return result


# ------------------------------------------------------------------- (d) time to target


def race_data() -> Path:
    """The four shared training files with valid.txt as the validation split (the file
    names give the splits), prepared with the cpu profile's tokenizer (cached)."""
    from tinystory.prepare import prepare
    from tinystory.settings import load_settings

    return prepare(load_settings(profile="cpu", overrides={"data.dataset": (str(SHARED / "*.txt"), "bench")}))


def ours(data: Path, out: Path, minutes: float, target: float | None, sets: tuple[str, ...] = (),
         stories: bool = False) -> dict:
    """`tinystory train --profile cpu` on the race data in its own process; run.json, and
    stories where it ran with no target or `stories`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cmd = [sys.executable, "-m", "tinystory", "train", "--profile", "cpu", "--data", str(data), "--out", str(out),
           "--minutes", f"{minutes:g}", "--no-wandb", *(["--target-bpb", f"{target:.6f}"] if target else []),
           *[a for kv in sets for a in ("--set", kv)]]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.returncode)
    info = json.loads((out / "run.json").read_text())
    row = {"wall_s": round(time.monotonic() - t0, 1), "steps": info["steps"], "tokens_seen": info["tokens_seen"],
           "precision": info["precision"], "stopped_because": info["stopped_because"],
           "valid_bpb": info["final_eval"]["eval_bpb"], "valid_loss": info["final_eval"]["eval_loss"],
           "time_to_target_s": info.get("time_to_target_s"), "tokens_to_target": info.get("tokens_to_target")}
    if not target or stories:
        model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        tok = AutoTokenizer.from_pretrained(str(out))
        prompt = tok("Once upon a time", return_tensors="pt").input_ids
        with torch.no_grad():
            greedy = model.generate(prompt, do_sample=False, max_new_tokens=200)
            torch.manual_seed(0)
            sampled = model.generate(prompt, do_sample=True, temperature=1.0, top_p=0.9, max_new_tokens=200)
        row.update(greedy=tok.decode(greedy[0], skip_special_tokens=True),
                   sampled=tok.decode(sampled[0], skip_special_tokens=True))
    return row


def part_d(runs: int, minutes: float, sets: tuple[str, ...] = (), equal_time: bool = True,
           arms: tuple[str, ...] = ("",), train_on: bool = False, target: float = 0.0) -> dict:
    """llama2.c's 15 minutes, then `runs` interleaved rounds of a `--target-bpb` run per arm
    (each arm: space-separated KEY=VALUE on top of `sets`), then one 15-minute run per arm.
    With `train_on` the `--target-bpb` runs train on to `minutes` past the target
    (train.stop_at_target=false), so each run gives both measures and the 15-minute runs
    are left out. A given `target` replaces llama2.c's run (an A/B of the arms against a
    fixed bar; the ratios to llama2.c are then not side by side). The JSON is rewritten
    after every run, so a stopped benchmark keeps what it measured."""
    import statistics

    data = race_data()
    part = "time-to-target" + ("-ab" if len(arms) > 1 else "") + ("-fixed-target" if target else "")
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    equal: dict[str, dict] = {}
    result: dict = {"cpu": cpu_name(), "cpu_id": cpu_id(), "target_run_settings": list(sets),
                    "train_on_past_target": train_on}
    if train_on:
        sets = (*sets, "train.stop_at_target=false")

    def summary() -> dict:
        out = []
        for arm in arms:
            reached = [r["time_to_target_s"] for r in rows[arm] if r["time_to_target_s"] is not None]
            median = statistics.median(reached) if rows[arm] and len(reached) == len(rows[arm]) else None
            e = equal.get(arm)
            if train_on and rows[arm]:  # the run of the median bpb at `minutes`, with its stories
                e = sorted(rows[arm], key=lambda r: r["valid_bpb"])[(len(rows[arm]) - 1) // 2]
            out.append({"settings": arm or "(the cpu profile as shipped)", "runs": rows[arm],
                        "median_time_to_target_s": median,
                        "ratio_to_llama2c_time": median / (result["llama2c"]["minutes"] * 60) if median else None,
                        "equal_time": e, "bpb_below_llama2c": 1 - e["valid_bpb"] / result["target_bpb"] if e else None})
        return dict(result, arms=out)

    with tempfile.TemporaryDirectory() as tmp:
        if target:
            base = {"given_target": True, "valid_bpb": target, "minutes": 15.0, "train_s": 900.0}
        else:
            base_json = Path(tmp) / "llama2c.json"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama2c_baseline.py"), "--out", str(base_json),
                            "--minutes", "15"], check=True, cwd=ROOT)
            base = json.loads(base_json.read_text())
            target = base["valid_bpb"]
        result.update(llama2c=base, target_bpb=target, llama2c_time_s=base["train_s"])
        save(part, summary())
        for i in range(runs):
            for j, arm in enumerate(arms):  # interleaved: a drift of the machine hits every arm alike
                rows[arm].append(ours(data, Path(tmp) / f"target-{i}-{j}", minutes, target, (*sets, *arm.split()),
                                      stories=train_on))
                save(part, summary())
        for j, arm in enumerate(arms if equal_time and not train_on else ()):
            equal[arm] = ours(data, Path(tmp) / f"15min-{j}", 15.0, None, tuple(arm.split()))
            save(part, summary())
    result = summary()
    print(f"\n(d) time to llama2.c's 15-minute result, side by side ({cpu_name()}, {cpu_id()})")
    if base.get("given_target"):
        print(f"  target {target:.4f}, given (llama2.c not run here: its ratios are not side by side)")
    else:
        print(f"  llama2.c recipe, 15 min: {base['steps']} steps, {base['tok_per_s']:,.0f} tok/s "
              f"({base['precision']}); valid.txt bpb {target:.4f} = the target")
    for a in result["arms"]:
        print(f"  {a['settings']}:")
        for i, r in enumerate(a["runs"]):
            when = f"{r['time_to_target_s']:.0f} s" if r["time_to_target_s"] is not None else "not reached"
            print(f"    --target-bpb, run {i + 1}: {when} ({r['tokens_to_target'] or r['tokens_seen']:,} tokens)")
        if a["median_time_to_target_s"]:
            print(f"    median {a['median_time_to_target_s']:.0f} s = {a['ratio_to_llama2c_time']:.2f}x "
                  "llama2.c's 15 minutes")
        if a["equal_time"]:
            e = a["equal_time"]
            if train_on:
                print("    bpb at " + f"{minutes:g} min: " + ", ".join(f"{r['valid_bpb']:.4f}" for r in a["runs"]) +
                      " (the median run below)")
            print(f"    {minutes if train_on else 15:g} min: valid.txt bpb {e['valid_bpb']:.4f}, "
                  f"{100 * a['bpb_below_llama2c']:.1f}% below llama2.c's")
            print(f"    greedy:  {e['greedy']}\n    sampled: {e['sampled']}")
    return result


def part_e(arms: list[str], runs: int, minutes: float) -> dict:
    import statistics

    data = race_data()
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            for j, arm in enumerate(arms):  # interleaved: a drift of the machine hits every arm alike
                row = ours(data, Path(tmp) / f"run-{i}-{j}", minutes, None, tuple(arm.split()))
                rows[arm].append({k: row[k] for k in ("wall_s", "steps", "tokens_seen", "precision", "valid_bpb")})
    result = {"cpu": cpu_name(), "minutes": minutes, "arms": [
        {"settings": arm or "(the cpu profile as shipped)", "runs": rows[arm],
         "median_valid_bpb": statistics.median(r["valid_bpb"] for r in rows[arm]),
         "median_steps": statistics.median(r["steps"] for r in rows[arm])} for arm in arms]}
    print(f"\n(e) A/B at {minutes:g} minutes each, {runs} interleaved rounds ({cpu_name()})")
    for a in result["arms"]:
        bpbs = ", ".join(f"{r['valid_bpb']:.4f}" for r in a["runs"])
        print(f"  {a['settings']:48s} median bpb {a['median_valid_bpb']:.4f} ({bpbs}); "
              f"median {a['median_steps']:.0f} steps")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="(a)/(b) in ~3 minutes: a check that it works")
    ap.add_argument("--quality", action="store_true", help="(c) the 15-minute race instead of (a)/(b)")
    ap.add_argument("--minutes", type=float, default=15.0, help="(c) the race's training time")
    ap.add_argument("--parts", default="a,b", help="which of a,b to run")
    ap.add_argument("--time-to-target", action="store_true", help="(d) time to llama2.c's 15-minute bpb")
    ap.add_argument("--runs", type=int, default=3, help="(d) runs of `train --target-bpb` (the median is reported)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="(d) a setting for the --target-bpb runs, e.g. train.eval_every_minutes=1")
    ap.add_argument("--target", type=float, default=0.0,
                    help="(d) this bpb as the target instead of a llama2.c run here (an A/B of --ab arms against a "
                         "fixed bar; the ratios to llama2.c are then not side by side)")
    ap.add_argument("--no-equal-time", action="store_true", help="(d) leave out the 15-minute run")
    ap.add_argument("--train-on", action="store_true",
                    help="(d) the --target-bpb runs train on to --minutes past the target: each run gives its time "
                         "to target and its bpb at --minutes (the median of --runs), with no separate 15-minute run")
    ap.add_argument("--ab", action="append", default=[], metavar="SETTINGS",
                    help="(e) an A/B arm at equal --minutes (default 5): space-separated KEY=VALUE, '' = shipped; "
                         "with --time-to-target: the arms of the --target-bpb and 15-minute runs, interleaved")
    args = ap.parse_args()
    os.environ.setdefault("TINYSTORY_PLAIN", "1")
    if args.ab and not args.time_to_target:
        minutes = args.minutes if "--minutes" in sys.argv else 5.0
        save("ab-" + f"{minutes:g}min", part_e(args.ab, args.runs, minutes))
        return
    if args.time_to_target:
        part_d(args.runs, args.minutes, tuple(args.sets), not args.no_equal_time, tuple(args.ab) or ("",),
               args.train_on, args.target)
        return
    if args.quality:
        save("quality" if args.minutes == 15 else f"quality-{args.minutes:g}min", part_c(args.minutes))
        return
    if "a" in args.parts:
        save("throughput" + ("-short" if args.short else ""), part_a(args.short))
    if "b" in args.parts:
        save("seed" + ("-short" if args.short else ""), part_b(args.short))


if __name__ == "__main__":
    main()
