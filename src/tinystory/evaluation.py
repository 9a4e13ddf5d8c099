"""`tinystory eval`: loss, perplexity and bits per byte on the validation stream, and the
diversity and repetition of sampled stories, for one run; results saved as eval.json.

Order of work in `evaluate`: resolve the run -> load the model (`load_model`, the one
place that knows model formats) -> find the prepared data and check its tokenizer ->
score the validation stream in training's fixed-length blocks -> sample stories with a
fixed seed -> text metrics on them and on real validation stories (the reference) ->
write `<run>/eval.json`. Metric definitions live in `tinystory.metrics`.

eval.json (one flat object; `push` reads it for the model card):

    {"run": "/abs/run", "name": "run-dir-name",
     "metrics":   {"loss": 1.23, "ppl": 3.42, "bpb": 0.45, "distinct-1": .., "distinct-1-li": ..,
                   "self-bleu": .., "rep-2": .., "rep-3": .., "rep-4": .., "diversity": ..,
                   "bleu": .., "length": .., "eos-share": ..},   # only what was computed
     "reference": {same text-metric keys, on real validation stories},
     "settings":  {"data", "block_size", "max_tokens", "batch_size", "num_samples",
                   "max_new_tokens", "temperature", "top_p", "top_k", "seed", "device", "dtype"},
     "counts":    {"tokens", "text_tokens", "bytes", "blocks", "samples", "bleu_prompts"},
     "weights_sha256": "...", "tinystory_version": "...", "created": "ISO time"}

A later eval of the same weights under the same settings adds its metrics to the file;
anything else replaces it, so every number in eval.json belongs to one model state and
one set of settings.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinystory import metrics as M
from tinystory.errors import DataError, RunError, SettingsError

if TYPE_CHECKING:
    import numpy as np
    from rich.table import Table
    from transformers import PreTrainedTokenizerBase

    from tinystory.data import PreparedData
    from tinystory.settings import EvalSettings, Settings

LOSS_METRICS = ("loss", "ppl", "bpb")
TEXT_METRICS = ("distinct-n", "self-bleu", "rep-n", "length")
METRICS = (*LOSS_METRICS, *TEXT_METRICS, "bleu")
EVAL_JSON = "eval.json"


def parse_metrics(names: Sequence[str]) -> list[str]:
    """Validated metric names in canonical order (`all` = every metric), or a one-line
    SettingsError listing the valid names."""
    wanted = {n.strip().lower() for n in names if n.strip()}
    if "all" in wanted:
        return list(METRICS)
    for name in sorted(wanted):
        if name not in METRICS:
            close = difflib.get_close_matches(name, METRICS, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(f"unknown metric {name!r}", f"{guess}valid metrics: {', '.join(METRICS)}, all")
    if not wanted:
        raise SettingsError("no metric to compute", f"pass --metrics with some of: {', '.join(METRICS)}, all")
    return [m for m in METRICS if m in wanted]


# ------------------------------------------------------------------ model and data


def load_model(run: Path, device: str) -> tuple[Any, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a resolved run path, in eval mode.

    The one seam for model formats. A plain run dir or checkpoint loads with transformers
    in fp32 on `device` (exact, comparable numbers). A quantized folder (quantization.json)
    loads with `tinystory.quantization.load_quantized`, on the device its method needs
    (int8: CPU; bitsandbytes: CUDA); callers take the device from `model.device`. Any
    model returned here must give `model(input_ids).logits` (B, T, V) and have a
    transformers-style `.generate(...)`.
    """
    if run.suffix == ".gguf":
        raise RunError(f"{run.name} is a GGUF file, which eval cannot score",
                       "evaluate the run dir (or an int8 folder) instead; quantize reports the GGUF's bpb")
    if (run / "quantization.json").is_file():
        try:
            from tinystory.quantization import load_quantized
        except ImportError:
            raise RunError(f"{run} is a quantized model, which this version cannot evaluate",
                           "evaluate the unquantized run dir") from None
        model, tokenizer = load_quantized(run)
        return model.eval(), tokenizer
    import torch
    from transformers import AutoModelForCausalLM

    from tinystory import tokenizer as tok
    from tinystory.generation_hf import quiet_load

    model = quiet_load(lambda: AutoModelForCausalLM.from_pretrained(str(run), dtype=torch.float32))
    return model.to(device).eval(), tok.load(run)


def weights_kind(run: Path) -> str:
    """`fp32` for a run dir, else the quantization method its quantization.json names."""
    f = run / "quantization.json"
    if not f.is_file():
        return "fp32"
    try:
        return str(json.loads(f.read_text(encoding="utf-8")).get("method", "quantized"))
    except json.JSONDecodeError:
        return "quantized"


def _run_file(run: Path, name: str) -> Path | None:
    """`name` in the run's folder or up to two folders up, so a checkpoint
    (run/checkpoints/step-N), a quantized folder (run/int8) or a .gguf file finds the
    run dir's run.json and settings.toml."""
    folder = run if run.is_dir() else run.parent
    for f in (folder, folder.parent, folder.parent.parent):
        if (f / name).is_file():
            return f / name
    return None


def run_data_path(run: Path) -> str | None:
    """The prepared-data folder a run was trained on (run.json's data.path), if recorded."""
    f = _run_file(run, "run.json")
    if f is None:
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("data", {}).get("path") or None
    except json.JSONDecodeError:
        return None


def block_size_of(run: Path, settings: Settings, model: Any) -> int:
    """Training's block size: the run's settings.toml, else the current settings,
    capped at the model's position limit."""
    from tinystory.settings import from_toml

    f = _run_file(run, "settings.toml")
    size = from_toml(f.read_text(encoding="utf-8"), str(f)).train.block_size if f else settings.train.block_size
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(size, limit) if limit else size


def open_data(run: Path, tokenizer: PreTrainedTokenizerBase, path: str | None) -> PreparedData:
    """The prepared data at `path`, refused (one line) when its tokenizer is not the run's."""
    from tinystory.data import open_prepared
    from tinystory.tokenizer import fingerprint

    data = open_prepared(path)  # type: ignore[arg-type]
    if data.tokenizer_sha256 != fingerprint(tokenizer):
        raise DataError(
            f"prepared data {data.path} uses tokenizer {data.tokenizer_name} "
            f"({data.tokenizer_sha256[:12]}), not the tokenizer of run {run.name} ({fingerprint(tokenizer)[:12]})",
            "pass --data with the folder the run was trained on",
        )
    return data


def val_stories(tokens: np.ndarray, bos: int, eos: int, limit: int) -> list[np.ndarray]:
    """The token ids (without BOS/EOS) of the first `limit` stories of a stream."""
    import numpy as np

    out: list[np.ndarray] = []
    start = pos = 0
    chunk = 1 << 16
    while len(out) < limit and pos < len(tokens):
        ends = np.flatnonzero(np.asarray(tokens[pos : pos + chunk]) == eos) + pos
        for end in ends[: limit - len(out)]:
            ids = np.asarray(tokens[start:end], dtype=np.int64)
            out.append(ids[1:] if len(ids) and ids[0] == bos else ids)
            start = end + 1
        pos += chunk
    return out


# ------------------------------------------------------------------------ computing


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar on stderr (nothing when stderr is not a terminal or
    `what` is empty, e.g. inside training's own live display)."""
    from tinystory.console import console, interactive

    if not what or not interactive():
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*cols, console=console(), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def model_logits(model: Any) -> Callable[[Any], Any]:
    """A causal LM as a `forward` for `score_blocks`: ids (B, T) -> logits (B, T, V)."""
    return lambda x: model(input_ids=x, use_cache=False).logits


def score_blocks(
    forward: Callable[[Any], Any], tokens: np.ndarray, block_size: int, batch_size: int,
    byte_lengths: np.ndarray, device: Any = "cpu", what: str | None = None,
) -> dict[str, float]:
    """Sums of nats over a token stream cut into non-overlapping `block_size` blocks (the
    ragged tail dropped), as training sees it: in each block, tokens 2..T are targets.

    `forward` maps ids (B, T) to logits (B, T, V) (`model_logits`, or llama.cpp's scores
    in `quantization`), so training's evaluation, `eval` and `quantize` score alike.
    Returns nats/tokens over all targets, and text_nats/text_tokens/bytes over the text
    targets (those with UTF-8 bytes: specials are left out of both sums of bits per
    byte), plus the number of blocks. `what` names a transient progress bar.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise DataError(f"only {len(tokens)} validation tokens, fewer than one block of {block_size}",
                        "use more validation data or raise --max-tokens")
    nbytes = torch.from_numpy(np.asarray(byte_lengths, dtype=np.int64))
    sums = dict(nats=0.0, tokens=0, text_nats=0.0, text_tokens=0, bytes=0, blocks=n_blocks)
    with torch.no_grad(), _progress(n_blocks, what or "") as advance:
        for first in range(0, n_blocks, batch_size):
            B = min(batch_size, n_blocks - first)
            chunk = np.asarray(tokens[first * block_size : (first + B) * block_size], dtype=np.int64)
            x = torch.from_numpy(chunk).view(B, block_size).to(device)  # (B, T)
            logits = forward(x).float()  # (B, T, V)
            targets = x[:, 1:].reshape(-1)  # (B*(T-1),)
            nats = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.to(logits.device),
                                   reduction="none").double().cpu()  # (B*(T-1),)
            b = nbytes[targets.cpu()]  # (B*(T-1),) 0 for specials
            text = b > 0
            sums["nats"] += nats.sum().item()
            sums["tokens"] += targets.numel()
            sums["text_nats"] += nats[text].sum().item()
            sums["text_tokens"] += int(text.sum())
            sums["bytes"] += int(b.sum())
            advance(B)
    return sums


def score_stream(
    model: Any, tokens: np.ndarray, block_size: int, batch_size: int,
    byte_lengths: np.ndarray, device: Any = "cpu", what: str | None = "scoring",
) -> dict[str, float]:
    """`score_blocks` over a causal LM, in eval mode (its train/eval mode restored after)."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return score_blocks(model_logits(model), tokens, block_size, batch_size, byte_lengths, device, what)
    finally:
        model.train(was_training)


def generate(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], ev: EvalSettings,
    device: str = "cpu", what: str = "sampling",
) -> list[tuple[str, bool]]:
    """(text, ended) of a continuation of each prompt (token ids, BOS included), sampled
    in batches of `ev.batch_size` with left padding, seeded with `ev.seed` first, so the
    same settings give the same texts. `ended`: EOS came within `ev.max_new_tokens`."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    kw: dict[str, Any] = dict(max_new_tokens=ev.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              repetition_penalty=1.0, no_repeat_ngram_size=0)
    if ev.temperature > 0:  # every sampling knob set, so the run's generation_config cannot leak in
        kw.update(do_sample=True, temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k)
    else:
        kw.update(do_sample=False)
    torch.manual_seed(ev.seed)
    out: list[tuple[str, bool]] = []
    with torch.no_grad(), _progress(len(prompts), what) as advance:
        for first in range(0, len(prompts), ev.batch_size):
            batch = prompts[first : first + ev.batch_size]
            L = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in batch], device=device)  # (B, L)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch], device=device)  # (B, L)
            new = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, L:].cpu().tolist()  # (B, <=N)
            for row in new:
                ended = eos in row
                row = row[: row.index(eos)] if ended else row
                out.append((tokenizer.decode(row, skip_special_tokens=True), ended))
            advance(len(batch))
    return out


def _text_row(texts: Sequence[str], ended: Sequence[bool], names: Sequence[str]) -> dict[str, float]:
    row = M.text_metrics(texts, [*names, "length"])
    row["eos-share"] = M.share(ended)
    return row


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(run: str | Path | None, settings: Settings, metrics: Sequence[str] | None = None,
             data: str | Path | None = None, save: bool = True) -> dict[str, Any]:
    """Evaluate one run (a path, `latest`/None, or a hub id) and return the eval.json dict.

    metrics: names from METRICS (default `settings.eval.metrics`); data: a prepared folder
    (default `settings.eval.data`, else the run's run.json). With `save`, the result is
    written to `<run>/eval.json` (not for hub downloads or .gguf files).
    """
    from tinystory import __version__
    from tinystory.console import info
    from tinystory.runs import resolve_run

    names = parse_metrics(metrics if metrics is not None else settings.eval.metrics)
    ev = settings.eval
    local = run is None or str(run) == "latest" or Path(str(run)).expanduser().exists()
    path = resolve_run(run)
    device = _device()
    if ev.threads:
        import torch

        torch.set_num_threads(ev.threads)
    model, tokenizer = load_model(path, device)
    device = str(getattr(model, "device", device))  # a quantized model picks its own
    prepared = _eval_data(path, tokenizer, names, str(data or ev.data or "") or None)
    result: dict[str, Any] = {
        "run": str(path.resolve()), "name": path.name if local else str(run),
        "metrics": {}, "reference": {}, "counts": {},
        "settings": {"data": str(prepared.path.resolve()) if prepared else None,
                     "block_size": block_size_of(path, settings, model),
                     "max_tokens": ev.max_tokens, "batch_size": ev.batch_size, "num_samples": ev.num_samples,
                     "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "top_p": ev.top_p,
                     "top_k": ev.top_k, "seed": ev.seed, "device": device,
                     "dtype": weights_kind(path)},  # eval.threads is left out: it changes speed only
    }
    m, counts = result["metrics"], result["counts"]
    if any(n in LOSS_METRICS for n in names):
        assert prepared is not None  # _eval_data raised otherwise
        loss, sums = loss_metrics(model, tokenizer, prepared, ev, result["settings"]["block_size"], device)
        m.update({k: v for k, v in loss.items() if k in names})
        counts.update(sums)
    stories = (val_stories(prepared.tokens("val"), tokenizer.bos_token_id, tokenizer.eos_token_id, ev.num_samples)
               if prepared is not None else [])
    text_names = [n for n in names if n in TEXT_METRICS]
    if text_names:
        samples = generate(model, tokenizer, [[tokenizer.bos_token_id]] * ev.num_samples, ev, device)
        m.update(_text_row([t for t, _ in samples], [e for _, e in samples], text_names))
        counts["samples"] = len(samples)
        if stories:  # real stories cut at the same token limit, so lengths compare
            real = [tokenizer.decode(ids[: ev.max_new_tokens].tolist()) for ids in stories]
            result["reference"] = _text_row(real, [len(ids) < ev.max_new_tokens for ids in stories], text_names)
    if "bleu" in names:
        m["bleu"], counts["bleu_prompts"] = bleu_metric(model, tokenizer, stories, ev, device)

    result.update(weights_sha256=weights_sha256(path), tinystory_version=__version__,
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if save and local and path.is_dir():
        result = save_eval(path, result)
        info(f"saved {path / EVAL_JSON}")
    return result


def _eval_data(run: Path, tokenizer: PreTrainedTokenizerBase, names: Sequence[str],
               asked: str | None) -> PreparedData | None:
    """The prepared data to score and to take real stories from: `asked` (--data), else
    the run's run.json. Errors when the metrics need it; text metrics alone go without
    (no reference row), with a warning."""
    from tinystory.console import warn

    needed = any(n in LOSS_METRICS or n == "bleu" for n in names)
    path = asked or run_data_path(run)
    if path is None:
        if needed:
            raise DataError(f"no prepared data known for run {run.name} (it has no run.json naming it)",
                            "pass --data with the prepared folder it was trained on")
        warn("no prepared data known for this run, so no reference row (pass --data to get one)")
        return None
    try:
        return open_data(run, tokenizer, path)
    except DataError as e:
        if needed or asked:
            raise
        warn(f"no reference row: {e}")  # run.json's data moved away; text metrics need none
        return None


def loss_metrics(model: Any, tokenizer: PreTrainedTokenizerBase, prepared: PreparedData, ev: EvalSettings,
                 block_size: int, device: str) -> tuple[dict[str, float], dict[str, Any]]:
    """({loss, ppl, bpb}, counts) over the validation stream (capped at `ev.max_tokens`)."""
    from tinystory.tokenizer import token_byte_lengths

    tokens = prepared.tokens("val")
    tokens = tokens[: ev.max_tokens] if ev.max_tokens else tokens
    s = score_stream(model, tokens, block_size, ev.batch_size, token_byte_lengths(tokenizer), device)
    loss = M.mean_loss(s["nats"], s["tokens"])
    values = {"loss": loss, "ppl": M.perplexity(loss), "bpb": M.bits_per_byte(s["text_nats"], s["bytes"])}
    return values, {k: s[k] for k in ("tokens", "text_tokens", "bytes", "blocks")}


def bleu_metric(model: Any, tokenizer: PreTrainedTokenizerBase, stories: Sequence[np.ndarray], ev: EvalSettings,
                device: str) -> tuple[float, int]:
    """(BLEU, prompts): the model continues the first half (by words) of each real story;
    sacrebleu corpus BLEU of the continuations against the true second halves."""
    pairs = [p for p in (M.split_prompt(tokenizer.decode(ids.tolist())) for ids in stories) if p]
    if not pairs:
        raise DataError("no validation story to cut into prompts for bleu", "use prepared data with a val split")
    prompts = [tokenizer(prompt).input_ids for prompt, _ in pairs]  # BOS + first half
    cont = generate(model, tokenizer, prompts, ev, device, what="continuing")
    return M.corpus_bleu([t for t, _ in cont], [truth for _, truth in pairs]), len(pairs)


# ------------------------------------------------------------------------- eval.json


def weights_sha256(run: Path) -> str:
    """sha256 over the run's weight files (safetensors / gguf), in name order."""
    files = [run] if run.is_file() else sorted(p for p in run.iterdir() if p.suffix in (".safetensors", ".gguf"))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def save_eval(run: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write `<run>/eval.json` atomically; keep earlier numbers of the same weights and
    settings that this eval did not recompute. Returns what was written."""
    f = run / EVAL_JSON
    try:
        old = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
    except json.JSONDecodeError:
        old = None
    if old and old.get("weights_sha256") == result["weights_sha256"] and old.get("settings") == result["settings"]:
        for key in ("metrics", "reference", "counts"):
            result[key] = {**old.get(key, {}), **result[key]}
    fd, tmp = tempfile.mkstemp(dir=run, prefix=".eval.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, f)
    return result


# ----------------------------------------------------------------------------- table

ROWS: list[tuple[str, str, str]] = [  # key, label, number format
    ("loss", "loss (nats/token)", "{:.4f}"),
    ("ppl", "perplexity", "{:.3f}"),
    ("bpb", "bits per byte", "{:.4f}"),
    *[(f"distinct-{n}", f"distinct-{n}", "{:.4f}") for n in (1, 2, 3, 4)],
    *[(f"distinct-{n}-li", f"distinct-{n} (Li)", "{:.4f}") for n in (1, 2, 3, 4)],
    ("self-bleu", "self-BLEU", "{:.2f}"),
    *[(f"rep-{n}", f"rep-{n} %", "{:.2f}") for n in (2, 3, 4)],
    ("diversity", "diversity", "{:.4f}"),
    ("bleu", "BLEU (continuations)", "{:.2f}"),
    ("length", "length (words)", "{:.1f}"),
    ("eos-share", "ended with EOS", "{:.1%}"),
]
LEGEND = (
    "distinct-n: unique / all n-grams of lower-cased words across stories; (Li): unique n-grams / words "
    "(Li et al. 2016). self-BLEU: 0-100, higher = stories more alike. rep-n: % of repeated n-grams within "
    "a story (SimCTG); diversity = prod(1 - rep-n/100). BLEU: sacrebleu, model continuations of half "
    "stories vs their true endings. val stories: real stories cut at the same token limit."
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return "nan" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def table(results: Sequence[dict[str, Any]]) -> Table:
    """Runs side by side (one column each) plus a column per distinct reference row;
    the settings that shape the numbers as the last rows."""
    from rich.table import Table

    refs: list[dict[str, Any]] = []
    for r in results:
        if r.get("reference") and r["reference"] not in refs:
            refs.append(r["reference"])
    t = Table(title="tinystory eval", title_justify="left", caption=LEGEND, caption_justify="left")
    t.add_column("metric")
    for r in results:
        t.add_column(r["name"], justify="right", overflow="fold")
    for i, _ in enumerate(refs):
        t.add_column("val stories" + (f" ({i + 1})" if len(refs) > 1 else ""), justify="right", style="dim")
    present = {k for r in results for k in (*r["metrics"], *r.get("reference", {}))}
    for key, label, fmt in ROWS:
        if key in present:
            t.add_row(label, *[_fmt(r["metrics"].get(key), fmt) for r in results],
                      *[_fmt(ref.get(key), fmt) for ref in refs])
    t.add_section()
    t.add_row("tokens scored", *[str(r["counts"].get("tokens", "-")) for r in results], *["" for _ in refs])
    t.add_row("block size", *[str(r["settings"]["block_size"]) for r in results], *["" for _ in refs])
    for label, fmt in SETTING_ROWS:
        t.add_row(label, *[fmt.format(**r["settings"]) for r in results], *["" for _ in refs])
    return t


SETTING_ROWS = [
    ("samples", "{num_samples} x <={max_new_tokens} tokens"),
    ("sampling", "T={temperature} top_p={top_p} top_k={top_k}"),
    ("seed", "{seed}"),
]
