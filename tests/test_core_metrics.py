"""tinystory.metrics at its edges: the exact guards and messages, a trailing hyphen in
self-BLEU, two-word stories, and every value text_metrics returns (issue #37's mutants)."""

from __future__ import annotations

import math

import pytest

from tinystory import metrics as M


def test_one_token_and_one_byte_are_enough():
    assert M.mean_loss(3.5, 1) == 3.5
    assert M.bits_per_byte(math.log(2), 1) == pytest.approx(1.0)
    assert M.mean_loss(1.5, 0.5) == 3.0  # fractional counts (averaged sums) are fine


@pytest.mark.parametrize("n", [0, -1])
def test_nothing_scored_is_an_error_naming_what_is_missing(n):
    with pytest.raises(ValueError) as e:
        M.mean_loss(1.0, n)
    assert str(e.value) == "no tokens were scored"
    with pytest.raises(ValueError) as e:
        M.bits_per_byte(1.0, n)
    assert str(e.value) == "the scored tokens hold no text bytes"


def test_self_bleu_strips_the_end_of_a_text_as_sacrebleu_does():
    # sacrebleu right-strips a segment before its 13a tokenizer, which deletes "-\n":
    # "mat-\n" stays the token "mat-" (5 of 6 words shared), it does not become "mat"
    from sacrebleu.metrics import BLEU

    texts = ["the cat sat on the mat-\n", "the cat sat on the mat"]
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert M.self_bleu(texts) == pytest.approx(expected) == pytest.approx(75.98357, abs=1e-5)
    bleu = BLEU(effective_order=True)
    assert bleu.sentence_score(texts[0], texts[1:]).score == pytest.approx(expected)


def test_split_prompt_of_two_words():
    assert M.split_prompt("Lily smiled.") == ("Lily", "smiled.")
    assert M.split_prompt("  Lily  ") is None


def test_text_metrics_values_equal_the_metric_functions():
    texts = ["The cat sat. The cat ran.", "A dog sat on the mat.", "the the the the"]
    row = M.text_metrics(texts, ["distinct-n", "self-bleu", "rep-n", "length"])
    # words: the cat sat the cat ran | a dog sat on the mat | the the the the  (16 words)
    assert row["distinct-1"] == pytest.approx(8 / 16)  # the cat sat ran a dog on mat
    assert row["distinct-2"] == pytest.approx(10 / 13)  # "the cat" twice, "the the" three times
    assert row["distinct-3"] == pytest.approx(9 / 10)  # "the the the" twice
    assert row["distinct-4"] == 1.0
    assert row["distinct-1-li"] == pytest.approx(8 / 16)
    assert row["distinct-2-li"] == pytest.approx(10 / 16)
    assert row["distinct-3-li"] == pytest.approx(9 / 16)
    assert row["distinct-4-li"] == pytest.approx(7 / 16)
    assert row["self-bleu"] == pytest.approx(M.self_bleu(texts)) and row["self-bleu"] > 0
    assert row["rep-2"] == pytest.approx(100 * 3 / 13)
    assert row["rep-3"] == pytest.approx(10.0)
    assert row["rep-4"] == 0.0
    assert row["diversity"] == pytest.approx((1 - 3 / 13) * 0.9)
    assert row["length"] == pytest.approx(16 / 3)
    assert M.text_metrics(texts, ["self-bleu"]) == {"self-bleu": row["self-bleu"]}
    assert M.text_metrics(texts, []) == {}
