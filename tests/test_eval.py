"""`tinystory eval` and tinystory.evaluation: loss/bpb against direct computations, the
sampled-text metrics, eval.json, determinism and the CLI's errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_prepared
from typer.testing import CliRunner

from tinystory.cli.app import app
from tinystory.errors import DataError, SettingsError
from tinystory.evaluation import METRICS, continue_prompts, evaluate, parse_metrics, table, val_stories
from tinystory.scoring import score_stream
from tinystory.settings import load_settings
from tinystory.tokenizer import load_tokenizer

runner = CliRunner()
TEXT_KEYS = {*(f"distinct-{n}" for n in range(1, 5)), *(f"distinct-{n}-li" for n in range(1, 5)),
             "self-bleu", "rep-2", "rep-3", "rep-4", "diversity", "length", "eos-share"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, bpe_tokenizer) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared") / "data", bpe_tokenizer)


@pytest.fixture
def run(tmp_path, random_run, prepared) -> Path:
    """A private copy of the untrained tiny run, with a run.json naming the prepared data."""
    path = tmp_path / "run"
    shutil.copytree(random_run, path)
    (path / "run.json").write_text(json.dumps({"data": {"path": str(prepared), "tokenizer": "bpe:512"}, "steps": 0}))
    return path


@pytest.fixture(scope="module")
def tiny():
    return load_settings(profile="tiny", env={})


@pytest.fixture(scope="module")
def model(random_run):
    from tinystory.loading import load_model
    from tinystory.runs import Run

    return load_model(Run(random_run), "cpu")


# ------------------------------------------------------------------------- metrics API


def test_parse_metrics():
    assert parse_metrics(["bpb", "distinct-n", "ppl"]) == ["ppl", "bpb", "distinct-n"]
    assert parse_metrics(["all"]) == list(METRICS)
    with pytest.raises(SettingsError) as e:
        parse_metrics(["ppl", "ppx"])
    assert str(e.value) == ("unknown metric 'ppx' (did you mean 'ppl'? valid metrics: "
                            "loss, ppl, bpb, distinct-n, self-bleu, rep-n, length, bleu, judge, all)")


def test_val_stories_split_the_stream():
    stream = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 2], dtype=np.uint16)
    assert [s.tolist() for s in val_stories(stream, 1, 2, 2)] == [[5, 6], [7]]
    assert len(val_stories(stream, 1, 2, 10)) == 3


def test_loss_equals_direct_computation(model, prepared):
    import torch

    from tinystory.data import open_prepared
    from tinystory.tokenizer import token_byte_lengths

    net, tok = model
    tokens = open_prepared(prepared).tokens("val")[: 64 * 7 + 10]  # 7 blocks and a ragged tail
    s = score_stream(net, tokens, 64, 3, token_byte_lengths(tok))
    blocks = torch.from_numpy(np.asarray(tokens[: 64 * 7], dtype=np.int64)).view(7, 64)
    with torch.no_grad():
        direct = sum(net(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / 7
    assert (s["blocks"], s["tokens"]) == (7, 7 * 63)
    assert s["nats"] / s["tokens"] == pytest.approx(direct, rel=1e-6)
    assert s["nats"] / s["tokens"] == pytest.approx(math.log(len(tok)), abs=0.1)  # untrained: near ln(vocab)


def test_bpb_is_loss_over_ln2_over_bytes_per_token(model):
    from tinystory import metrics as M
    from tinystory.tokenizer import token_byte_lengths

    net, tok = model
    text = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog."
    ids = tok(text).input_ids  # BOS + text: BOS is never a target, so every target is text
    s = score_stream(net, np.array(ids), len(ids), 1, token_byte_lengths(tok))
    loss = M.mean_loss(s["nats"], s["tokens"])
    assert s["bytes"] == len(text.encode("utf-8")) and s["text_tokens"] == s["tokens"] == len(ids) - 1
    assert M.bits_per_byte(s["text_nats"], s["bytes"]) == pytest.approx(loss / math.log(2) / (s["bytes"] / s["tokens"]))


def test_left_padded_batch_continues_like_one_prompt(model, tiny):
    net, tok = model
    ev = tiny.replace(eval__temperature=0.0, eval__max_new_tokens=8, eval__batch_size=2).eval
    short = tok("Once upon").input_ids
    longer = tok("Lily and her dog went to the park").input_ids
    alone = continue_prompts(net, tok, [short], ev)
    batched = continue_prompts(net, tok, [longer, short], ev)
    assert batched[1] == alone[0]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_all_metrics_with_reference_and_determinism(run, tiny):
    r1 = evaluate(run, tiny, ["all"])
    saved = json.loads((run / "eval.json").read_text())
    assert set(r1["metrics"]) == {"loss", "ppl", "bpb", "bleu", *TEXT_KEYS}
    assert set(r1["reference"]) == TEXT_KEYS
    assert saved["metrics"] == r1["metrics"] and saved["settings"]["block_size"] == 64
    assert saved["settings"]["num_samples"] == 8 and saved["settings"]["max_new_tokens"] == 48
    assert saved["counts"]["samples"] == 8 and saved["counts"]["bleu_prompts"] == 8
    assert r1["metrics"]["ppl"] == pytest.approx(math.exp(r1["metrics"]["loss"]))
    assert r1["metrics"]["loss"] == pytest.approx(math.log(512), abs=0.1)
    # real stories: plausible, the untrained model: gibberish that never stops
    assert 0 < r1["reference"]["distinct-1"] < 0.5 and r1["reference"]["length"] > 20
    assert r1["metrics"]["eos-share"] < 0.5
    r2 = evaluate(run, tiny, ["all"], save=False)
    assert r2["metrics"] == r1["metrics"] and r2["reference"] == r1["reference"]


def test_metrics_do_not_depend_on_what_else_was_asked(run, tiny):
    both = evaluate(run, tiny, ["distinct-n", "bleu"], save=False)["metrics"]
    alone = evaluate(run, tiny, ["distinct-n"], save=False)["metrics"]
    assert alone == {k: v for k, v in both.items() if k != "bleu"}


def test_distinct_n_alone_needs_no_data(tmp_path, random_run, tiny):
    path = tmp_path / "bare"
    shutil.copytree(random_run, path)  # no run.json: the data is unknown
    r = evaluate(path, tiny, ["distinct-n"])
    assert set(r["metrics"]) == {f"distinct-{n}" for n in range(1, 5)} | {
        f"distinct-{n}-li" for n in range(1, 5)} | {"length", "eos-share"}
    assert r["reference"] == {} and "tokens" not in r["counts"]
    with pytest.raises(DataError, match="no prepared data known for run bare"):
        evaluate(path, tiny, ["ppl"])


def test_text_metrics_survive_moved_data(run, tiny, tmp_path):
    (run / "run.json").write_text(json.dumps({"data": {"path": str(tmp_path / "gone")}}))
    r = evaluate(run, tiny, ["rep-n"], save=False)
    assert set(r["metrics"]) == {"rep-2", "rep-3", "rep-4", "diversity", "length", "eos-share"}
    assert r["reference"] == {} and r["settings"]["data"] is None
    with pytest.raises(DataError, match=f"prepared data {tmp_path / 'gone'} does not exist"):
        evaluate(run, tiny, ["bpb"], save=False)


def test_eval_json_accumulates_for_the_same_weights_and_settings(run, tiny):
    evaluate(run, tiny, ["loss"])
    evaluate(run, tiny, ["rep-n"])
    saved = json.loads((run / "eval.json").read_text())
    assert {"loss", "rep-2", "diversity"} <= set(saved["metrics"])
    evaluate(run, tiny.replace(eval__seed=7), ["rep-n"])  # other settings: a fresh file
    saved = json.loads((run / "eval.json").read_text())
    assert "loss" not in saved["metrics"] and saved["settings"]["seed"] == 7


def test_refuses_data_of_another_tokenizer(run, tiny, tmp_path, bpe_tokenizer):
    other = write_prepared(tmp_path / "other", bpe_tokenizer, n_val=5)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["sha256"] = "f" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        evaluate(run, tiny, ["loss"], data=other)
    assert str(e.value).startswith(f"prepared data {other} uses tokenizer bpe:512 (ffffffffffff), not the "
                                   "tokenizer of run run (")
    assert str(e.value).endswith("(pass --data with the folder the run was trained on)")


def test_quantized_models_go_through_the_int8_loader(run, tiny, monkeypatch, model):
    calls = []
    monkeypatch.setattr("tinystory.loading.load_int8", lambda path: calls.append(path) or model)
    q = run / "int8"
    q.mkdir()
    (q / "quantization.json").write_text('{"method": "int8"}')
    r = evaluate(q, tiny, ["loss"])
    assert calls == [q] and (q / "eval.json").is_file()
    s = r["settings"]
    assert (s["block_size"], s["data"], s["dtype"], s["device"]) == (64, str(run_data(run)), "int8", "cpu")


def test_gguf_files_are_refused_in_one_line(tmp_path, tiny):
    from tinystory.errors import RunError

    f = tmp_path / "model-q8_0.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(RunError) as e:
        evaluate(f, tiny, ["loss"])
    assert str(e.value) == ("model-q8_0.gguf is a GGUF file, which eval cannot score (evaluate the run dir "
                            "(or an int8 folder) instead; quantize reports the GGUF's bpb)")


def run_data(run: Path) -> Path:
    return Path(json.loads((run / "run.json").read_text())["data"]["path"]).resolve()


def test_hub_id_offline_is_one_line(tiny):
    from tinystory.errors import OfflineError

    with pytest.raises(OfflineError, match="cannot fetch model someone/tiny-model: HF_HUB_OFFLINE is set"):
        evaluate("someone/tiny-model", tiny, ["distinct-n"])


# -------------------------------------------------------------------------------- CLI


def test_cli_eval_writes_every_requested_metric(run):
    metrics = "ppl,bpb,distinct-n,self-bleu,rep-n,bleu"
    r = runner.invoke(app, ["eval", str(run), "--profile", "tiny", "--metrics", metrics,
                            "--num-samples", "4", "--max-tokens", "2048", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    saved = json.loads((run / "eval.json").read_text())
    assert out == saved
    assert set(saved["metrics"]) == {"ppl", "bpb", "bleu", *TEXT_KEYS}
    assert saved["counts"]["tokens"] == 2048 // 64 * 63
    assert saved["settings"]["num_samples"] == 4 and saved["settings"]["max_tokens"] == 2048
    assert saved["run"] == str(run.resolve()) and saved["tinystory_version"]


def test_bleu_scores_the_continuations_against_the_true_endings(run, tiny, monkeypatch):
    # guards BLEU's references: a model that writes exactly the true second half of every
    # story must score 100, and a model that writes another story's ending must score what
    # sacrebleu gives for exactly those pairs (wrong or misaligned references would not)
    import sacrebleu
    from conftest import sample_stories

    from tinystory import evaluation
    from tinystory import metrics as M

    stories = sample_stories("val", tiny.eval.num_samples)  # what `prepared` holds, in order
    pairs = [M.split_prompt(story) for story in stories]  # (first half, true ending); unit-tested in test_metrics
    truth_of = {" ".join(first.split()): truth for first, truth in pairs}
    tok = load_tokenizer(run)

    def ending(prompt_ids: list[int]) -> str:  # the true ending of the story a prompt was cut from
        return truth_of[" ".join(tok.decode(prompt_ids, skip_special_tokens=True).split())]

    truths = [truth for _, truth in pairs]
    answers = {"echo": lambda ps: [(ending(p), True) for p in ps],
               "shifted": lambda ps: [(ending(ps[(i + 1) % len(ps)]), True) for i in range(len(ps))]}
    expected = {"echo": 100.0, "shifted": sacrebleu.corpus_bleu(truths[1:] + truths[:1], [truths]).score}
    for name, answer in answers.items():
        monkeypatch.setattr(evaluation, "continue_prompts", lambda m, t, prompts, ev, device, what="", a=answer:
                            a(prompts))
        r = evaluate(run, tiny, ["bleu"], save=False)
        assert r["counts"]["bleu_prompts"] == len(stories)
        assert r["metrics"]["bleu"] == pytest.approx(expected[name], abs=1e-9), name
    assert expected["shifted"] < 20


def test_reference_row_cuts_real_stories_at_the_sample_limit(run, tiny):
    # guards the reference row (real validation stories) being cut to the same token limit
    # as the samples: its length and its share of stories that ended are computed here on
    # the first `num_samples` stories, cut at `max_new_tokens` tokens
    from conftest import sample_stories

    from tinystory import metrics as M

    limit = 20
    settings = tiny.replace(eval__max_new_tokens=limit)
    r = evaluate(run, settings, ["length"], save=False)
    tok = load_tokenizer(run)
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in sample_stories("val", tiny.eval.num_samples)]
    cut = [tok.decode(i[:limit], skip_special_tokens=True) for i in ids]
    assert r["reference"]["length"] == pytest.approx(M.mean_words(cut))
    assert r["reference"]["eos-share"] == pytest.approx(sum(len(i) < limit for i in ids) / len(ids))
    whole = [tok.decode(i, skip_special_tokens=True) for i in ids]
    assert M.mean_words(whole) > 2 * M.mean_words(cut)  # uncut stories would be far longer


def test_side_by_side_columns_hold_each_runs_own_numbers(run, tiny, tmp_path):
    # guards the table's columns: two runs with different weights must show different
    # numbers, each in its own column, in the order given (not the first run's everywhere)
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(run, other)
    weights = load_file(str(other / "model.safetensors"))
    weights = {k: v * 0.5 if k.endswith("embed_tokens.weight") else v for k, v in weights.items()}
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    results = [evaluate(path, tiny, ["loss"], save=False) for path in (run, other)]
    losses = [f"{res['metrics']['loss']:.4f}" for res in results]
    assert losses[0] != losses[1]
    r = runner.invoke(app, ["eval", str(run), str(other), "-p", "tiny", "-m", "loss", "--json"])
    assert r.exit_code == 0, r.output
    assert [x["metrics"]["loss"] for x in json.loads(r.stdout)["runs"]] == [x["metrics"]["loss"] for x in results]
    r = runner.invoke(app, ["eval", str(other), str(run), "-p", "tiny", "-m", "loss"])
    row = next(line for line in r.stdout.splitlines() if line.lstrip("│ ").startswith("loss (nats/token)"))
    assert row.index(losses[1]) < row.index(losses[0])  # columns in the order the runs were given


def test_cli_table_shows_runs_side_by_side(run, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(run, second)
    r = runner.invoke(app, ["eval", str(run), str(second), "-p", "tiny", "-m", "loss,distinct-n",
                            "--max-tokens", "1024", "-n", "2"])
    assert r.exit_code == 0, r.output
    header = next(line for line in r.stdout.splitlines() if "metric" in line)
    assert "run" in header and "second" in header and "val stories" in header
    assert "loss (nats/token)" in r.stdout and "distinct-2 (Li)" in r.stdout


def test_table_of_results():
    from rich.console import Console

    res = {"name": "a", "metrics": {"loss": 1.5, "eos-share": 0.5}, "reference": {"eos-share": 1.0},
           "counts": {"tokens": 10}, "settings": {"block_size": 64, "num_samples": 2, "max_new_tokens": 9,
                                                   "temperature": 1.0, "top_p": 0.9, "top_k": 0, "seed": 1}}
    console = Console(width=200, record=True)
    console.print(table([res]))
    text = console.export_text()
    assert "1.5000" in text and "50.0%" in text and "100.0%" in text and "T=1.0 top_p=0.9 top_k=0" in text


def test_unknown_metric_is_one_line_exit_1():
    r = subprocess.run([sys.executable, "-m", "tinystory", "eval", "-p", "tiny", "--metrics", "distinct-n,perplexity"],
                       capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == ("error: unknown metric 'perplexity' (valid metrics: loss, ppl, bpb, distinct-n, "
                                "self-bleu, rep-n, length, bleu, judge, all)")
