"""Writing the run dir: the final model (atomically), run.json, generation_config.json and
loss.png. Rank 0 only; the callers make sure of that."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory import console

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tinystory.callbacks import Live
    from tinystory.data import PreparedData
    from tinystory.precision import Precision
    from tinystory.settings import Settings

RUN_JSON = "run.json"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """A run dir's run.json ({} when there is none yet)."""
    f = run_dir / RUN_JSON
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def device_name(device: str) -> str:
    """`cuda: <GPU name>` or `cpu: <model name> (N threads)`, for run.json."""
    import torch

    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows, else "unknown"."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def write_run_json(run_dir: Path, settings: Settings, data: PreparedData, prec: Precision, device: str,
                    live: Live, state: Any, stopped: str, init_from: str | None) -> dict[str, Any]:
    from tinystory import __version__

    steps = state.global_step if state is not None else 0
    info = {
        "tinystory_version": __version__,
        "profile": settings.profile,
        "preset": settings.model.preset,
        "parameters": live.parameters,
        "data": {"path": str(data.path), "tokenizer": data.tokenizer_name, "tokenizer_sha256": data.tokenizer_sha256},
        "steps": steps,
        "tokens_seen": steps * live.tokens_per_step,
        "wall_time_s": round(live.wall(), 2) if state is not None else 0.0,
        "device": device_name(device),
        "world_size": live.world_size,
        "precision": prec.name,
        "precision_reason": prec.reason,
        "schedule_steps": live.schedule.total,
        "best_eval_loss": live.best.get("eval_loss"),
        "best_eval_bpb": live.best.get("eval_bpb"),
        "best_step": live.best.get("step"),
        "last_eval": live.last_eval or None,
        "init_from": init_from,
        "stopped_because": stopped,
    }
    write_atomic(run_dir / RUN_JSON, json.dumps(info, indent=2) + "\n")
    return info


def finalize(model: PreTrainedModel, live: Live, settings: Settings, tok: PreTrainedTokenizerBase,
              run_dir: Path) -> None:
    """Write the best model (by eval loss) as the run dir's model, atomically."""
    best = run_dir / "checkpoints" / "best" / "model.safetensors"
    if live.best and live.best.get("step") != live.last_eval.get("step") and best.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(best)), strict=False)  # tied lm_head is not stored
        model.tie_weights()
        console.info(f"keeping the best model: step {live.best['step']} (eval loss {live.best['eval_loss']:.4f})")
    model.generation_config = generation_config(settings, tok)
    save_model_atomic(model, tok, run_dir)


def generation_config(settings: Settings, tok: PreTrainedTokenizerBase) -> Any:
    """Sampling defaults from the generate section, so plain `model.generate()` tells stories."""
    from transformers import GenerationConfig

    g = settings.generate
    return GenerationConfig(
        do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        repetition_penalty=g.repetition_penalty, max_new_tokens=g.max_new_tokens,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def save_model_atomic(model: PreTrainedModel, tok: PreTrainedTokenizerBase, run_dir: Path) -> None:
    """save_pretrained into a temp folder inside the run dir, then rename each file into
    place, weights last: a crash leaves the old model or the new one, never half a file."""
    tmp = run_dir / f".model-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    for f in sorted(tmp.iterdir(), key=lambda p: p.name.startswith("model")):
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def plot(run_dir: Path) -> None:
    """loss.png: training and evaluation loss against tokens seen (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        console.warn("matplotlib is not installed: no loss.png (metrics.jsonl has the numbers)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if r]
    tr = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["tokens"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", ms=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(run_dir / "loss.png")
