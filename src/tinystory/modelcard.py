"""The model card (README.md) of a pushed run: Hub metadata, then a page worth reading.

Everything comes from the run dir: config.json (architecture), run.json (training
summary), settings.toml, eval.json (numbers and, when present, sample stories). A run
without eval.json gets a card that says so and no `model-index`. Sample stories are taken
from eval.json or generated here with plain `transformers` `generate` and a fixed seed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCardData
from transformers import AutoConfig, set_seed

from tinystory.console import warn
from tinystory.loading import load_model, quiet_load
from tinystory.model import count_parameters, describe
from tinystory.runs import HUB_ID, Run
from tinystory.settings import GenerateSettings
from tinystory.tokenizer import decode

HOMEPAGE = "https://github.com/tinystory-llm/tinystory-llm"
DATASET = "roneneldan/TinyStories"
PROMPTS = ("Once upon a time", "Lily and her dog", "One day, a little boy")
SEED = 42
MAX_NEW_TOKENS = 160
TAGS = ["tinystories", "tinystory-llm", "mistral", "story-generation", "small-language-model"]

# eval.json metric key -> (model-index type, label shown, what it means); the definitions
# are those of `tinystory.metrics`.
METRICS: dict[str, tuple[str, str, str]] = {
    "loss": ("loss", "Validation loss", "cross-entropy per token, nats (lower is better)"),
    "ppl": ("perplexity", "Perplexity", "exp(loss) (lower is better)"),
    "bpb": ("bits_per_byte", "Bits per byte", "loss per UTF-8 byte of text, comparable across tokenizers (lower "
            "is better)"),
    "self-bleu": ("self-bleu", "Self-BLEU", "BLEU-4 of each story against the others, 0-100 (lower = more varied)"),
    "diversity": ("diversity", "Diversity", "SimCTG: product of (1 - rep-n/100) for n = 2, 3, 4 (higher = less "
                  "repetitive)"),
    "bleu": ("bleu", "BLEU", "continuations of half stories against their true endings, 0-100"),
    "length": ("length", "Length", "mean words per story"),
    "eos-share": ("eos-share", "Ended", "share of stories that ended (EOS) before the token limit"),
    **{f"judge-{c}": (f"judge-{c}", f"Judge: {c}", f"1-10, {what} (graded by {{judge}})") for c, what in (
        ("grammar", "is the completion grammatical"), ("creativity", "how creative it is"),
        ("consistency", "does it fit the story's beginning"), ("plot", "does the plot make sense"))},
    "judge-age": ("judge-age", "Judge: age", "the writer's age in years the judge guessed ({judge})"),
}
COUNTS = {"tokens", "bytes", "stories", "samples", "seconds", "num_samples", "wall_time_s"}
PATTERNS = (
    (r"distinct-(\d+)", "Distinct-{n}", "unique / all word {n}-grams across stories (higher = more varied)"),
    (r"distinct-(\d+)-li", "Distinct-{n} (Li)", "unique word {n}-grams / all words (Li et al. 2016)"),
    (r"rep-(\d+)", "Rep-{n}", "% of repeated word {n}-grams within a story (lower = less repetitive)"),
)

CITATION = """```bibtex
@article{eldan2023tinystories,
  title   = {TinyStories: How Small Can Language Models Be and Still Speak Coherent English?},
  author  = {Eldan, Ronen and Li, Yuanzhi},
  journal = {arXiv preprint arXiv:2305.07759},
  year    = {2023}
}
```"""

LIMITATIONS = """- It knows only the world of TinyStories: short, simple stories with the vocabulary of a
  three- to four-year-old, written by GPT-3.5 and GPT-4. It is not a general assistant, follows
  no instructions and knows no facts; do not use it for anything that needs to be true.
- English only. Its context is short (the block size it was trained on), and longer stories
  drift: names change, plots loop, sentences repeat.
- It inherits the biases and the narrow range of the synthetic training stories, and its output
  is not filtered. Read what it writes before you show it to a child.
- Small models are sensitive to sampling settings: too low a temperature repeats, too high
  rambles. The settings shown with the samples are a good start."""


# -------------------------------------------------------------------- reading


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_meta(key: str) -> tuple[str, str, str]:
    """(model-index type, label, meaning) of an eval.json metric key."""
    if key in METRICS:
        return METRICS[key]
    for pattern, label, meaning in PATTERNS:
        m = re.fullmatch(pattern, key.replace("_", "-"))
        if m:
            return key, label.format(n=m.group(1)), meaning.format(n=m.group(1))
    return key, key, ""


def eval_metrics(eval_data: dict[str, Any] | None) -> dict[str, float]:
    """The numeric metrics of eval.json, in file order (counts such as `tokens` left out)."""
    metrics = (eval_data or {}).get("metrics") or {}
    return {k: v for k, v in metrics.items() if _number(v) and k not in COUNTS}


def dataset_id(settings: Any) -> str:
    """The Hub dataset the run was trained on (TinyStories unless another hub id was used)."""

    name = getattr(getattr(settings, "data", None), "dataset", "") or DATASET
    local = name == "sample" or name.startswith((".", "/", "~")) or Path(name).exists()
    return name if HUB_ID.match(name) and not local else DATASET


# ------------------------------------------------------------------- metadata


def front_matter(repo_id: str, eval_data: dict[str, Any] | None, dataset: str, quantized: list[str]) -> str:
    """The YAML metadata block (without the --- fences), built with huggingface_hub."""

    name = repo_id.split("/")[-1]
    results = [
        EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=dataset,
                   dataset_name="TinyStories", dataset_split="validation", metric_type=metric_meta(k)[0],
                   metric_name=metric_meta(k)[1], metric_value=v)
        for k, v in eval_metrics(eval_data).items()
    ]
    tags = TAGS + (["gguf"] if any(q.endswith(".gguf") for q in quantized) else [])
    data = ModelCardData(
        language=["en"], license="apache-2.0", library_name="transformers", pipeline_tag="text-generation",
        datasets=[dataset], tags=tags, model_name=name if results else None, eval_results=results or None,
        widget=[{"text": PROMPTS[0]}],
    )
    return data.to_yaml().rstrip("\n") + "\n"


# ------------------------------------------------------------------- sections


def _human(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:g}"


def _duration(seconds: float) -> str:
    m = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.2f}" if abs(v) < 1e5 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    return "\n".join(lines)


def model_section(config: Any, preset: str | None) -> str:
    """Architecture table from `tinystory.model.describe(config)`."""

    d = describe(config)
    window = f"sliding window {d['sliding_window']}, " if d["sliding_window"] else ""
    rows = [
        ("Architecture", "`MistralForCausalLM` (decoder-only transformer, RoPE, RMSNorm)"),
        ("Parameters", f"{d['parameters']:,} ({_human(d['parameters'])})"
         + (", embeddings tied to the output head" if getattr(config, "tie_word_embeddings", False) else "")),
        ("Preset", f"`{preset}`" if preset else None),
        ("Layers", d["layers"]),
        ("Hidden size", d["hidden"]),
        ("Attention heads", f"{d['heads']} ({d['kv_heads']} key/value heads)"),
        ("MLP width", f"{d['mlp']} (gated, `{d['activation']}`)"),
        ("Context", f"{window}{d['max_positions']} positions"),
        ("Vocabulary", f"{d['vocab']:,} tokens"),
    ]
    return "## Model\n\n" + _table(rows)


def tokenizer_section(spec: str | None, vocab: int, sha: str | None) -> str:
    """What the tokenizer is and how it was made (`spec` trusted only when the vocab agrees)."""
    if spec == f"bpe:{vocab}":
        text = (f"A byte-level BPE with {vocab:,} tokens (`{spec}`) trained by tinystory-llm on the training "
                "stories: small vocabularies suit small models.")
    elif spec == "mistral" and vocab == 32000:
        text = f"The Mistral v1 sentencepiece BPE ({vocab:,} tokens), the tokenizer of Mistral-7B-v0.1."
    else:
        text = f"A {vocab:,}-token tokenizer (`tokenizer.json`)."
    text += " Stories are fed as `<s>` + text + `</s>`; the tokenizer adds `<s>` by itself."
    return "## Tokenizer\n\n" + text + (f" SHA-256 of the tokenizer: `{sha}`." if sha else "")


def training_section(run_info: dict[str, Any], settings: Any) -> str:
    """Profile, steps, tokens, hardware, wall time and the optimisation settings."""
    t = getattr(settings, "train", None)
    wall: Any = run_info.get("wall_time_s")
    best = run_info.get("best_eval_loss")
    rows: list[tuple[str, Any]] = [
        ("Profile", f"`{run_info.get('profile') or getattr(settings, 'profile', '')}`"),
        ("Steps", _fmt(run_info["steps"]) if "steps" in run_info else None),
        ("Tokens seen", f"{run_info['tokens_seen']:,} ({_human(run_info['tokens_seen'])})"
         if _number(run_info.get("tokens_seen")) else None),
        ("Hardware", run_info.get("device")),
        ("Precision", run_info.get("precision")),
        ("Wall time", _duration(float(wall)) if _number(wall) else None),
        ("Best validation loss", f"{best:.4f} (bits per byte {run_info['best_eval_bpb']:.4f})"
         if _number(best) and _number(run_info.get("best_eval_bpb")) else (_fmt(best) if _number(best) else None)),
        ("Stopped because", run_info.get("stopped_because")),
    ]
    if t is not None:
        rows += [
            ("Context length", f"{t.block_size} tokens per block (packed, no padding)"),
            ("Batch", f"{t.batch_size} blocks x {t.grad_accum} accumulation steps"),
            ("Learning rate", f"{t.lr:g} peak, {t.warmup_steps} warmup steps, cosine to {t.min_lr_ratio:g}x"),
            ("Optimizer", f"`{t.optimizer}`, betas ({t.beta1:g}, {t.beta2:g}), weight decay {t.weight_decay:g}"),
            ("Seed", t.seed),
        ]
    version = run_info.get("tinystory_version")
    intro = f"Trained from scratch with tinystory-llm{f' {version}' if version else ''}."
    if not run_info:
        intro += " The run recorded no summary (run.json), so only its settings are shown."
    tail = ("\n\nThe files beside the weights say the rest: `settings.toml` (every setting and where it came "
            "from), `run.json` (this summary), `metrics.jsonl` (loss and learning rate per logged step).")
    return "## Training\n\n" + intro + "\n\n" + _table([r for r in rows if r[1] not in ("``",)]) + tail


def current_eval(run: Path, quiet: bool = False) -> dict[str, Any] | None:
    """eval.json if it belongs to the run's present weights (its `weights_sha256` matches), else None."""
    the_run = Run(run)
    data = the_run.eval_results
    if data and data.get("weights_sha256") and data["weights_sha256"] != the_run.weights_sha256():
        if not quiet:
            warn("eval.json was made for other weights (the model changed after `tinystory eval`): it is left out; "
                 "run `tinystory eval` again to publish numbers")
        return None
    return data


def _eval_setup(eval_data: dict[str, Any]) -> str:
    """One sentence on what was scored and how the stories were sampled."""
    s, c = eval_data.get("settings") or {}, eval_data.get("counts") or {}
    parts = []
    if _number(c.get("tokens")):
        scored = f"{c['tokens']:,} validation tokens" + (f" ({c['bytes']:,} bytes)" if _number(c.get("bytes")) else "")
        parts.append(scored + (f" in blocks of {s['block_size']}" if "block_size" in s else ""))
    if _number(c.get("samples")):
        how = ", ".join(f"{k} {s[k]}" for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed") if k in s)
        parts.append(f"text metrics on {c['samples']} stories sampled from `<s>`" + (f" ({how})" if how else ""))
    return ("Scored " + "; ".join(parts) + ".") if parts else ""


def eval_section(eval_data: dict[str, Any] | None) -> str:
    """The eval.json numbers beside the real-story reference, or 'not evaluated yet'."""
    metrics = eval_metrics(eval_data)
    if not eval_data or not metrics:
        return ("## Evaluation\n\nNot evaluated yet: run `tinystory eval --run RUN_DIR` and push again to add "
                "loss, perplexity, bits per byte and story-diversity numbers.")
    ref = eval_data.get("reference") or {}
    judge = eval_data.get("judge") or {}
    judge_name = f"`{(judge.get('judge') or {}).get('model', 'an LLM')}`"
    lines = ["| Metric | This model | Real stories | Meaning |", "|---|---|---|---|"]
    for k, v in metrics.items():
        _, label, meaning = metric_meta(k)
        r = ref.get(k)
        if k.startswith("judge-"):  # with its 95% interval
            mine, real = _judge_cell(judge, "scores", k, v), _judge_cell(judge, "reference", k, r)
        else:
            mine, real = _fmt(v), _fmt(r) if _number(r) else ""
        lines.append(f"| {label} | {mine} | {real} | {meaning.replace('{judge}', judge_name)} |")
    text = "## Evaluation\n\nOn the TinyStories validation split; `eval.json` holds every number.\n\n"
    text += "\n".join(lines)
    if ref:
        text += "\n\n*Real stories*: the same text metrics on validation stories cut at the same token limit."
    if judge.get("scores"):
        who, c = judge.get("judge") or {}, judge.get("counts") or {}
        text += (f"\n\n*Judge*: {judge_name} graded {c.get('stories', '?')} completions of "
                 f"{who.get('openings', '?')} story openings (and the real endings, as *Real stories*) with the "
                 "TinyStories paper's rubric (`tinystory eval --metrics judge`); ± is half a 95% confidence interval.")
    setup = _eval_setup(eval_data)
    return text + (f"\n\n{setup}" if setup else "")


def _judge_cell(judge: dict[str, Any], group: str, key: str, value: Any) -> str:
    """A judge score as "7.12 ± 0.31" (with its 95% interval when eval.json has one)."""
    if not _number(value):
        return ""
    ci = ((judge.get(group) or {}).get(key.removeprefix("judge-")) or {}).get("ci95")
    return f"{value:.2f}" + (f" ± {(ci[1] - ci[0]) / 2:.2f}" if ci else "")


def _escape(text: str) -> str:
    """Markdown-escape model output, so a stray ``` or # cannot break the page."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def _story(prompt: str, story: str) -> str:
    """The prompt in bold, then the story, as a Markdown block quote."""
    story = story.strip()
    rest = story[len(prompt):] if story.startswith(prompt) else (" " + story if story[:1].isalnum() else story)
    text = f"**{_escape(prompt)}**{_escape(rest)}"
    return "\n".join("> " + line if line.strip() else ">" for line in text.splitlines())


def samples_section(samples: list[dict[str, str]], sampling: dict[str, Any], source: str) -> str:
    """Two or three stories with their prompts and the sampling settings that made them."""
    if not samples:
        return ""
    shown = ", ".join(f"`{k}={v}`" for k, v in sampling.items())
    head = f"## Sample stories\n\n{source}" + (f" Sampling settings: {shown}." if shown else "")
    return head + "\n\n" + "\n\n".join(_story(s["prompt"], s["story"]) for s in samples)


def usage_section(repo_id: str, sampling: dict[str, Any], quantized: list[str]) -> str:
    """How to use the model with plain transformers and with the tinystory command."""
    t, p = sampling.get("temperature", 1.0), sampling.get("top_p", 0.9)
    text = f"""## Usage

With `transformers` (no tinystory needed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForCausalLM.from_pretrained("{repo_id}")
inputs = tokenizer("{PROMPTS[0]}", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=200, do_sample=True, temperature={t}, top_p={p})
print(tokenizer.decode(output[0], skip_special_tokens=True))
```

With [tinystory-llm]({HOMEPAGE}), which streams the story as it is written:

```bash
pip install tinystory-llm
tinystory generate --run {repo_id} "{PROMPTS[0]}"
```"""
    if quantized:
        text += "\n\n### Quantized variants\n\n" + "\n".join(f"- `{q}`" for q in quantized)
        ggufs = [q for q in quantized if q.endswith(".gguf")]
        if ggufs:
            text += (f"\n\nThe GGUF files run in llama.cpp, e.g. after `hf download {repo_id} {ggufs[0]} "
                     f"--local-dir .`: `llama-cli -m {ggufs[0]} -p \"{PROMPTS[0]}\" -n 200`.")
    return text


# -------------------------------------------------------------------- samples


def card_sampling(settings: Any) -> dict[str, Any]:
    """The sampling settings of the card's stories: the run's `generate` section, a fixed seed."""

    g = getattr(settings, "generate", None) or GenerateSettings()
    out: dict[str, Any] = {"temperature": g.temperature, "top_p": g.top_p}
    if g.top_k:
        out["top_k"] = g.top_k
    if g.repetition_penalty != 1.0:
        out["repetition_penalty"] = g.repetition_penalty
    return {**out, "max_new_tokens": min(MAX_NEW_TOKENS, g.max_new_tokens), "seed": SEED}


def generate_samples(run: Path, sampling: dict[str, Any], prompts: tuple[str, ...] = PROMPTS) -> list[dict[str, str]]:
    """One story per prompt with plain transformers `generate` (seeded per prompt, one CPU thread)."""

    loaded, tok = quiet_load(lambda: load_model(Run(run), "cpu"))  # checked: no remote code, readable weights
    model: Any = loaded  # transformers types generate() too loosely for mypy
    args = {k: v for k, v in sampling.items() if k != "seed"}
    threads = torch.get_num_threads()
    # Token-by-token decoding of a small model: a second thread mostly adds sync cost, and on a
    # busy 2-core machine it made the 40M model 8x slower (2.3 vs 19 tok/s).
    torch.set_num_threads(1)
    stories = []
    try:
        for i, prompt in enumerate(prompts):
            set_seed(sampling["seed"] + i)  # each story reproducible on its own, none a copy of another
            inputs = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, do_sample=True, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                     **args)
            stories.append({"prompt": prompt, "story": decode(tok, out[0].tolist())})
    finally:
        torch.set_num_threads(threads)
    return stories


def _samples(run: Path, eval_data: dict[str, Any] | None, settings: Any) -> tuple[list[dict], dict, str]:
    """(stories, sampling settings, sentence saying where they come from)."""
    given = [s for s in (eval_data or {}).get("samples") or [] if isinstance(s, dict) and "prompt" in s
             and "story" in s]
    if given:
        setup = (eval_data or {}).get("settings") or {}
        keys = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
        sampling = {k: setup[k] for k in keys if k in setup and not (k == "top_k" and not setup[k])}
        return given[:3], sampling, "Taken from the evaluation run (`eval.json`), unedited."
    sampling = card_sampling(settings)
    return generate_samples(run, sampling), sampling, ("Written by this model when the card was made, unedited "
                                                      "(plain `transformers` `generate`; story i uses seed + i).")


# ----------------------------------------------------------------------- card


def model_card(run: Path, repo_id: str, quantized_files: list[str] | None = None) -> str:
    """The full README.md text for `run` published as `repo_id`."""

    config = AutoConfig.from_pretrained(run)
    settings = Run(run).settings
    run_info = Run(run).info
    eval_data = current_eval(run, quiet=True)  # upload_sources has warned
    quantized = list(quantized_files or [])
    data = run_info.get("data") or {}
    dataset = dataset_id(settings)
    preset = run_info.get("preset") or getattr(getattr(settings, "model", None), "preset", None)
    spec = data.get("tokenizer") or getattr(getattr(settings, "data", None), "tokenizer", None)
    samples, sampling, source = _samples(run, eval_data, settings)
    params = _human(count_parameters(config))
    name = repo_id.split("/")[-1]
    curve = sorted(p.name for p in run.glob("*.png") if not p.name.startswith("."))
    intro = (f"# {name}\n\nA {params}-parameter language model that writes short stories for young children, "
             f"trained from scratch on [TinyStories](https://huggingface.co/datasets/{dataset}) with "
             f"[tinystory-llm]({HOMEPAGE}). It is a small Mistral-architecture decoder, so it loads with plain "
             "`transformers`.")
    if curve:
        intro += f"\n\n![Training curve]({curve[0]})"
    parts = [
        "---\n" + front_matter(repo_id, eval_data, dataset, quantized) + "---", intro,
        model_section(config, preset), tokenizer_section(spec, config.vocab_size, data.get("tokenizer_sha256")),
        training_section(run_info, settings), eval_section(eval_data), samples_section(samples, sampling, source),
        usage_section(repo_id, sampling, quantized), "## Limitations\n\n" + LIMITATIONS,
        "## Citation\n\nThe training data is TinyStories (CDLA-Sharing-1.0):\n\n" + CITATION,
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
