"""`tinystory generate` and `tinystory.generation`: decoding, streaming, seeds, CLI modes and errors.

The golden test trains a tiny model here (plain torch loop, ~150 steps on the bundled
sample) and pins its greedy continuation, like llama2.c's test_all.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import sample_stories

from tinystory.cli.app import main
from tinystory.errors import RunError, SettingsError
from tinystory.generation import Generator, records
from tinystory.sampling import Backend, GenerationStats, HFTokenizerMixin, PromptError, SamplingParams

PROMPT = "Once upon a time"
# 24 greedy tokens
GOLDEN = " there was a little girl was a little girl was a little girl was a little girl was a little girl was a little"
GREEDY = SamplingParams(max_new_tokens=24, greedy=True)


@pytest.fixture(scope="module")
def trained(trained_run: Path) -> Generator:
    return Generator.load(trained_run)


def test_golden_greedy_continuation(trained: Generator):
    text = trained.generate(PROMPT, GREEDY)
    assert text == GOLDEN
    assert trained.last_stats.tokens == 24 and trained.last_stats.finish_reason == "length"
    assert trained.generate(PROMPT, GREEDY) == text  # deterministic


def test_loaded_model_facts(trained: Generator, trained_run: Path):
    assert trained.name == "trained-run"
    assert trained.num_parameters == 139_584  # 512 x 64 tied embedding + 2 layers x 53,376 + 64
    assert trained.size_bytes == 4 * 139_584
    assert (trained.context_length, trained.device, trained.dtype, trained.threads) == (512, "cpu", "fp32", 1)
    assert trained.defaults == {"max_new_tokens": 64, "temperature": 1.0, "top_p": 0.9}


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_equal_hf_generate(trained: Generator, penalty: float):
    model, tok = trained.backend.model, trained.backend.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids  # the tokenizer adds BOS, as we do
    assert ids[0, 0].item() == tok.bos_token_id
    ref = model.generate(ids, do_sample=False, max_new_tokens=40, repetition_penalty=penalty)[0, ids.shape[1]:]
    trained.generate(PROMPT, SamplingParams(max_new_tokens=40, greedy=True, repetition_penalty=penalty))
    assert trained.last_stats.token_ids == ref.tolist()


def test_seeded_sampling_equals_hf_sampling_with_the_same_seed(trained: Generator):
    model, tok = trained.backend.model, trained.backend.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(7)
    ref = model.generate(ids, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=30)
    params = SamplingParams(max_new_tokens=30, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    trained.generate(PROMPT, params)
    assert trained.last_stats.token_ids == ref[0, ids.shape[1]:].tolist()[: trained.last_stats.tokens]


def test_seeds_reproduce_and_differ(trained: Generator):
    params = SamplingParams(max_new_tokens=40, seed=123)
    a, b = trained.generate(PROMPT, params), trained.generate(PROMPT, params)
    c = trained.generate(PROMPT, SamplingParams(max_new_tokens=40, seed=124))
    assert a == b and a != c
    trained.generate(PROMPT, SamplingParams(max_new_tokens=5))  # no seed: one is drawn and reported
    assert isinstance(trained.last_stats.seed, int)


def test_the_reported_seed_of_an_unseeded_story_regenerates_it(trained: Generator):
    # guards the seed in the stats being the one the story was drawn with (not a fresh
    # draw, nor the params' None): the reported seed must give the same story again
    unseeded = SamplingParams(max_new_tokens=40, temperature=1.2)
    stories = [(trained.generate(PROMPT, unseeded), trained.last_stats.seed) for _ in range(2)]
    assert stories[0][1] != stories[1][1]  # each unseeded story draws its own seed
    for story, seed in stories:
        assert trained.generate(PROMPT, SamplingParams(max_new_tokens=40, temperature=1.2, seed=seed)) == story


def test_stream_pieces_join_to_the_decoded_tokens(trained: Generator):
    tok = trained.backend.tokenizer
    stream = trained.stream(PROMPT, SamplingParams(max_new_tokens=40, seed=1))
    pieces = list(stream)
    assert len(pieces) > 5
    prompt_ids = [tok.bos_token_id, *tok.encode(PROMPT, add_special_tokens=False)]
    full = tok.decode(prompt_ids + stream.stats.token_ids, skip_special_tokens=True)
    assert PROMPT + "".join(pieces) == full


class Scripted(HFTokenizerMixin, Backend):
    """A backend that 'generates' the tokens of a fixed text: tests detokenization alone."""

    def __init__(self, tokenizer, text: str, eos: bool = True, after: str = "") -> None:
        self.tokenizer, self.name, self.context_length = tokenizer, "scripted", 64
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        # the tokens of `text` as they follow `after` (a sentencepiece tokenizer puts a ▁ of
        # its own in front of a text that starts with a space)
        skip = len(tokenizer.encode(after, add_special_tokens=False)) if after else 0
        self.script = (tokenizer.encode(after + text, add_special_tokens=False)[skip:]
                       + ([self.eos_token_id] if eos else []))

    def token_ids(self, prompt_ids, params, seed, stop):
        yield from self.script[: params.max_new_tokens]


TRICKY = ", there was a girl. Ünïcode ☃ and 🙂  two  spaces\nnew line"


@pytest.mark.parametrize("kind", ["bpe", "mistral"])
def test_incremental_detokenization_keeps_spaces_and_whole_characters(kind: str, bpe_tokenizer):
    from tinystory.tokenizer import load_mistral

    tok = bpe_tokenizer if kind == "bpe" else load_mistral()
    prompt = "Once" if kind == "mistral" else "Once upon a time"
    gen = Generator(Scripted(tok, " upon a time" + TRICKY if kind == "mistral" else TRICKY, after=prompt))
    pieces = list(gen.stream(prompt, SamplingParams(max_new_tokens=100)))
    expected = " upon a time" + TRICKY if kind == "mistral" else TRICKY
    assert "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces)  # no broken UTF-8, ever
    assert len(pieces) > 10
    assert gen.last_stats.finish_reason == "eos"


def test_cut_off_character_is_flushed_at_the_end(bpe_tokenizer):
    gen = Generator(Scripted(bpe_tokenizer, " 🙂", eos=False))
    n = len(gen.backend.script)  # " " + 4 byte tokens
    text = gen.generate("Hi", SamplingParams(max_new_tokens=n - 1))
    assert text == " \ufffd"  # what decode gives for the 3 bytes that came
    assert gen.last_stats.finish_reason == "length"


def test_stop_event_ends_the_stream(trained: Generator):
    stop = threading.Event()
    stream = trained.stream(PROMPT, SamplingParams(max_new_tokens=100, seed=3, min_new_tokens=100), stop=stop)
    for i, _ in enumerate(stream):
        if i == 2:
            stop.set()
    assert stream.stats.finish_reason == "stop" and stream.stats.tokens <= 4


def test_min_new_tokens_forbids_eos(trained: Generator):
    trained.generate("The end.", SamplingParams(max_new_tokens=50, min_new_tokens=50, seed=0))
    assert trained.last_stats.tokens == 50 and 2 not in trained.last_stats.token_ids


def test_empty_prompt(trained: Generator):
    with pytest.raises(PromptError, match="the prompt is empty"):
        trained.stream("  \n", GREEDY)
    text = trained.generate("  ", GREEDY, allow_empty=True)
    assert trained.last_stats.prompt_tokens == 1 and text  # BOS only


def test_long_prompt_is_cut_from_the_left(trained: Generator, capsys):
    long = " ".join(sample_stories("train", 30))  # thousands of tokens, context 512
    trained.generate(long, SamplingParams(max_new_tokens=10, greedy=True))
    st = trained.last_stats
    assert st.prompt_tokens == 511 and st.prompt_cut > 500 and st.tokens == 1  # room for one token
    assert "warning: the prompt is longer than the model's context (512 tokens)" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    (dict(temperature=-0.1), "temperature must be 0 or more"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be 0 (off) or more"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be between 0.01 and 100"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be between 0.01 and 100"),
    (dict(repetition_penalty=101.0), "repetition_penalty must be between 0.01 and 100"),
])
def test_bad_sampling_params(bad: dict, message: str):
    with pytest.raises(SettingsError) as e:
        SamplingParams(**bad).validate()
    assert e.value.message == message


def test_a_tiny_temperature_is_greedy_not_a_crash(trained: Generator):
    # logits / 1e-308 overflow to inf: NaN probabilities, a crash in torch.multinomial
    for t in (1e-308, 5e-324, 1e-6):
        assert not SamplingParams(temperature=t).sampling
        assert trained.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=t, seed=1)) == \
            trained.generate(PROMPT, SamplingParams(max_new_tokens=12, greedy=True))
    assert SamplingParams(temperature=1e-5).sampling


def test_run_defaults_sit_between_profile_and_user_settings():
    from tinystory.settings import load_settings

    run = {"max_new_tokens": 64, "temperature": 0.7, "top_k": 50}
    s = load_settings(profile="tiny", env={})  # the profile sets max_new_tokens = 64: the run wins
    p = SamplingParams.from_settings(s, {**run, "max_new_tokens": 99})
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p) == (99, 0.7, 50, 0.9)
    s = load_settings(profile="tiny", env={"TINYSTORY_GENERATE__TEMPERATURE": "1.2"},
                      overrides={"generate.top_k": (0, "--top-k")})
    p = SamplingParams.from_settings(s, run, greedy=True, seed=5)
    assert (p.temperature, p.top_k, p.greedy, p.seed, p.sampling) == (1.2, 0, True, 5, False)


def test_temperature_zero_is_greedy(trained: Generator):
    assert trained.generate(PROMPT, SamplingParams(max_new_tokens=24, temperature=0.0, seed=9)) == GOLDEN


def test_load_backend_dispatches_quantized_models(tmp_path: Path, monkeypatch):
    from tinystory import backends
    from tinystory.runs import Run

    calls = []
    monkeypatch.setattr(backends, "GGUFBackend", lambda path, threads: calls.append(("gguf", path.name, threads))
                        or "llama.cpp")
    monkeypatch.setattr(backends, "quantized_backend", lambda run, threads: calls.append(("folder", run.path.name,
                                                                                          threads)) or "int8")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "quantization.json").write_text("{}")
    assert backends.load_backend(Run(tmp_path / "model.gguf"), threads=1) == "llama.cpp"
    assert Generator.load(tmp_path / "int8").backend == "int8"
    assert calls == [("gguf", "model.gguf", 1), ("folder", "int8", 0)]


def test_checkpoint_finds_the_tokenizer_of_its_run(trained_run: Path, tmp_path: Path):
    import shutil

    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-150"
    ckpt.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(trained_run / f, ckpt / f)
    (ckpt / "complete.json").write_text("{}")  # the marker a finished save leaves
    for f in trained_run.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "run" / f.name)
    gen = Generator.load(ckpt)
    assert gen.name == "run/checkpoint-150" and gen.generate(PROMPT, GREEDY) == GOLDEN


def test_records(trained: Generator):
    recs = list(records(trained, ["Once", "A cat"], SamplingParams(max_new_tokens=8, seed=4), num_samples=2))
    assert [r["prompt"] for r in recs] == ["Once", "Once", "A cat", "A cat"]
    assert [r["settings"]["seed"] for r in recs] == [4, 5, 4, 5]
    assert all(r["story"].startswith(r["prompt"]) and 1 <= r["tokens"] <= 8 for r in recs)
    assert recs[0]["settings"]["model"] == "trained-run"


# ------------------------------------------------------------------------------- CLI


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `tinystory ARGS` in-process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_stdout_is_only_the_story(trained_run: Path):
    env = {**os.environ, "TINYSTORY_PLAIN": "1"}
    r = subprocess.run([sys.executable, "-m", "tinystory", "generate", PROMPT, "--run", str(trained_run),
                        "--greedy", "-n", "24"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + GOLDEN + "\n"
    assert "model trained-run: 0.14M parameters, 0.5 MiB, cpu fp32, 1 thread" in r.stderr
    assert "sampling greedy, up to 24 new tokens" in r.stderr
    assert "24 tokens in" in r.stderr and "tok/s" in r.stderr


def test_cli_samples_are_separated_and_seeded(trained_run: Path, capsys):
    code, out, err = cli(capsys, "generate", PROMPT, "-r", str(trained_run), "-n", "12", "--num-samples", "2",
                         "--seed", "10")
    assert code == 0 and out.count("\n---\n\n") == 1
    first, second = out.split("\n---\n\n")
    assert first.startswith(PROMPT) and second.startswith(PROMPT)
    _, again, _ = cli(capsys, "generate", PROMPT, "-r", str(trained_run), "-n", "12", "--seed", "11")
    assert again == second  # sample i uses seed + i
    assert "seed 10" in err and "seed 11" in err


def test_cli_prompts_file_writes_json_lines(trained_run: Path, tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe dog\n", encoding="utf-8")
    code, out, _ = cli(capsys, "generate", "-r", str(trained_run), "--prompts-file", str(prompts), "-n", "10",
                       "--seed", "1")
    assert code == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in recs] == ["Once upon a time", "The dog"]  # blank lines skipped
    assert set(recs[0]) >= {"prompt", "story", "settings", "tokens"} and recs[0]["settings"]["top_p"] == 0.9
    dest = tmp_path / "out" / "stories.jsonl"
    code, out, err = cli(capsys, "generate", "-r", str(trained_run), "--prompts-file", str(prompts), "-n", "10",
                         "--seed", "1", "--out", str(dest))
    assert code == 0 and out == "" and f"wrote 2 stories to {dest}" in err
    again = [json.loads(line) for line in dest.read_text().splitlines()]
    for rec in (*recs, *again):
        del rec["tokens_per_s"]  # a timing, the rest is reproducible
    assert again == recs
    assert sorted(p.name for p in dest.parent.iterdir()) == ["stories.jsonl"]  # no temp left


def test_cli_interactive_loop(trained_run: Path, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):  # what a person typing looks like
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("Once upon a time\n\nThe dog\n"))
    code, out, err = cli(capsys, "generate", "-r", str(trained_run), "--greedy", "-n", "24")
    assert code == 0
    assert out.startswith(PROMPT + GOLDEN + "\n") and "\nThe dog" in out
    assert "warning: the prompt is empty" in err and err.count("> ") == 4


@pytest.mark.parametrize("args,code,message", [
    (["generate", "   "], 1,
     'error: the prompt is empty (type a beginning such as "Once upon a time", or pass --allow-empty)'),
    (["generate"], 2,
     'error: no prompt given (pass one, e.g. tinystory generate "Once upon a time", or use --prompts-file)'),
    (["generate", "Hi", "--temperature", "-1"], 1,
     "error: temperature must be 0 or more (e.g. --temperature 1.0 (0 = greedy))"),
    (["generate", "Hi", "--run", "someone/tiny-stories"], 1,
     "error: cannot fetch model someone/tiny-stories: HF_HUB_OFFLINE is set (pass a local run dir instead)"),
    (["generate", "Hi", "--dtype", "fp16", "--device", "cpu"], 1,
     "error: fp16 on CPU is about 100x slower than fp32 (use --dtype fp32 or bf16 on CPU)"),
])
def test_cli_errors(args, code, message, trained_run: Path, capsys):
    if "--run" not in args:
        args = [*args, "--run", str(trained_run)]
    got, out, err = cli(capsys, *args)
    assert (got, out, err.strip()) == (code, "", message)


def test_cli_run_without_model_names_what_is_missing(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, out, err = cli(capsys, "generate", "Hi", "--run", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.strip() == (f"error: {tmp_path} holds no trained model (model.safetensors is missing) "
                           "(train first, or pass a run dir or one of its checkpoints)")


def test_cli_latest_run_and_allow_empty(trained_run: Path, random_run: Path, capsys, monkeypatch):
    # guards "the latest run" being the newest one: with an older run beside it, choosing the
    # oldest (or the first by name) would generate from the untrained model
    import shutil

    runs = Path(os.environ["TINYSTORY_RUNS_DIR"])
    shutil.copytree(random_run, runs / "a-older-untrained")
    shutil.copytree(trained_run, runs / "latest-one")
    os.utime(runs / "a-older-untrained" / "config.json", (1_000_000_000, 1_000_000_000))
    code, out, err = cli(capsys, "generate", PROMPT, "--greedy", "-n", "24")
    assert code == 0 and out == PROMPT + GOLDEN + "\n" and "latest-one:" in err
    code, out, _ = cli(capsys, "generate", "", "--allow-empty", "--greedy", "-n", "5")
    assert code == 0 and out.strip()


def test_cli_long_prompt_warns(trained_run: Path, capsys):
    long = " ".join(sample_stories("train", 30))
    code, out, err = cli(capsys, "generate", long, "-r", str(trained_run), "-n", "3", "--greedy")
    assert code == 0 and out.startswith(long)
    assert "warning: the prompt is longer than the model's context (512 tokens): its first" in err


def test_stats_line():
    st = GenerationStats(prompt_tokens=5, tokens=128, seconds=0.5, first_token_s=0.012, finish_reason="eos")
    assert st.describe() == "128 tokens in 0.50 s, 256.0 tok/s, first token 12 ms, ended by eos"


def test_random_run_fixture_loads(random_run: Path):
    gen = Generator.load(random_run)
    assert gen.defaults == {"max_new_tokens": 64, "temperature": 1.0, "top_p": 0.9}
    with pytest.raises(RunError, match="does not exist"):
        Generator.load(random_run / "nope")


@pytest.mark.parametrize("window", [None, 8])
def test_static_cache_path_matches_the_dynamic_one(bpe_tokenizer, monkeypatch, window):
    """The compiled path's cache logic (StaticCache, positions, reuse, sliding window) on CPU;
    inductor itself is torch's job, so torch.compile is the identity here."""
    from tinystory.backends import HFBackend
    from tinystory.model import build_config, build_model

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    tok = bpe_tokenizer
    config = build_config("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    config.sliding_window = window
    torch.manual_seed(0)
    model = build_model(config)
    eager, static = Generator(HFBackend(model, tok, "x")), Generator(HFBackend(model, tok, "x", compile=True))
    for prompt, params in [(PROMPT, SamplingParams(max_new_tokens=30, greedy=True, repetition_penalty=1.3)),
                           ("The dog ran to the park.", SamplingParams(max_new_tokens=30, seed=2))]:
        assert eager.generate(prompt, params) == static.generate(prompt, params)
        assert eager.last_stats.token_ids == static.last_stats.token_ids


def test_compile_default_is_cuda_only(trained_run: Path):
    from tinystory.errors import SettingsError
    from tinystory.loading import pick_compile

    assert [pick_compile(d, c) for d in ("cpu", "cuda") for c in (None, "auto")] == [False, False, True, True]
    assert (pick_compile("cpu", "on"), pick_compile("cuda", "off"), pick_compile("cuda", False)) == (True, False, False)
    with pytest.raises(SettingsError, match=r"unknown generate\.compile 'yes'"):
        pick_compile("cpu", "yes")
    if not torch.cuda.is_available():
        assert not Generator.load(trained_run).backend.compile  # a CPU decodes eagerly by default


def test_threads_by_model_size(monkeypatch):
    from tinystory.loading import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert (default_threads(3_600_000), default_threads(40_000_000)) == (1, 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.3, 0.2, 0.2))  # another process busy
    assert default_threads(40_000_000) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_default_and_compiled_paths(trained_run: Path):
    gen = Generator.load(trained_run)  # auto: CUDA, bf16 (fp16 before Ampere), compiled decode step
    assert gen.device == "cuda" and gen.dtype == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert gen.backend.compile
    fp32 = Generator.load(trained_run, dtype="fp32", compile="off")
    assert not fp32.backend.compile and fp32.generate(PROMPT, GREEDY) == GOLDEN
    compiled = Generator.load(trained_run, dtype="fp32")
    for _ in range(2):  # the second run reuses the compiled step and its cache
        assert compiled.generate(PROMPT, GREEDY) == GOLDEN
    # half precision against fp32 on the CPU: the first greedy tokens agree (not a call
    # compared with an identical call)
    first = SamplingParams(max_new_tokens=8, greedy=True)
    assert gen.generate(PROMPT, first) == Generator.load(trained_run, device="cpu").generate(PROMPT, first)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("spread", [0.1, 1.0, 4.0])
def test_top_p_keeps_the_tokens_transformers_keeps(top_p: float, spread: float):
    from transformers import TopPLogitsWarper

    from tinystory.backends import TopP

    g = torch.Generator().manual_seed(int(spread * 10) + int(top_p * 100))
    scores = torch.randn(3, 4096, generator=g) * spread  # flat to peaked distributions
    ours, theirs = TopP(top_p)(None, scores.clone()), TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(ours[~ours.isinf()], scores[~ours.isinf()])
