"""tinystory.scoring against a model whose every probability is a power of two, so each
sum is a whole number of bits worked out by hand (issue #37's mutants)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinystory import scoring
from tinystory.errors import DataError
from tinystory.scoring import score_blocks, score_stream

# Four tokens: 0 = BOS and 3 = EOS (no text bytes), 1 = "a" (1 byte), 2 = "bb" (2 bytes).
BYTES = np.array([0, 1, 2, 0])
# BITS[prev][next]: -log2 p(next | prev); each row's probabilities 1/2, 1/4, 1/8, 1/8 sum to 1
BITS = torch.tensor([[3.0, 1, 2, 3], [3, 2, 1, 3], [3, 3, 1, 2], [1, 2, 3, 3]])
# three blocks of 4 and a ragged tail of 1 (dropped):
#   0 1 2 3 | targets 1 2 3: 1 + 1 + 2 = 4 bits; text 1 2: 2 bits over 3 bytes
#   0 2 2 1 | targets 2 2 1: 2 + 1 + 3 = 6 bits; text all: 6 bits over 5 bytes
#   0 1 1 3 | targets 1 1 3: 1 + 2 + 3 = 6 bits; text 1 1: 3 bits over 2 bytes
STREAM = np.array([0, 1, 2, 3, 0, 2, 2, 1, 0, 1, 1, 3, 0], dtype=np.uint16)
LN2 = math.log(2)


def table_forward(x: torch.Tensor) -> torch.Tensor:
    """ids (B, T) -> logits (B, T, 6): the log-probabilities of BITS' row of each token, and
    two more vocabulary entries that are never likely (so V differs from the block size)."""
    logits = torch.full((*x.shape, 6), -1e4)  # (B, T, V)
    logits[..., :4] = -BITS[x] * LN2
    return logits


class TableLM(torch.nn.Module):
    """`table_forward` as a causal LM (what `score_stream` takes); records its mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True) -> SimpleNamespace:
        assert use_cache is False
        self.modes.append(self.training)
        return SimpleNamespace(logits=table_forward(input_ids))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_sums_are_whole_bits(batch_size):
    s = score_blocks(table_forward, STREAM, 4, batch_size, BYTES)
    assert s["blocks"] == 3 and s["tokens"] == 9 and s["text_tokens"] == 7 and s["bytes"] == 10
    assert s["nats"] == pytest.approx(16 * LN2)
    assert s["text_nats"] == pytest.approx(11 * LN2)
    assert s["text_nats"] / (LN2 * s["bytes"]) == pytest.approx(1.1)  # bits per byte
    assert "bpb_se" not in s
    assert isinstance(s["tokens"], int) and isinstance(s["bytes"], int) and isinstance(s["text_tokens"], int)


def test_one_block_and_too_few_tokens():
    s = score_blocks(table_forward, STREAM[:7], 4, 8, BYTES, bpb_se=True)
    assert (s["blocks"], s["tokens"], s["text_tokens"], s["bytes"]) == (1, 3, 2, 3)
    assert s["nats"] == pytest.approx(4 * LN2) and s["text_nats"] == pytest.approx(2 * LN2)
    assert s["bpb_se"] == 0.0  # one block: no spread to measure
    with pytest.raises(DataError) as e:
        score_blocks(table_forward, STREAM[:3], 4, 8, BYTES)
    assert str(e.value) == ("only 3 validation tokens, fewer than one block of 4 "
                            "(use more validation data or raise --max-tokens)")


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_bpb_standard_error_from_the_spread_over_blocks(batch_size):
    # per block text bits [2, 6, 3] over bytes [3, 5, 2]: ratio 11/10; residuals bits - 1.1 x bytes
    s = score_blocks(table_forward, STREAM, 4, batch_size, BYTES, bpb_se=True)
    resid = [2 - 1.1 * 3, 6 - 1.1 * 5, 3 - 1.1 * 2]  # -1.3, 0.5, 0.8 (mean 0)
    expected = math.sqrt(sum(r * r for r in resid) / (3 - 1) / 3) / (10 / 3)
    assert s["bpb_se"] == pytest.approx(expected) == pytest.approx(0.196723, abs=1e-6)


def test_ratio_se_edges():
    assert scoring._ratio_se(np.array([1.0]), np.array([2.0])) == 0.0
    assert scoring._ratio_se(np.array([1.0, 2.0]), np.array([0.0, 0.0])) == 0.0
    assert scoring._ratio_se(np.array([1.0, 2.0]), np.array([-2.0, 1.0])) == 0.0
    # two units, r = 4/4, residuals -1 and 1: sqrt(2 / 1 / 2) / mean(den) 2
    assert scoring._ratio_se(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == pytest.approx(0.5)
    assert scoring._ratio_se(np.array([2.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(0.5)
    # one byte in all is enough: r = 3, residuals -0.5 and 0.5: sqrt(0.5 / 2) / 0.5
    assert scoring._ratio_se(np.array([1.0, 2.0]), np.array([0.5, 0.5])) == pytest.approx(1.0)


def test_score_stream_scores_in_eval_mode_and_restores_the_mode():
    model = TableLM()
    model.train()
    s = score_stream(model, STREAM, 4, 2, BYTES)
    assert s["nats"] == pytest.approx(16 * LN2) and model.modes == [False, False] and model.training
    model.eval()
    s = score_stream(model, STREAM, 4, 3, BYTES, bpb_se=True)
    assert s["bpb_se"] == pytest.approx(0.196723, abs=1e-6) and not model.training
    assert scoring.model_logits(model)(torch.tensor([[0, 1]])).shape == (1, 2, 6)
    assert "bpb_se" not in score_stream(model, STREAM, 4, 3, BYTES)


def test_a_model_without_a_training_flag_is_left_in_eval_mode():
    class Wrapped:  # eval()/train() but no `training` attribute (a wrapper, an exported model)
        def __init__(self) -> None:
            self.calls: list[object] = []

        def eval(self) -> None:
            self.calls.append("eval")

        def train(self, mode: object) -> None:
            self.calls.append(mode)

        def __call__(self, input_ids: torch.Tensor, use_cache: bool) -> SimpleNamespace:
            return SimpleNamespace(logits=table_forward(input_ids))

    model = Wrapped()
    assert score_stream(model, STREAM, 4, 3, BYTES)["tokens"] == 9
    assert model.calls == ["eval", False] and model.calls[1] is False


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int32])
def test_byte_lengths_of_any_integer_dtype(dtype):
    # a uint16 table (the dtype of the token shards) is not a tensor dtype torch can compare
    s = score_blocks(table_forward, STREAM, 4, 2, BYTES.astype(dtype), bpb_se=True)
    assert (s["bytes"], s["text_tokens"]) == (10, 7) and s["bpb_se"] == pytest.approx(0.196723, abs=1e-6)


def test_the_progress_bar_counts_blocks(monkeypatch):
    import contextlib

    seen: list[tuple[int, str]] = []
    steps: list[int] = []

    @contextlib.contextmanager
    def bar(total, what):
        seen.append((total, what))
        yield steps.append

    monkeypatch.setattr(scoring, "bar", bar)
    score_blocks(table_forward, STREAM, 4, 2, BYTES)
    score_blocks(table_forward, STREAM, 4, 2, BYTES, what="val")
    score_stream(TableLM(), STREAM, 4, 2, BYTES)
    assert seen == [(3, ""), (3, "val"), (3, "scoring")]
    assert steps == [2, 1] * 3
