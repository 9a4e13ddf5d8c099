"""`tinystory quantize`: int8 round trip, int8 stays close to fp32 on a trained model, the
comparison table and manifest, and one-line errors for unknown or unsupported methods."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import sample_stories, write_prepared

from tinystory import int8 as I8
from tinystory import loading as L
from tinystory import quantization as Q
from tinystory.cli.app import main
from tinystory.errors import QuantizationError
from tinystory.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `tinystory ARGV` in process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# ------------------------------------------------------------------------- errors


def test_unknown_method_is_one_line_error():
    with pytest.raises(QuantizationError) as e:
        L.check_method("int4")
    assert str(e.value) == "unknown quantization method 'int4' (did you mean 'int8'?)"


def test_bnb_needs_cuda():
    with pytest.raises(QuantizationError) as e:
        L.check_method("bnb-nf4", cuda=False)
    assert str(e.value) == ("bnb-nf4 needs a CUDA GPU (bitsandbytes quantizes on CUDA), none is here "
                            "(on this CPU use --method int8, or gguf-q8_0 for llama.cpp)")
    L.check_method("bnb-int8", cuda=True)  # fine where CUDA is


def test_cli_errors_exit_1_with_one_line(capsys, random_run):
    code, out, err = cli(capsys, "quantize", str(random_run), "--method", "int4")
    assert (code, out) == (1, "")
    assert err.strip() == ("error: quantize.method = 'int4' (from --method) is not one of int8, bnb-int8, bnb-nf4, "
                           "gguf-f32, gguf-f16, gguf-q8_0 (did you mean 'int8'?)")
    import torch

    if not torch.cuda.is_available():
        code, out, err = cli(capsys, "quantize", str(random_run), "--method", "bnb-int8")
        assert (code, out) == (1, "")
        assert err.strip().startswith("error: bnb-int8 needs a CUDA GPU") and len(err.strip().splitlines()) == 1


def test_output_paths(tmp_path):
    run = tmp_path / "run7"
    assert Q._output(run, "int8", None) == run / "quantized" / "int8"
    assert Q._output(run, "gguf-q8_0", None) == run / "quantized" / "run7-q8_0.gguf"
    assert Q._output(run, "gguf-f16", tmp_path / "x") == tmp_path / "x" / "run7-f16.gguf"
    assert Q._output(run, "gguf-f16", tmp_path / "m.gguf") == tmp_path / "m.gguf"
    hub = tmp_path / "hub" / "models--user--story" / "snapshots" / "abc123"
    assert Q._output(hub, "gguf-q8_0", None) == Path.cwd() / "quantized" / "story-q8_0.gguf"
    with pytest.raises(QuantizationError, match=r"is a \.gguf file but int8 writes a folder"):
        Q._output(run, "int8", tmp_path / "m.gguf")


# --------------------------------------------------------------------------- int8


def test_int8_round_trip(random_run, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tinystory import tokenizer as T

    model = AutoModelForCausalLM.from_pretrained(random_run).eval()
    tok = T.load_tokenizer(random_run)
    I8.save_int8(model, tok, tmp_path / "int8")
    saved = load_file(str(tmp_path / "int8" / I8.INT8_WEIGHTS))
    # every matrix is int8 (tied embedding stored once, as the head), only norms and scales are fp32
    matrices = {k: v for k, v in saved.items() if v.dim() == 2}
    assert len(matrices) == 2 * 7 + 1 and all(v.dtype == torch.int8 for v in matrices.values())
    assert "model.embed_tokens.weight" not in saved
    assert all(v.dtype == torch.float32 and v.dim() == 1 for k, v in saved.items() if k not in matrices)
    size = (tmp_path / "int8" / I8.INT8_WEIGHTS).stat().st_size
    assert size / (random_run / "model.safetensors").stat().st_size < 0.30
    for i in range(5):  # byte-identical every time (safetensors writes metadata keys in hash order)
        I8.save_int8(model, tok, tmp_path / f"again-{i}")
        assert (tmp_path / f"again-{i}" / I8.INT8_WEIGHTS).read_bytes() == (tmp_path / "int8" / I8.INT8_WEIGHTS
                                                                             ).read_bytes()

    reloaded, tok2 = I8.load_int8(tmp_path / "int8")
    in_memory = I8.build_int8(model.config, I8.int8_state(model))
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])  # (1, T)
    with torch.no_grad():
        a, b, ref = reloaded(ids).logits, in_memory(ids).logits, model(ids).logits
    assert torch.equal(a, b)  # save + load changes nothing
    assert (a - ref).abs().max() < 0.05 * ref.abs().max()
    assert tok2("Once upon a time")["input_ids"] == tok("Once upon a time")["input_ids"]
    out = reloaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 5)  # generate + KV cache work on the int8 modules


def test_load_int8_missing_is_one_line_error(tmp_path):
    with pytest.raises(QuantizationError) as e:
        I8.load_int8(tmp_path)
    assert str(e.value) == (f"{tmp_path} holds no int8 model (model-int8.safetensors is missing) "
                            "(run `tinystory quantize RUN --method int8`)")


def test_int8_stays_close_on_trained_model(trained_run):
    from transformers import AutoModelForCausalLM

    from tinystory import tokenizer as T
    from tinystory.settings import load_settings

    model = AutoModelForCausalLM.from_pretrained(trained_run).eval()
    tok = T.load_tokenizer(trained_run)
    state = I8.int8_state(model)
    int8 = I8.build_int8(model.config, state, reduce_range=True)  # fbgemm's portable 7-bit activations
    val = Q.val_data(trained_run, model, tok, load_settings(profile="tiny", env={}), 4096)
    assert (val.source, val.block_size, len(val.tokens)) == ("bundled sample valid.txt.gz", 64, 4096)
    ref, q = Q.torch_scorer(model, tok.eos_token_id), Q.torch_scorer(int8, tok.eos_token_id)
    prompt = tok("Once upon a time")["input_ids"]
    bpb_ref, bpb_q = Q.bits_per_byte(ref, val), Q.bits_per_byte(q, val)
    assert bpb_ref == pytest.approx(BPB_FP32, abs=0.01)  # pinned: the fixture's model
    assert bpb_q / bpb_ref - 1 == pytest.approx(BPB_INT8_DELTA, abs=0.0005)
    assert Q.leading_match(ref.greedy(prompt, 32, True), q.greedy(prompt, 32, True)) == 32


@pytest.mark.skipif(not I8.full_range_activations(), reason="8-bit activations need a CPU with VNNI")
def test_full_range_activations_are_closer_to_fp32(trained_run):
    import torch
    from transformers import AutoModelForCausalLM

    from tinystory import tokenizer as T

    model = AutoModelForCausalLM.from_pretrained(trained_run).eval()
    state = I8.int8_state(model)
    ids = torch.tensor([T.load_tokenizer(trained_run)(" ".join(sample_stories("val", 3)))["input_ids"][:256]])
    with torch.no_grad():
        ref = model(ids).logits
        err = {rr: (I8.build_int8(model.config, state, reduce_range=rr)(ids).logits - ref).abs().mean().item()
               for rr in (True, False)}
    assert err[False] < 0.75 * err[True], err  # the 8th bit roughly halves the activation rounding
    assert type(I8.build_int8(model.config, state).model.layers[0].mlp.down_proj).__name__ == "FullRangeDynLinear"


BPB_FP32 = 2.0181
BPB_INT8_DELTA = 0.00084  # +0.08%


# ------------------------------------------------------------------------ command


def test_quantize_int8_command(capsys, trained_run, tmp_path, bpe_tokenizer):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = write_prepared(tmp_path / "data", bpe_tokenizer)
    (run / "run.json").write_text(json.dumps({"data": {"path": str(data)}}))
    out_dir = tmp_path / "q"
    code, out, err = cli(capsys, "quantize", str(run), "--method", "int8", "--out", str(out_dir),
                         "--profile", "tiny", "--set", "generate.threads=1", "--set", "quantize.val_tokens=2048")
    assert code == 0, err
    assert out == f"{out_dir}\n"  # only the path on stdout
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json", "generation_config.json", "model-int8.safetensors", "quantization.json", "run.json",
        "settings.toml", "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((out_dir / "quantization.json").read_text())
    assert manifest["method"] == "int8" and manifest["source_run"] == str(run)
    assert manifest["library"].startswith("torch.ao.quantization.quantize_dynamic")
    assert set(manifest["versions"]) == {"tinystory-llm", "torch", "transformers"}
    assert manifest["settings"]["prompt"] == "Once upon a time" and manifest["settings"]["compare_tokens"] == 32
    ref, row = manifest["comparison"]["rows"]
    assert ref["model"] == "unquantized fp32" and row["model"] == "int8 (torch.ao dynamic)"
    assert row["size_bytes"] < 0.3 * ref["size_bytes"]
    assert row["greedy_match"] == row["greedy_len"] == ref["greedy_len"]
    assert abs(row["bpb"] / ref["bpb"] - 1) < 0.01
    c = manifest["comparison"]
    assert (c["threads"], c["val_data"], c["val_tokens"], c["block_size"]) == (1, f"{data}/val.bin", 2048, 64)
    assert "| int8 (torch.ao dynamic) |" in err and "| unquantized fp32 |" in err  # the table, on stderr
    assert "Loading weights" not in err  # no library progress bars among our lines

    # the bpb column is eval's bpb on the same tokens: for the run and for the int8 folder
    for path, expected in ((run, ref["bpb"]), (out_dir, row["bpb"])):
        code, out, err = cli(capsys, "eval", str(path), "--metrics", "bpb", "--max-tokens", "2048", "--json",
                             "--profile", "tiny")
        assert code == 0, err
        assert json.loads(out)["metrics"]["bpb"] == pytest.approx(expected, rel=1e-6)

    model, _ = L.load_model(Run(out_dir))  # what `generate` / `eval` call for a quantized folder
    assert type(model).__name__ == "MistralForCausalLM"

    code, out, err = cli(capsys, "quantize", str(out_dir), "--method", "int8")
    assert code == 1 and err.strip() == (f"error: {out_dir} is not an unquantized run dir "
                                         "(pass the run dir that training wrote)")


def test_format_table():
    rows = [Q.Row("unquantized fp32", 1_000_000, 2.0, 100.0, 32, 32),
            Q.Row("gguf-q8_0", 270_000, note="llama-cpp-python not installed")]
    assert Q.format_table(rows).splitlines()[2:] == [
        "| unquantized fp32 | 1.00 | 100% | 2.0000 | +0.00% | 100.0 | 1.00x | 32/32 |",
        "| gguf-q8_0 (llama-cpp-python not installed) | 0.27 | 27% | n/a | n/a | n/a | n/a | n/a |",
    ]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="bitsandbytes quantization needs a CUDA GPU")
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bnb_quantize_reload_generate(trained_run, tmp_path, method):
    from tinystory.settings import load_settings

    settings = load_settings(profile="tiny", env={}).replace(quantize__method=method)
    target, rows = Q.quantize(trained_run, settings, tmp_path / method, val_tokens=1024, gen_tokens=16, reps=1)
    assert (target / "config.json").is_file() and Run(target).manifest["method"] == method
    model, tok = L.load_model(Run(target))  # plain from_pretrained underneath
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"].to(model.device)
    assert model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).shape[1] == ids.shape[1] + 8
    assert rows[1].size_bytes < rows[0].size_bytes


def test_int8_untied_embeddings_round_trip(bpe_tokenizer):
    import torch

    from tinystory.model import build_config, build_model

    config = build_config("tiny", len(bpe_tokenizer))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = build_model(config).eval()
    state = I8.int8_state(model)
    assert state["model.embed_tokens.weight"].dtype == state["lm_head.weight"].dtype == torch.int8
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        a, ref = I8.build_int8(config, state)(ids).logits, model(ids).logits
    assert (a - ref).abs().max() < 0.05 * ref.abs().max()
