"""`tinystory push`: the upload folder, the model card, and one commit to a stand-in Hub.

The Hub is unreachable here, so `hub_server.StandInHub` (127.0.0.1, a free port) answers
the endpoints huggingface_hub 2.4 calls. huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported, so the `hub` fixture patches its constants as well as
the environment; one test runs the real CLI in a fresh process instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hub_server import Repo, StandInHub, validate_metadata

from tinystory.cli.app import main
from tinystory.hub import format_size

TOKEN = "hf_tinystoryTEST0123456789abcdefSECRET"
EXPECTED = ["README.md", "config.json", "eval.json", "generation_config.json", "loss.png", "metrics.jsonl",
            "model.safetensors", "run.json", "settings.toml", "tokenizer.json", "tokenizer_config.json"]
QUANTIZED = ["quantized/int8/model.pt", "quantized/int8/quantization.json", "quantized/model-q8_0.gguf"]
# eval.json as `tinystory eval` writes it (evaluation.py); "counts" are not metrics
METRICS = {"loss": 1.2345678, "ppl": 3.4369, "bpb": 0.5123456, "distinct-1": 0.1234, "distinct-2": 0.4567,
           "distinct-1-li": 0.1234, "self-bleu": 31.23, "rep-2": 4.56, "rep-3": 2.11, "diversity": 0.9012,
           "length": 120.5, "eos-share": 0.875}
REFERENCE = {"distinct-1": 0.13, "self-bleu": 29.0, "rep-2": 3.9}
EVAL_SETTINGS = {"data": "/data/prepared/abc", "block_size": 512, "max_tokens": 0, "batch_size": 8,
                 "num_samples": 100, "max_new_tokens": 256, "temperature": 1.0, "top_p": 0.9, "top_k": 0,
                 "seed": 1234, "device": "cpu", "dtype": "fp32"}
COUNTS = {"tokens": 65536, "text_tokens": 65000, "bytes": 280123, "blocks": 128, "samples": 100}
STORIES = [
    {"prompt": "Once upon a time", "story": "Once upon a time, there was a little cat named Tom. Tom liked to play."},
    {"prompt": "Lily wanted", "story": "Lily wanted a red ball. Her mom said yes, and Lily was happy."},
    {"prompt": "The sun", "story": "The sun was hot. Ben and Sue went to the park to find some shade."},
    {"prompt": "A dog", "story": "A dog ran fast."},
]
RUN_INFO = {"tinystory_version": "0.1.0", "profile": "tiny", "preset": "tiny", "parameters": 139584,
            "data": {"path": "/data/prepared/abc", "tokenizer": "bpe:512", "tokenizer_sha256": "ab" * 32},
            "steps": 1200, "tokens_seen": 4915200, "wall_time_s": 754.2, "device": "cpu (AMD EPYC 9B14)",
            "precision": "fp32", "best_eval_loss": 1.2401, "best_eval_bpb": 0.5150, "stopped_because": "max_steps"}


def quiet(*argv: str) -> int:
    """Run the CLI in-process; its exit code."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return int(e.value.code or 0)


@pytest.fixture(scope="module")
def evaluated_run(random_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random_run plus what train and eval add: run.json, eval.json, metrics, loss curve,
    checkpoints, optimizer state, caches and quantized variants."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(random_run, run)
    from tinystory.runs import Run

    (run / "run.json").write_text(json.dumps(RUN_INFO), encoding="utf-8")
    evaluation = {"run": str(run), "name": "run", "metrics": METRICS, "reference": REFERENCE, "counts": COUNTS,
                  "settings": EVAL_SETTINGS, "weights_sha256": Run(run).weights_sha256(), "tinystory_version": "0.1.0"}
    (run / "eval.json").write_text(json.dumps(evaluation), encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 5.1}\n{"step": 20, "loss": 4.2}\n', encoding="utf-8")
    (run / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (run / ".loss.png.tmp.png").write_bytes(b"half-written")
    for name, data in {"checkpoints/checkpoint-1200/model.safetensors": b"w", "checkpoints/checkpoint-1200/"
                       "optimizer.pt": b"o", "optimizer.pt": b"o", "training_args.bin": b"a", "wandb/run.log": b"l",
                       ".cache/x": b"c", "quantized/int8/quantization.json": b'{"method": "int8"}',
                       "quantized/int8/model.pt": b"int8 weights", "quantized/model-q8_0.gguf": b"GGUF\x03\x00",
                       "quantized/.cache/tmp": b"c", "quantized/int8/__pycache__/x.pyc": b"p"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    return run


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stand-in Hub that owns nothing yet, with the client pointed at it and no saved token."""
    from huggingface_hub import constants

    with StandInHub(TOKEN, user="learner") as server:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agents.json"))
        yield server


def hub_calls(server: StandInHub) -> list[str]:
    return [n for n in server.names() if n]  # "" = huggingface_hub's own telemetry, not ours


def upload_files(run: Path) -> dict[str, bytes]:
    folder = run / "hub-upload"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------- pushing


def test_push_is_one_commit_of_exactly_the_upload_folder(evaluated_run, hub, capsys):
    assert quiet("push", str(evaluated_run), "learner/tiny-stories", "--token", TOKEN) == 0
    assert hub_calls(hub) == ["create", "validate", "preupload", "commit"]
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit["repo"], commit["revision"]) == ("learner/tiny-stories", "main")
    assert commit["summary"] == "Upload run (tinystory-llm 0.1.0)"
    assert sorted(commit["files"]) == EXPECTED
    assert commit["files"] == upload_files(evaluated_run)  # what --dry-run shows is what is sent
    for name in EXPECTED[1:]:  # everything but the card is the run's own file, byte for byte
        assert commit["files"][name] == (evaluated_run / name).read_bytes(), name
    assert commit["files"]["README.md"].startswith(b"---\n")
    assert not hub.repos["learner/tiny-stories"].private
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{evaluated_run / 'hub-upload'}/"
    assert out[-2] == f"11 files, {format_size(sum(len(b) for b in commit['files'].values()))}"
    assert out[-1] == f"{hub.url}/learner/tiny-stories/commit/{commit_oid(hub)}"


def commit_oid(server: StandInHub) -> str:
    """The oid the stand-in gave the last commit (sha1 of its body)."""
    import hashlib

    body = next(s.body for s in reversed(server.seen) if "/commit/" in s.path)
    return hashlib.sha1(body).hexdigest()


def test_quantized_variants_private_repo_and_branch(evaluated_run, hub):
    assert quiet("push", str(evaluated_run), "learner/tiny-q", "--token", TOKEN, "--include-quantized",
                 "--private", "--revision", "dev", "-m", "First upload") == 0
    assert hub_calls(hub) == ["create", "branch", "validate", "preupload", "commit"]
    commit = hub.commits[0]
    assert (commit["revision"], commit["summary"]) == ("dev", "First upload")
    assert sorted(commit["files"]) == sorted(EXPECTED + QUANTIZED)  # no quantized/.cache, no __pycache__
    assert commit["files"]["quantized/model-q8_0.gguf"] == b"GGUF\x03\x00"
    assert hub.repos["learner/tiny-q"].private
    card = commit["files"]["README.md"].decode()
    assert "- gguf" in card.split("---")[1] and "`quantized/model-q8_0.gguf`" in card


def test_token_goes_only_into_the_authorization_header(evaluated_run, hub, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual way: from the environment
    assert quiet("push", str(evaluated_run), "learner/tiny-env") == 0
    authed = 0
    for seen in hub.seen:
        assert TOKEN not in seen.path and TOKEN.encode() not in seen.body
        for name, value in seen.headers.items():
            if TOKEN in value:
                assert (name, value) == ("authorization", f"Bearer {TOKEN}")
                authed += 1
    assert authed == len(hub_calls(hub)) == 4
    assert all(TOKEN.encode() not in data for data in hub.commits[0]["files"].values())
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    home = Path(os.environ["TINYSTORY_CACHE_DIR"]).parent
    for root in (evaluated_run, home, tmp_path):
        for f in root.rglob("*"):
            assert not f.is_file() or TOKEN.encode() not in f.read_bytes(), f


def test_dry_run_writes_the_folder_and_touches_no_network(evaluated_run, hub, capsys):
    assert quiet("push", str(evaluated_run), "learner/tiny-dry", "--dry-run") == 0  # no token needed
    assert hub.seen == []
    out = capsys.readouterr().out.splitlines()
    folder = evaluated_run / "hub-upload"
    assert out[0] == f"{folder}/"
    listed = {line.split()[0]: line.split(maxsplit=1)[1].strip() for line in out[1:-1]}
    assert sorted(listed) == EXPECTED == sorted(upload_files(evaluated_run))
    assert listed["run.json"] == f"{(evaluated_run / 'run.json').stat().st_size} B"
    assert listed["model.safetensors"] == "560.4 kB"
    assert out[-1].startswith("11 files, ") and out[-1].endswith(" kB")
    assert "learner/tiny-dry" in (folder / "README.md").read_text(encoding="utf-8")


def test_the_users_own_readme_is_kept(evaluated_run, hub, tmp_path):
    run = tmp_path / "mine"
    shutil.copytree(evaluated_run, run)
    mine = "---\nlicense: mit\n---\n# My own story model\n\nI wrote this card myself.\n"
    (run / "README.md").write_text(mine, encoding="utf-8")
    assert quiet("push", str(run), "learner/mine", "--token", TOKEN) == 0
    assert hub.commits[0]["files"]["README.md"] == mine.encode()


# ---------------------------------------------------------------------- errors


def expect_error(capsys, *argv: str) -> str:
    """Exit code 1, nothing on stdout, and the error as the one last stderr line: that line."""
    assert quiet(*argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], captured.err
    assert captured.out == "" and "Traceback" not in captured.err and TOKEN not in captured.err
    return lines[-1]


def test_no_token(evaluated_run, hub, capsys):
    line = expect_error(capsys, "push", str(evaluated_run), "learner/x")
    assert line == "error: no Hugging Face token found (run `hf auth login` or set HF_TOKEN)"
    assert hub.seen == []


def test_saved_login_is_used(evaluated_run, hub, tmp_path):
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    assert quiet("push", str(evaluated_run), "learner/saved") == 0
    assert len(hub.commits) == 1


def test_rejected_token(evaluated_run, hub, capsys):
    line = expect_error(capsys, "push", str(evaluated_run), "learner/x", "--token", "hf_revoked")
    assert line == ("error: the Hub rejected the token (401 Unauthorized) (it may be revoked or mistyped: run "
                    "`hf auth login` or set HF_TOKEN with a valid one)")
    assert hub.commits == []


@pytest.mark.parametrize("exists", [True, False])
def test_repo_of_someone_else(evaluated_run, hub, capsys, exists):
    if exists:  # a public repo of another user: create says 403, repo_info says it exists, preupload says 403
        hub.repos["someone/their-model"] = Repo(owner="someone", private=False)
    line = expect_error(capsys, "push", str(evaluated_run), "someone/their-model", "--token", TOKEN)
    assert line == ("error: no write access to someone/their-model (403 Forbidden): the namespace belongs to "
                    "someone else or the token is read-only (push to your-name/their-model, or use a token with "
                    "write access)")
    assert hub.commits == []
    assert hub_calls(hub)[:2] == ["create", "info"]


def test_not_found(evaluated_run, hub, capsys):
    hub.fail["preupload"] = 404
    line = expect_error(capsys, "push", str(evaluated_run), "learner/gone", "--token", TOKEN)
    assert line == ("error: learner/gone (revision main) was not found on the Hub (404 Not Found) "
                    "(check the repo id and --revision)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_fails_within_seconds(evaluated_run, hub, capsys, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", url)
    start = time.monotonic()
    line = expect_error(capsys, "push", str(evaluated_run), "learner/x", "--token", TOKEN)
    assert time.monotonic() - start < 5
    assert line == (f"error: cannot reach the Hugging Face Hub ({url}) (check your network, or use --dry-run to "
                    "prepare the upload offline)")


def test_dropped_connection_is_not_retried(evaluated_run, hub, capsys):
    hub.drop.add("preupload")  # huggingface_hub alone would retry 5 times over 23 s
    start = time.monotonic()
    line = expect_error(capsys, "push", str(evaluated_run), "learner/x", "--token", TOKEN)
    assert time.monotonic() - start < 5
    assert line == (f"error: lost the connection to the Hugging Face Hub ({hub.url}): RemoteProtocolError from "
                    "127.0.0.1 (check your network and push again)")
    assert hub_calls(hub).count("preupload") == 1


def test_a_hub_that_stops_answering_times_out(evaluated_run, hub, capsys, monkeypatch):
    from tinystory import hub as hub_module

    monkeypatch.setattr(hub_module, "READ_TIMEOUT_S", 0.3)
    hub.delay["create"] = 2.0
    line = expect_error(capsys, "push", str(evaluated_run), "learner/x", "--token", TOKEN)
    assert line.startswith(f"error: lost the connection to the Hugging Face Hub ({hub.url}): ReadTimeout")


def test_offline_mode(evaluated_run, hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = expect_error(capsys, "push", str(evaluated_run), "learner/x", "--token", TOKEN)
    assert line == "error: cannot push: HF_HUB_OFFLINE is set (unset it, or use --dry-run to prepare the upload)"


def test_run_without_a_trained_model(hub, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = expect_error(capsys, "push", str(tmp_path / "empty"), "learner/x", "--token", TOKEN)
    assert line == (f"error: {tmp_path / 'empty'} holds no trained model (config.json is missing) (train first "
                    "with `tinystory train`, then push its run dir)")
    line = expect_error(capsys, "push", str(tmp_path / "nope"), "learner/x", "--dry-run")
    assert line == f"error: run dir {tmp_path / 'nope'} does not exist (pass the folder `tinystory train` wrote)"
    assert hub.seen == []


@pytest.mark.parametrize("repo_id,why", [
    ("learner/bad--name", "Cannot have -- or .. in repo_id"),
    ("a/b/c", "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
    ("learner/-x", "Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot start or end with '-' or "
                   "'.' and the maximum length is 96"),
])
def test_invalid_repo_id_fails_before_anything(hub, capsys, tmp_path, repo_id, why):
    line = expect_error(capsys, "push", str(tmp_path / "nope"), repo_id, "--token", TOKEN)
    assert line == f"error: invalid repo id {repo_id!r}: {why} (use namespace/name, e.g. your-name/tinystories-3m)"
    assert hub.seen == []


def test_repo_id_needs_a_namespace(hub, capsys, random_run):
    line = expect_error(capsys, "push", str(random_run), "tiny", "--dry-run")
    assert line == "error: invalid repo id 'tiny': it needs a namespace (use namespace/name, e.g. your-name/tiny)"


def test_invalid_metadata_in_the_users_readme(evaluated_run, hub, capsys, tmp_path):
    run = tmp_path / "bad-card"
    shutil.copytree(evaluated_run, run)
    (run / "README.md").write_text("---\nlicense: my-own-licence\n---\n# Mine\n", encoding="utf-8")
    line = expect_error(capsys, "push", str(run), "learner/x", "--token", TOKEN)
    assert line == ("error: the Hub rejected the metadata of README.md: \"license\" must be one of ['apache-2.0', "
                    "'cc-by-4.0', 'mit', 'other'] (fix its YAML front matter, or delete the run's README.md to get a "
                    "generated card)")


# ------------------------------------------------------------------ model card


def card_of(run: Path, repo_id: str = "learner/tiny-stories", **kw) -> str:
    from tinystory.modelcard import model_card

    return model_card(run, repo_id, **kw)


def test_card_metadata_is_valid_and_matches_eval_json(evaluated_run):
    from huggingface_hub import ModelCard

    text = card_of(evaluated_run, quantized_files=QUANTIZED)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert {k: meta[k] for k in ("license", "datasets", "language", "library_name", "pipeline_tag")} == {
        "license": "apache-2.0", "datasets": ["roneneldan/TinyStories"], "language": ["en"],
        "library_name": "transformers", "pipeline_tag": "text-generation"}
    assert meta["tags"] == ["tinystories", "tinystory-llm", "mistral", "story-generation", "small-language-model",
                            "gguf"]
    assert validate_metadata(text) == []
    card = ModelCard(text)  # huggingface_hub parses model-index back into EvalResults
    assert card.data.model_name == "tiny-stories"
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert got == {{"ppl": "perplexity", "bpb": "bits_per_byte"}.get(k, k): v for k, v in METRICS.items()}
    assert {r.metric_name for r in card.data.eval_results} >= {"Validation loss", "Distinct-1 (Li)", "Rep-2"}
    r = card.data.eval_results[0]
    assert (r.task_type, r.dataset_type, r.dataset_split) == ("text-generation", "roneneldan/TinyStories", "validation")


def test_card_body(evaluated_run):
    text = card_of(evaluated_run)
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## Model", "## Tokenizer", "## Training", "## Evaluation", "## Sample stories", "## Usage",
                     "## Limitations", "## Citation"]
    for row in ["| Parameters | 139,584 (139.6k), embeddings tied to the output head |", "| Layers | 2 |",
                "| Hidden size | 64 |", "| Attention heads | 4 (4 key/value heads) |", "| Vocabulary | 512 tokens |",
                "| Steps | 1,200 |", "| Tokens seen | 4,915,200 (4.9M) |", "| Hardware | cpu (AMD EPYC 9B14) |",
                "| Wall time | 13 min |", "| Best validation loss | 1.2401 (bits per byte 0.5150) |",
                "| Validation loss | 1.2346 |  | cross-entropy per token, nats (lower is better) |",
                "| Perplexity | 3.4369 |  | exp(loss) (lower is better) |",
                "| Distinct-1 | 0.1234 | 0.1300 | unique / all word 1-grams across stories (higher = more varied) |",
                "| Self-BLEU | 31.23 | 29.00 | BLEU-4 of each story against the others, 0-100 (lower = more "
                "varied) |",
                "| Rep-3 | 2.1100 |  | % of repeated word 3-grams within a story (lower = less repetitive) |",
                "| Ended | 0.8750 |  | share of stories that ended (EOS) before the token limit |"]:
        assert row in text, row
    assert ("Scored 65,536 validation tokens (280,123 bytes) in blocks of 512; text metrics on 100 stories sampled "
            "from `<s>` (max_new_tokens 256, temperature 1.0, top_p 0.9, top_k 0, seed 1234).") in text
    assert "/data/prepared" not in text  # no local paths on the card
    assert "A 139.6k-parameter language model" in text and "![Training curve](loss.png)" in text
    assert "`bpe:512`" in text and f"`{'ab' * 32}`" in text
    assert 'AutoModelForCausalLM.from_pretrained("learner/tiny-stories")' in text
    assert 'tinystory generate --run learner/tiny-stories "Once upon a time"' in text
    assert "arXiv:2305.07759" in text


def test_card_samples_are_generated_with_a_fixed_seed(evaluated_run):
    text = card_of(evaluated_run)
    stories = [line for line in text.splitlines() if line.startswith("> **")]
    assert [s.split("**")[1] for s in stories] == ["Once upon a time", "Lily and her dog", "One day, a little boy"]
    assert ("Sampling settings: `temperature=1.0`, `top_p=0.9`, `max_new_tokens=64`, `seed=42`.") in text
    assert card_of(evaluated_run) == text  # reproducible


def test_card_takes_samples_from_eval_json_when_it_has_them(evaluated_run, tmp_path):
    run = tmp_path / "with-samples"
    shutil.copytree(evaluated_run, run)
    data = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**data, "samples": STORIES}), encoding="utf-8")
    text = card_of(run)
    assert "> **Once upon a time**, there was a little cat named Tom. Tom liked to play." in text
    assert "> **The sun** was hot." in text and "A dog ran fast" not in text  # three at most
    assert "Sampling settings: `temperature=1.0`, `top_p=0.9`, `max_new_tokens=256`, `seed=1234`." in text


def test_eval_json_of_other_weights_is_left_out(evaluated_run, hub, tmp_path, capsys):
    run = tmp_path / "retrained"
    shutil.copytree(evaluated_run, run)
    data = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**data, "weights_sha256": "0" * 64}), encoding="utf-8")
    assert quiet("push", str(run), "learner/retrained", "--dry-run") == 0
    err = capsys.readouterr().err
    assert err.count("warning: eval.json was made for other weights") == 1
    files = upload_files(run)
    assert "eval.json" not in files and "Not evaluated yet" in files["README.md"].decode()
    assert "model-index" not in files["README.md"].decode()


def test_card_without_run_json_or_eval(random_run, tmp_path):
    run = tmp_path / "plain"
    shutil.copytree(random_run, run)
    text = card_of(run)
    assert "model-index" not in text.split("---\n")[1]
    assert validate_metadata(text) == []
    assert "Not evaluated yet: run `tinystory eval --run RUN_DIR` and push again" in text
    assert "The run recorded no summary (run.json), so only its settings are shown." in text
    assert "| Profile | `tiny` |" in text and "| Steps |" not in text


def test_story_text_cannot_break_the_markdown():
    from tinystory.modelcard import _story

    assert _story("Tom", "Tom saw ```code``` and # a <b>.\n\nEnd") == \
        "> **Tom** saw \\`\\`\\`code\\`\\`\\` and \\# a \\<b\\>.\n>\n> End"
    assert _story("Tom", "went home.") == "> **Tom** went home."


# ------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_push_in_a_fresh_process(evaluated_run, tmp_path):
    """The real command: HF_ENDPOINT read at import, the token from HF_TOKEN, nothing leaked."""
    with StandInHub(TOKEN) as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}
        env.pop("HF_HUB_OFFLINE", None)
        r = subprocess.run([sys.executable, "-m", "tinystory", "push", str(evaluated_run), "learner/fresh"],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert [n for n in server.names() if n] == ["create", "validate", "preupload", "commit"]
        assert sorted(server.commits[0]["files"]) == EXPECTED
        assert r.stdout.splitlines()[-1].startswith(f"{server.url}/learner/fresh/commit/")
        assert TOKEN not in r.stdout + r.stderr
        assert not any(TOKEN.encode() in f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())


def test_push_help_imports_nothing_heavy():
    code = ("import sys\nfrom tinystory.cli.app import main\ntry:\n    main(['push', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules),"
            " file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY=\n" in r.stderr and "--include-quantized" in r.stdout
