"""A tiny model trained for 150 steps on the bundled sample (plain torch loop), shared by
the quantize and GGUF tests. Built once per session under pytest's base temp dir.

A stand-in until a shared trained-run fixture lands in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

STEPS, BATCH, BLOCK, LR = 150, 16, 64, 3e-3


def trained_run(tmp_path_factory, tok, stories: list[str]) -> Path:  # noqa: ANN001
    """The run dir (HF folder + settings.toml) of the tiny model trained on `stories`."""
    import torch

    from tinystory.model import build_config, build_model
    from tinystory.settings import load_settings, to_toml

    path = tmp_path_factory.getbasetemp() / "tiny_trained_run"
    if (path / "model.safetensors").is_file():
        return path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and no spinning on a busy machine
    torch.manual_seed(0)
    stream = [t for s in stories for t in tok(s)["input_ids"] + [tok.eos_token_id]]
    data = torch.tensor(stream[: len(stream) // BLOCK * BLOCK]).view(-1, BLOCK)  # (N, T)
    model = build_model(build_config("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        batch = data[torch.randint(len(data), (BATCH,), generator=g)]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "settings.toml").write_text(to_toml(load_settings(profile="tiny", env={})), encoding="utf-8")
    (path / "loss.txt").write_text(f"{loss.item():.4f}\n")
    return path
