"""Metric functions against small hand-computed examples (tinystory.metrics)."""

from __future__ import annotations

import math

import pytest
from conftest import sample_stories

from tinystory import metrics as M


def test_words_lowercase_keep_inner_apostrophes_drop_punctuation():
    assert M.words("Don't stop! The cat, the CAT.\n\n'Hi'") == ["don't", "stop", "the", "cat", "the", "cat", "hi"]
    assert M.words("") == [] and M.words(" ,.! ") == []


def test_ngrams():
    assert M.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert M.ngrams(["a", "b"], 3) == []


def test_distinct_n_across_stories():
    texts = ["The cat, the cat.", "A dog"]  # words: the cat the cat | a dog
    assert M.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat the), (a dog)
    assert M.distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert M.distinct_n(["a b", "c d"], 2) == 1.0  # no n-gram across stories: (b c) does not exist


def test_distinct_n_li_divides_by_words():
    texts = ["The cat, the cat.", "A dog"]
    assert M.distinct_n_li(texts, 1) == pytest.approx(4 / 6)
    assert M.distinct_n_li(texts, 2) == pytest.approx(3 / 6)
    assert M.distinct_n_li(texts, 4) == pytest.approx(1 / 6)


def test_distinct_n_edge_cases():
    assert M.distinct_n([], 1) == 0.0
    assert M.distinct_n(["", ""], 1) == 0.0
    assert M.distinct_n(["a b", "c"], 3) == 0.0  # every story shorter than n
    assert M.distinct_n(["a b c", "x", ""], 3) == 1.0
    assert M.distinct_n_li(["", ""], 2) == 0.0
    assert M.distinct_n_li(["a", "b"], 2) == 0.0  # words but no bigram


def test_rep_n_is_pooled_within_stories():
    # story 1: 3 bigrams, 2 unique; story 2: 1 bigram, 1 unique -> 100 * (1 - 3/4)
    # (averaging per story would give 16.67)
    assert M.rep_n(["the cat the cat", "a dog"], 2) == pytest.approx(25.0)
    assert M.rep_n(["a a a a"], 2) == pytest.approx(100 * 2 / 3)
    assert M.rep_n(["a b a b", "a b"], 2) == pytest.approx(100 * (1 - 3 / 4))  # repeats across stories do not count
    assert M.rep_n(["a", ""], 2) == 0.0
    assert M.rep_n([], 4) == 0.0


def test_diversity_product():
    assert M.diversity({2: 25.0, 3: 50.0, 4: 0.0}) == pytest.approx(0.375)
    assert M.diversity({2: 0.0, 3: 0.0, 4: 0.0}) == 1.0


def test_self_bleu_hand_computed():
    # each vs the other: precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert M.self_bleu(["the cat sat on the mat", "the cat sat on a mat"]) == pytest.approx(expected)
    assert expected == pytest.approx(53.72850)
    assert M.self_bleu(["a b c d", "a b c d"]) == pytest.approx(100.0)


def test_self_bleu_edge_cases():
    assert M.self_bleu([]) == 0.0
    assert M.self_bleu(["only one story"]) == 0.0
    assert M.self_bleu(["", "a b c d", "a b c d"]) == pytest.approx(200 / 3)  # the empty one scores 0


def test_self_bleu_equals_sacrebleu_sentence_scores():
    from sacrebleu.metrics import BLEU

    texts = [*sample_stories("val", 12), "", "Lily", "Lily Lily Lily", sample_stories("val", 1)[0]]
    bleu = BLEU(effective_order=True)
    slow = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    assert M.self_bleu(texts) == pytest.approx(sum(slow) / len(slow), abs=1e-9)


def test_corpus_bleu():
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(53.72850, abs=1e-4)
    assert M.corpus_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert M.corpus_bleu([""], ["a b"]) == 0.0
    assert M.corpus_bleu([], []) == 0.0
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        M.corpus_bleu(["a"], ["a", "b"])


def test_split_prompt_by_words_keeps_formatting():
    assert M.split_prompt("Once upon a time there was a cat.") == ("Once upon a time", "there was a cat.")
    assert M.split_prompt("a b c") == ("a", "b c")
    assert M.split_prompt("a b\n\nc d") == ("a b", "c d")
    assert M.split_prompt("one") is None
    assert M.split_prompt("") is None


def test_loss_ppl_bpb():
    assert M.mean_loss(6.0, 3) == 2.0
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(7)) == pytest.approx(7.0)
    assert M.bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        M.mean_loss(1.0, 0)
    with pytest.raises(ValueError):
        M.bits_per_byte(1.0, 0)


def test_length_and_share():
    assert M.mean_words(["a b", "", "c d e f"]) == 2.0
    assert M.mean_words([]) == 0.0
    assert M.share([True, False, True, True]) == 0.75
    assert M.share([]) == 0.0


def test_text_metrics_keys():
    row = M.text_metrics(["the cat the cat", "a dog"], ["distinct-n", "rep-n", "self-bleu", "length"])
    assert list(row) == [
        "distinct-1", "distinct-2", "distinct-3", "distinct-4",
        "distinct-1-li", "distinct-2-li", "distinct-3-li", "distinct-4-li",
        "self-bleu", "rep-2", "rep-3", "rep-4", "diversity", "length",
    ]
    assert row["rep-2"] == pytest.approx(25.0) and row["length"] == 3.0
    assert M.text_metrics(["a"], ["rep-n"]) == {"rep-2": 0.0, "rep-3": 0.0, "rep-4": 0.0, "diversity": 1.0}
