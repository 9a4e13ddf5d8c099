"""Shared fixtures. Every test runs offline, with its own cache/runs/config dirs."""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's config, writes the user's cache or touches the network."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TINYSTORY_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("TINYSTORY_RUNS_DIR", str(home / "runs"))
    monkeypatch.setenv("TINYSTORY_CONFIG", str(home / "config.toml"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(home / "wandb"))
    monkeypatch.setenv("TINYSTORY_PLAIN", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for var in list(os.environ):
        if (var.startswith("TINYSTORY_") and "__" in var) or var in ("TINYSTORY_PROFILE", "TINYSTORY_DEBUG"):
            monkeypatch.delenv(var, raising=False)


def sample_stories(split: str = "train", limit: int | None = None) -> list[str]:
    """Stories of the bundled sample (real TinyStories text)."""
    raw = resources.files("tinystory.sample").joinpath(f"{'valid' if split == 'val' else split}.txt.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    return stories[:limit] if limit else stories


def write_prepared(folder: Path, tok, n_val: int = 40, *, train: list[str] | None = None,
                   val: list[str] | None = None, name: str = "bpe:512") -> Path:
    """A prepared folder in the agreed format (what `tinystory prepare` writes: BOS + ids +
    EOS per story, uint16) of `train` and `val` stories tokenized with `tok`; by default
    20 train and `n_val` val stories of the bundled sample."""
    import json

    import numpy as np

    from tinystory.tokenizer import fingerprint

    train = sample_stories("train", 20) if train is None else train
    val = sample_stories("val", n_val) if val is None else val
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, stories in (("train", train), ("val", val)):
        stream: list[int] = []
        for enc in tok(stories, add_special_tokens=False)["input_ids"]:
            stream += [tok.bos_token_id, *enc, tok.eos_token_id]
        np.asarray(stream, dtype=np.uint16).tofile(folder / f"{split}.bin")
        splits[split] = {"stories": len(stories), "tokens": len(stream),
                         "bytes": sum(len(s.encode("utf-8")) for s in stories)}
    meta = {"format": 1, "dtype": "uint16", "splits": splits,
            "tokenizer": {"name": name, "sha256": fingerprint(tok), "vocab_size": len(tok),
                          "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id}}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    tok.save_pretrained(folder)
    return folder


class PacedGenerator:
    """A real `Generator` whose streams wait `delay` s before each piece, so a client (an
    HTTP test, a browser's Stop button) can act mid-story."""

    def __init__(self, gen, delay: float) -> None:
        self._gen, self._delay = gen, delay

    def __getattr__(self, name: str):
        return getattr(self._gen, name)

    def stream(self, *args, **kwargs):
        import time

        inner, delay = self._gen.stream(*args, **kwargs), self._delay

        class Stream:
            stats = inner.stats

            def __iter__(self):
                for piece in inner:
                    time.sleep(delay)
                    yield piece

        return Stream()


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from a second one, and on a
    busy 2-core machine two OpenMP threads waiting for each other ran them ~50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared TinyStories folder (../shared/data/tinystories); skip if absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def mistral_converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Mistral tokenizer converted once for the session, in a cache of its own."""
    from tinystory.tokenizer import mistral_folder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYSTORY_CACHE_DIR", str(tmp_path_factory.mktemp("mistral-cache")))
        return mistral_folder()


@pytest.fixture
def mistral_cached(mistral_converted: Path) -> Path:
    """This test's cache holds the converted Mistral tokenizer, as on a machine that has run
    `prepare` before: a `tinystory prepare` started by the test does not convert it again."""
    import shutil

    from tinystory.paths import cache_dir

    dest = cache_dir() / "tokenizers" / mistral_converted.name
    shutil.copytree(mistral_converted, dest)
    return dest


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE 512 trained on 600 sample stories (deterministic)."""
    from tinystory.tokenizer import train_bpe

    return train_bpe(sample_stories("train", 600), 512)


@pytest.fixture(scope="session")
def random_run(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer) -> Path:
    """A run dir with an untrained `tiny` model (seed 0) and the BPE 512 tokenizer.

    For tests that need a loadable model but no learned behaviour; tests that need a
    model that writes stories use the trained-run fixture instead.
    """
    import torch

    from tinystory.model import build_config, build_model
    from tinystory.settings import load_settings, to_toml

    path = tmp_path_factory.mktemp("random_run")
    torch.manual_seed(0)
    tok = bpe_tokenizer
    config = build_config("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = build_model(config)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_p = 0.9
    model.generation_config.max_new_tokens = 64
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "settings.toml").write_text(to_toml(load_settings(profile="tiny", env={})), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer) -> Path:
    """A run dir of a `tiny` model that has learned something: 150 AdamW steps (batch 16 x
    64, lr 3e-3, seed 0, one thread, so the same floats every time) on 800 sample stories
    as training stores them (BOS + story + EOS), with the tiny profile's settings.toml and
    sampling defaults (temperature 1, top-p 0.9, 64 tokens). Greedy outputs and bpb of
    this model are pinned by the generate, quantize and GGUF tests."""
    import torch

    from tinystory.model import build_config, build_model
    from tinystory.settings import load_settings, to_toml

    tok = bpe_tokenizer
    stream: list[int] = []
    for story in sample_stories("train", 800):
        stream += [*tok(story)["input_ids"], tok.eos_token_id]  # BOS + story + EOS
    block, batch = 64, 16
    data = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)  # (N, T)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(build_config("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        x = data[torch.randint(len(data), (batch,), generator=g)]  # (B, T)
        loss = model(input_ids=x, labels=x).loss  # labels are shifted inside the model
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    assert loss.item() < 3.5, loss.item()  # ln(512) = 6.24 at the start
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.max_new_tokens = True, 1.0, 0.9, 64
    path = tmp_path_factory.mktemp("trained") / "trained-run"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "settings.toml").write_text(to_toml(load_settings(profile="tiny", env={})), encoding="utf-8")
    return path
