"""tinystory.sampling without a model: SamplingParams' checks at their edges and their
messages, the layering of run defaults in from_settings, the stderr lines, TextStream and
the tokenizer mixin (issue #37's mutants)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinystory.errors import SettingsError
from tinystory.sampling import Backend, GenerationStats, HFTokenizerMixin, SamplingParams, TextStream
from tinystory.settings import load_settings
from tinystory.tokenizer import load_tokenizer

FIXTURE_RUN = Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"  # a tiny run with a BPE 512


def test_the_edges_of_every_range_are_valid():
    p = SamplingParams(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=0.01,
                       min_new_tokens=0)
    assert p.validate() is p
    assert SamplingParams(top_p=1e-9, repetition_penalty=100.0, top_k=1, min_new_tokens=5).validate()


@pytest.mark.parametrize("bad, message, hint", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1", "e.g. --max-new-tokens 256"),
    (dict(temperature=-1e-9), "temperature must be 0 or more", "e.g. --temperature 1.0 (0 = greedy)"),
    (dict(top_k=-1), "top_k must be 0 (off) or more", "e.g. --top-k 40"),
    (dict(top_p=0.0), "top_p must be in (0, 1]", "e.g. --top-p 0.9 (1.0 = off)"),
    (dict(top_p=1.0000001), "top_p must be in (0, 1]", "e.g. --top-p 0.9 (1.0 = off)"),
    (dict(repetition_penalty=0.00999), "repetition_penalty must be between 0.01 and 100", "1.0 = off, e.g. 1.1"),
    (dict(repetition_penalty=100.001), "repetition_penalty must be between 0.01 and 100", "1.0 = off, e.g. 1.1"),
    (dict(min_new_tokens=-1), "min_new_tokens must be 0 or more", "e.g. 0"),
])
def test_each_bad_value_is_named_with_its_fix(bad, message, hint):
    with pytest.raises(SettingsError) as e:
        SamplingParams(**bad).validate()
    assert (e.value.message, e.value.hint) == (message, hint)


def test_greedy_below_1e_5():
    assert SamplingParams(temperature=1e-5).sampling is True
    assert SamplingParams(temperature=0.99e-5).sampling is False
    assert SamplingParams(temperature=1.0, greedy=True).sampling is False
    assert SamplingParams().sampling is True


def test_describe_says_what_the_sampler_does():
    assert SamplingParams(max_new_tokens=10, greedy=True).describe() == "greedy, up to 10 new tokens"
    assert SamplingParams(temperature=0.0, repetition_penalty=1.3).describe() == \
        "greedy, repetition penalty 1.3, up to 256 new tokens"
    assert SamplingParams().describe() == "temperature 1, top-p 0.9, top-k off, seed random, up to 256 new tokens"
    p = SamplingParams(max_new_tokens=30, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0)
    assert p.describe() == ("temperature 0.8, top-p 0.95, top-k 40, seed 0, repetition penalty 1.1, "
                            "up to 30 new tokens")


def test_to_dict_holds_every_field():
    p = SamplingParams(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.8, repetition_penalty=1.2, greedy=True,
                       seed=9, min_new_tokens=2)
    assert p.to_dict() == {"max_new_tokens": 5, "temperature": 0.5, "top_k": 3, "top_p": 0.8,
                           "repetition_penalty": 1.2, "greedy": True, "seed": 9, "min_new_tokens": 2}


def test_run_defaults_beat_field_defaults_and_the_profile_only():
    tiny = load_settings(profile="tiny", env={})  # the tiny profile sets max_new_tokens = 64
    assert tiny.source("generate.max_new_tokens") == "profile:tiny"
    run = {"max_new_tokens": 99, "temperature": 0.7, "top_k": 50, "top_p": None, "repetition_penalty": 1.2}
    p = SamplingParams.from_settings(tiny, run)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (99, 0.7, 50, 0.9, 1.2)
    assert (p.seed, p.greedy) == (None, False)
    plain = SamplingParams.from_settings(tiny)  # no run defaults: the settings
    assert (plain.max_new_tokens, plain.temperature, plain.top_k, plain.top_p, plain.repetition_penalty) == \
        (64, 1.0, 0, 0.9, 1.0)
    assert SamplingParams.from_settings(tiny, {}) == plain


def test_what_the_user_set_beats_the_run():
    run = {"max_new_tokens": 99, "temperature": 0.7, "top_k": 50, "top_p": 0.5}
    s = load_settings(profile="tiny", env={"TINYSTORY_GENERATE__TEMPERATURE": "1.2"},
                      overrides={"generate.top_k": (0, "--top-k"), "generate.seed": (11, "--seed")})
    p = SamplingParams.from_settings(s, run)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (99, 1.2, 0, 0.5, 11)
    coded = s.replace(generate__max_new_tokens=20)  # set in code: the caller's choice, too
    assert SamplingParams.from_settings(coded, run).max_new_tokens == 20


def test_overrides_win_and_none_overrides_nothing():
    s = load_settings(profile="tiny", env={}, overrides={"generate.seed": (3, "--seed")})
    p = SamplingParams.from_settings(s, {"temperature": 0.7}, greedy=True, seed=None, temperature=None, top_k=7)
    assert (p.greedy, p.seed, p.temperature, p.top_k) == (True, 3, 0.7, 7)
    with pytest.raises(SettingsError, match="top_p must be in"):
        SamplingParams.from_settings(s, {"top_p": 0.0})  # a bad run default is refused too


def test_generation_stats_line():
    st = GenerationStats(prompt_tokens=5, tokens=30, seconds=1.5, first_token_s=0.0456, finish_reason="length")
    assert st.describe() == "30 tokens in 1.50 s, 20.0 tok/s, first token 46 ms, ended by length"
    assert GenerationStats().describe() == "0 tokens in 0.00 s, 0.0 tok/s, first token 0 ms, ended by nothing"
    slow = GenerationStats(tokens=3, seconds=4.0, first_token_s=1.5, finish_reason="eos")
    assert slow.describe() == "3 tokens in 4.00 s, 0.8 tok/s, first token 1500 ms, ended by eos"


def test_text_stream_iterates_and_closes():
    def pieces():
        yield "Once"
        yield " upon"
        yield " a time"

    stats = GenerationStats(tokens=3)
    stream = TextStream(pieces(), stats)
    assert iter(stream) is stream and stream.stats is stats
    assert next(stream) == "Once"
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    assert list(TextStream(pieces(), stats)) == ["Once", " upon", " a time"]


def test_backend_is_an_interface():
    b = Backend()
    for call in (lambda: b.encode("a"), lambda: b.decode([1]),
                 lambda: b.token_ids([1], SamplingParams(), 0, None)):
        with pytest.raises(NotImplementedError):
            call()


def test_tokenizer_mixin_without_special_tokens():
    class Tok(HFTokenizerMixin):
        pass

    t = Tok()
    t.tokenizer = load_tokenizer(FIXTURE_RUN)
    ids = t.encode("Once upon a time")
    assert ids == [405, 434, 261, 384]  # no BOS (1)
    assert t.encode("") == []
    assert t.decode([1, *ids, 2]) == "Once upon a time"  # BOS and EOS skipped
