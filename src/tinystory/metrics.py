"""Evaluation metrics as pure functions: numbers in, numbers out, no model, no I/O.

Each docstring is the metric's exact definition (the README repeats them). Text metrics
work on *words*: the lower-cased text split by `words()`; BLEU and self-BLEU use
sacrebleu's own tokenizer (13a) so they match published sacrebleu numbers.

Scales: `distinct-*`, `diversity` and `eos-share` are fractions in [0, 1]; `rep-*`, `bleu`
and `self-bleu` are percentages in [0, 100] (as SimCTG and sacrebleu report them).
Where a ratio has nothing to count (no n-grams at all), it is 0.0, never NaN, so every
result stays valid JSON.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import sacrebleu
from sacrebleu.metrics import BLEU

WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """The words of `text`: lower-cased runs of letters/digits/underscore, inner
    apostrophes kept ("Don't!" -> ["don't"]); punctuation and whitespace dropped."""
    return WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All len(tokens) - n + 1 contiguous n-grams (none when the text is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ------------------------------------------------------------------------ loss metrics


def mean_loss(sum_nats: float, n_tokens: float) -> float:
    """Cross-entropy in nats per token: sum of -ln p(target) / number of targets."""
    if n_tokens <= 0:
        raise ValueError("no tokens were scored")
    return sum_nats / n_tokens


def perplexity(loss: float) -> float:
    """exp(loss): the effective number of equally likely next tokens."""
    return math.exp(loss)


def bits_per_byte(sum_nats: float, n_bytes: float) -> float:
    """Bits per byte = sum of nats over the scored tokens / (ln 2 x UTF-8 bytes of their text).

    Both sums run over the same target tokens, with the special tokens (BOS, EOS) left
    out of both, so the number is per byte of story text and compares across tokenizers.
    """
    if n_bytes <= 0:
        raise ValueError("the scored tokens hold no text bytes")
    return sum_nats / (math.log(2) * n_bytes)


# ------------------------------------------------------------------------ text metrics


def distinct_n(texts: Iterable[str], n: int) -> float:
    """distinct-n: unique n-grams across all texts / total n-grams across all texts.

    N-grams are of `words()` and never cross from one text into the next. 0.0 when the
    texts hold no n-gram at all (all empty or shorter than n words).
    """
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def distinct_n_li(texts: Iterable[str], n: int) -> float:
    """distinct-n as Li et al. 2016 define it: unique n-grams across all texts / total
    *words* across all texts (token-normalised, so it shrinks a little as n grows).

    0.0 when the texts hold no word.
    """
    seen: set[tuple[str, ...]] = set()
    total_words = 0
    for text in texts:
        w = words(text)
        seen.update(ngrams(w, n))
        total_words += len(w)
    return len(seen) / total_words if total_words else 0.0


def rep_n(texts: Iterable[str], n: int) -> float:
    """rep-n (SimCTG, Su et al. 2022): 100 x (1 - U / T), where U sums the number of
    unique n-grams *within* each text and T the number of n-grams of each text (pooled
    over texts, not averaged). 0.0 when there is no n-gram.

    Words are `words()` (SimCTG splits on spaces and skips each text's last n-gram; we
    count all n-grams of lower-cased words).
    """
    unique = total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        unique += len(set(grams))
        total += len(grams)
    return 100.0 * (1.0 - unique / total) if total else 0.0


def diversity(rep: dict[int, float]) -> float:
    """SimCTG diversity: prod over n in (2, 3, 4) of (1 - rep-n / 100)."""
    return math.prod(1.0 - rep[n] / 100.0 for n in (2, 3, 4))


def self_bleu(texts: Sequence[str]) -> float:
    """Self-BLEU: the mean over texts of sacrebleu sentence BLEU-4 (0-100, exponential
    smoothing, effective order) of each text against all the *other* texts as references.

    Higher means the texts resemble each other more (less diverse). 0.0 for fewer than
    two texts; an empty text scores 0 against the others. Equal to averaging
    `BLEU(effective_order=True).sentence_score(t, others)`, but each text is tokenized
    once and each n-gram keeps its two largest counts, so it runs in O(n), not O(n^2).
    Only sacrebleu's public API: its 13a tokenizer and `BLEU.compute_bleu`.
    """

    if len(texts) < 2:
        return 0.0
    bleu = BLEU(effective_order=True)
    order = bleu.max_ngram_order
    counts, lengths = [], []
    for t in texts:
        words = bleu.tokenizer(t.rstrip()).split()  # sacrebleu's own segment preprocessing
        counts.append(Counter(tuple(words[i : i + n]) for n in range(1, order + 1)
                              for i in range(len(words) - n + 1)))
        lengths.append(len(words))
    # n-gram -> (largest count, its text, second largest count): the best count among the
    # *other* texts is the largest unless that text is the hypothesis itself.
    top: dict[tuple[str, ...], tuple[int, int, int]] = {}
    for i, grams in enumerate(counts):
        for g, c in grams.items():
            best, owner, second = top.get(g, (0, -1, 0))
            top[g] = (c, i, best) if c > best else (best, owner, max(second, c))
    scores = []
    for i, grams in enumerate(counts):
        correct = [0] * order
        total = [0] * order
        for g, c in grams.items():
            best, owner, second = top[g]
            total[len(g) - 1] += c
            correct[len(g) - 1] += min(c, second if owner == i else best)
        others = lengths[:i] + lengths[i + 1 :]
        ref_len = min(others, key=lambda n: (abs(n - lengths[i]), n))  # sacrebleu: the closest, shorter on ties
        scores.append(BLEU.compute_bleu(correct, total, lengths[i], ref_len, smooth_method=bleu.smooth_method,
                                        smooth_value=bleu.smooth_value, effective_order=True,
                                        max_ngram_order=order).score)
    return sum(scores) / len(scores)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU-4 (0-100, default 13a tokenizer, one reference per
    hypothesis). 0.0 when there is no hypothesis."""

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def split_prompt(story: str) -> tuple[str, str] | None:
    """Cut a story in half by words (whitespace-separated, so often mid-sentence):
    (text before the first word of the second half, without trailing space; the second
    half from that word on). None for a story of fewer than two words."""
    starts = [m.start() for m in re.finditer(r"\S+", story)]
    if len(starts) < 2:
        return None
    cut = starts[len(starts) // 2]
    return story[:cut].rstrip(), story[cut:]


def mean_words(texts: Sequence[str]) -> float:
    """Mean story length in `words()` (0.0 for no texts)."""
    return sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0


def share(flags: Sequence[bool]) -> float:
    """Fraction of True flags (e.g. stories that ended with EOS before the token limit)."""
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def text_metrics(texts: Sequence[str], names: Iterable[str]) -> dict[str, float]:
    """The text metric groups in `names` (distinct-n, self-bleu, rep-n, length) for `texts`,
    flat: distinct-1..4, distinct-1-li..distinct-4-li, self-bleu, rep-2..4, diversity, length."""
    names = set(names)
    out: dict[str, float] = {}
    if "distinct-n" in names:
        for n in (1, 2, 3, 4):
            out[f"distinct-{n}"] = distinct_n(texts, n)
        for n in (1, 2, 3, 4):
            out[f"distinct-{n}-li"] = distinct_n_li(texts, n)
    if "self-bleu" in names:
        out["self-bleu"] = self_bleu(texts)
    if "rep-n" in names:
        rep = {n: rep_n(texts, n) for n in (2, 3, 4)}
        out.update({f"rep-{n}": v for n, v in rep.items()})
        out["diversity"] = diversity(rep)
    if "length" in names:
        out["length"] = mean_words(texts)
    return out
