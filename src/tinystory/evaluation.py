"""`tinystory eval`: loss, perplexity and bits per byte on the validation stream, the
diversity and repetition of sampled stories and, with `judge`, an LLM judge's grades of
them (`tinystory.judge`), for one run; results saved as eval.json.

Order of work in `evaluate`: resolve the run -> check the judge server (judge only) ->
load the model (`load_model`, the one place that knows model formats) -> find the
prepared data and check its tokenizer -> score the validation stream in training's
fixed-length blocks -> sample stories with a fixed seed -> text metrics on them and on
real validation stories (the reference) -> the judge's grades of completed openings ->
write `<run>/eval.json`. Metric definitions live in `tinystory.metrics`.

eval.json (one flat object; `push` reads it for the model card):
    {"run": "/abs/run", "name": "run-dir-name",
     "metrics":   {"loss": 1.23, "ppl": 3.42, "bpb": 0.45, "distinct-1": .., "distinct-1-li": ..,
                   "self-bleu": .., "rep-2": .., "rep-3": .., "rep-4": .., "diversity": ..,
                   "bleu": .., "length": .., "eos-share": .., "judge-grammar": .., "judge-creativity": ..,
                   "judge-consistency": .., "judge-plot": .., "judge-age": ..},   # only what was computed
     "reference": {same text-metric keys, on real validation stories},
     "settings":  {"data", "block_size", "max_tokens", "batch_size", "num_samples",
                   "max_new_tokens", "temperature", "top_p", "top_k", "seed", "device", "dtype"},
     "counts":    {"tokens", "text_tokens", "bytes", "blocks", "samples", "bleu_prompts"},
     "judge":     {"judge": {model, url, rubric, ...}, "scores": {"grammar": {"mean", "ci95", "n",
                   "judge_sd"}, ...}, "reference": {same, real endings}, "counts": {...},
                   "stories": [...], "reference_stories": [...]},   # with the judge metric only
     "weights_sha256": "...", "tinystory_version": "...", "created": "ISO time"}

A later eval of the same weights under the same settings adds its metrics to the file;
anything else replaces it, so every number in eval.json belongs to one model state and
one set of settings.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from tinystory import __version__
from tinystory import judge as J
from tinystory import metrics as M
from tinystory.console import info, warn
from tinystory.data import PreparedData
from tinystory.errors import DataError, RunError, SettingsError
from tinystory.loading import load_model, pick_device
from tinystory.paths import write_atomic
from tinystory.progress import bar
from tinystory.runs import EVAL_JSON, Run
from tinystory.scoring import score_stream
from tinystory.settings import EvalSettings, Settings
from tinystory.tokenizer import decode, token_byte_lengths

LOSS_METRICS = ("loss", "ppl", "bpb")
TEXT_METRICS = ("distinct-n", "self-bleu", "rep-n", "length")
METRICS = (*LOSS_METRICS, *TEXT_METRICS, "bleu")  # what `all` means
JUDGE = "judge"  # graded by a judge server (tinystory.judge): only when asked for by name
VALID = (*METRICS, JUDGE)


def parse_metrics(names: Sequence[str]) -> list[str]:
    """Validated metric names in canonical order (`all` = every metric but judge), or a
    one-line SettingsError listing the valid names."""
    wanted = {n.strip().lower() for n in names if n.strip()}
    if "all" in wanted:
        return [*METRICS, *([JUDGE] if JUDGE in wanted else [])]
    for name in sorted(wanted):
        if name not in VALID:
            close = difflib.get_close_matches(name, VALID, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(f"unknown metric {name!r}", f"{guess}valid metrics: {', '.join(VALID)}, all")
    if not wanted:
        raise SettingsError("no metric to compute", f"pass --metrics with some of: {', '.join(VALID)}, all")
    return [m for m in VALID if m in wanted]


# ------------------------------------------------------------------------- data


def val_stories(tokens: np.ndarray, bos: int, eos: int, limit: int) -> list[np.ndarray]:
    """The token ids (without BOS/EOS) of the first `limit` stories of a stream."""
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


def continue_prompts(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], ev: EvalSettings,
    device: str = "cpu", what: str = "sampling",
) -> list[tuple[str, bool]]:
    """(text, ended) of a continuation of each prompt (token ids, BOS included), sampled
    in batches of `ev.batch_size` with left padding, seeded with `ev.seed` first, so the
    same settings give the same texts. `ended`: EOS came within `ev.max_new_tokens`."""
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
    with torch.no_grad(), bar(len(prompts), what) as advance:
        for first in range(0, len(prompts), ev.batch_size):
            batch = prompts[first : first + ev.batch_size]
            L = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in batch], device=device)  # (B, L)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch], device=device)  # (B, L)
            new = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, L:].cpu().tolist()  # (B, <=N)
            for row in new:
                ended = eos in row
                row = row[: row.index(eos)] if ended else row
                out.append((decode(tokenizer, row), ended))
            advance(len(batch))
    return out


def _text_row(texts: Sequence[str], ended: Sequence[bool], names: Sequence[str]) -> dict[str, float]:
    row = M.text_metrics(texts, [*names, "length"])
    row["eos-share"] = M.share(ended)
    return row


def evaluate(run: str | Path | None, settings: Settings, metrics: Sequence[str] | None = None,
             data: str | Path | None = None, save: bool = True) -> dict[str, Any]:
    """Evaluate one run (a path, `latest`/None, or a hub id) and return the eval.json dict.

    metrics: names from METRICS (default `settings.eval.metrics`); data: a prepared folder
    (default `settings.eval.data`, else the run's run.json). With `save`, the result is
    written to `<run>/eval.json` (not for hub downloads or .gguf files).
    """
    names = parse_metrics(metrics if metrics is not None else settings.eval.metrics)
    ev = settings.eval
    the_run = Run.open(run)
    path = the_run.path
    if the_run.is_gguf:
        raise RunError(f"{path.name} is a GGUF file, which eval cannot score",
                       "evaluate the run dir (or an int8 folder) instead; quantize reports the GGUF's bpb")
    judge = J.Judge.from_settings(settings) if JUDGE in names else None
    if judge is not None:
        judge.check()  # a wrong URL, key or model fails here, in seconds, before the model loads
    if ev.threads:
        torch.set_num_threads(ev.threads)
    model, tokenizer = load_model(the_run, pick_device(ev.device))
    device = str(model.device)  # a quantized model picks its own
    prepared = (_eval_data(the_run, tokenizer, names, str(data or ev.data or "") or None)
                if set(names) - {JUDGE} else None)  # the judge's openings ship with tinystory
    block_size = the_run.block_size(settings.train.block_size, model.config.max_position_embeddings)
    result: dict[str, Any] = {
        "run": str(path.resolve()), "name": path.name if the_run.local else str(run),
        "metrics": {}, "reference": {}, "counts": {},
        "settings": {"data": str(prepared.path.resolve()) if prepared else None,
                     "block_size": block_size,
                     "max_tokens": ev.max_tokens, "batch_size": ev.batch_size, "num_samples": ev.num_samples,
                     "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "top_p": ev.top_p,
                     "top_k": ev.top_k, "seed": ev.seed, "device": device,
                     "dtype": the_run.weights},  # eval.threads is left out: it changes speed only
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
        samples = continue_prompts(model, tokenizer, [[tokenizer.bos_token_id]] * ev.num_samples, ev, device)
        m.update(_text_row([t for t, _ in samples], [e for _, e in samples], text_names))
        counts["samples"] = len(samples)
        if stories:  # real stories cut at the same token limit, so lengths compare
            real = [decode(tokenizer, ids[: ev.max_new_tokens].tolist()) for ids in stories]
            result["reference"] = _text_row(real, [len(ids) < ev.max_new_tokens for ids in stories], text_names)
    if "bleu" in names:
        m["bleu"], counts["bleu_prompts"] = bleu_metric(model, tokenizer, stories, ev, device)
    if judge is not None:
        result["judge"] = judge_metric(model, tokenizer, ev, device, judge)
        m.update(J.flat(result["judge"]["scores"]))
        result["reference"].update(J.flat(result["judge"]["reference"]))

    result.update(weights_sha256=the_run.weights_sha256(), tinystory_version=__version__,
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if save and the_run.local and path.is_dir():
        result = save_eval(path, result)
        info(f"saved {path / EVAL_JSON}")
    return result


def _eval_data(run: Run, tokenizer: PreTrainedTokenizerBase, names: Sequence[str],
               asked: str | None) -> PreparedData | None:
    """The prepared data to score and to take real stories from: `asked` (--data), else
    the run's run.json. Errors when the metrics need it; text metrics alone go without
    (no reference row), with a warning."""
    needed = any(n in LOSS_METRICS or n == "bleu" for n in names)
    if not needed and (asked or run.data_path) is None:
        warn("no prepared data known for this run, so no reference row (pass --data to get one)")
        return None
    try:
        return run.data(tokenizer, asked)
    except DataError as e:
        if needed or asked:
            raise
        warn(f"no reference row: {e}")  # run.json's data moved away; text metrics need none
        return None


def loss_metrics(model: Any, tokenizer: PreTrainedTokenizerBase, prepared: PreparedData, ev: EvalSettings,
                 block_size: int, device: str) -> tuple[dict[str, float], dict[str, Any]]:
    """({loss, ppl, bpb}, counts) over the validation stream (capped at `ev.max_tokens`)."""
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
    pairs = [p for p in (M.split_prompt(decode(tokenizer, ids.tolist())) for ids in stories) if p]
    if not pairs:
        raise DataError("no validation story to cut into prompts for bleu", "use prepared data with a val split")
    prompts = [tokenizer(prompt).input_ids for prompt, _ in pairs]  # BOS + first half
    cont = continue_prompts(model, tokenizer, prompts, ev, device, what="continuing")
    return M.corpus_bleu([t for t, _ in cont], [truth for _, truth in pairs]), len(pairs)


def judge_metric(model: Any, tokenizer: PreTrainedTokenizerBase, ev: EvalSettings, device: str,
                 judge: J.Judge) -> dict[str, Any]:
    """The judge's grades (the `judge` section of eval.json): the model completes each of
    the first `ev.judge_openings` shipped openings `ev.judge_samples` times (seeded, eval's
    sampling settings); the reference is their real endings, cut at the same token limit."""
    openings = J.load_openings(ev.judge_openings)
    prompts = [tokenizer(o.beginning).input_ids for o in openings for _ in range(ev.judge_samples)]  # BOS + text
    texts = continue_prompts(model, tokenizer, prompts, ev, device, what="completing openings")
    stories = [J.Story(o.id, j, o.beginning, texts[i * ev.judge_samples + j][0])
               for i, o in enumerate(openings) for j in range(ev.judge_samples)]
    reference = [J.Story(o.id, 0, o.beginning, _cut_text(tokenizer, o.ending, ev.max_new_tokens))
                 for o in openings] if ev.judge_reference else []
    return J.report(judge, stories, reference, ev.judge_repeats,
                    {"openings": len(openings), "samples": ev.judge_samples})


def _cut_text(tokenizer: PreTrainedTokenizerBase, text: str, limit: int) -> str:
    """`text` cut after its first `limit` tokens (whole when shorter), leading space kept."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= limit:
        return text
    return text[: len(text) - len(text.lstrip())] + decode(tokenizer, ids[:limit]).lstrip()


# ------------------------------------------------------------------------- eval.json


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
        if "judge" in old and "judge" not in result:  # an eval without the judge keeps its grades
            result["judge"] = old["judge"]
    write_atomic(f, json.dumps(result, indent=2) + "\n")
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
    refs: list[dict[str, Any]] = []
    owners: list[dict[str, Any]] = []  # the result each reference column came with
    for r in results:
        if r.get("reference") and r["reference"] not in refs:
            refs.append(r["reference"])
            owners.append(r)
    judged = [r for r in results if r.get("judge")]
    caption = LEGEND + (JUDGE_LEGEND.format(judge=judged[0]["judge"]["judge"]["model"]) if judged else "")
    t = Table(title="tinystory eval", title_justify="left", caption=caption, caption_justify="left")
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
    for key in (*J.CRITERIA, "age") if judged else ():
        t.add_row(f"judge: {key}", *[_judge_cell(r, "scores", key) for r in results],
                  *[_judge_cell(r, "reference", key) for r in owners])
    t.add_section()
    t.add_row("tokens scored", *[str(r["counts"].get("tokens", "-")) for r in results], *["" for _ in refs])
    t.add_row("block size", *[str(r["settings"]["block_size"]) for r in results], *["" for _ in refs])
    for label, fmt in SETTING_ROWS:
        t.add_row(label, *[fmt.format(**r["settings"]) for r in results], *["" for _ in refs])
    if judged:
        t.add_row("judge", *[_judge_setup(r) for r in results], *["" for _ in refs])
    return t


JUDGE_LEGEND = (" judge: grades 1-10 by {judge} (the TinyStories paper's rubric) of completions of story openings, "
                "mean ± 95% confidence interval; age: the writer's age it guessed, years; val stories: the real "
                "endings.")


def _judge_cell(result: dict[str, Any], group: str, key: str) -> str:
    """A judge score as "7.12 ± 0.31" (mean ± half its 95% interval), the mean alone, or "-"."""
    score = (result.get("judge") or {}).get(group, {}).get(key) or {}
    if score.get("mean") is None:
        return "-"
    ci = score.get("ci95")
    return f"{score['mean']:.2f}" + (f" ± {(ci[1] - ci[0]) / 2:.2f}" if ci else "")


def _judge_setup(result: dict[str, Any]) -> str:
    """Who judged how many stories, and how many answers held no grades."""
    j = result.get("judge")
    if not j:
        return "-"
    c, who = j["counts"], j["judge"]
    sds = [j["scores"][k].get("judge_sd") for k in J.CRITERIA]
    spread = ", judge sd " + "/".join(f"{v:.2f}" for v in sds) if None not in sds else ""
    return (f"{who['model']}: {c['stories']} stories x {who['repeats']}, {c['unparsed']} unparsed, "
            f"{c['failed']} failed{spread}")


SETTING_ROWS = [
    ("samples", "{num_samples} x <={max_new_tokens} tokens"),
    ("sampling", "T={temperature} top_p={top_p} top_k={top_k}"),
    ("seed", "{seed}"),
]
