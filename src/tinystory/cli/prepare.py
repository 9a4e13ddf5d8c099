"""`tinystory prepare`: flags -> settings -> `tinystory.prepare.prepare`.

The prepared folder's path is the result (stdout); progress and the summary go to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinystory.cli.options import ConfigOpt, PrintSettingsOpt, ProfileOpt, SetOpt, resolve


def prepare(
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", show_default=False,
        help="`sample` (bundled), a .txt/.jsonl/.json/.parquet file, folder or glob, or a hub id.")] = None,
    revision: Annotated[str | None, typer.Option(
        "--revision", show_default=False,
        help="Hub dataset branch, tag or commit (default: main); the commit is recorded in meta.json.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", "-t", show_default=False, help="`mistral` (32k) or `bpe:N` trained on the train split.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False, file_okay=False,
        help="Output folder; default: the cache, named by a fingerprint.")] = None,
    max_stories: Annotated[int | None, typer.Option(
        "--max-stories", "-n", show_default=False, min=0, help="Keep at most N training stories (0 = all).")] = None,
    num_proc: Annotated[int | None, typer.Option(
        "--num-proc", show_default=False, min=0, help="Tokenizer processes (0 = one per core).")] = None,
    text_field: Annotated[str | None, typer.Option(
        "--text-field", show_default=False, help="Field holding the story in .jsonl/.json/.parquet/hub data.")] = None,
    errors: Annotated[str | None, typer.Option(
        "--errors", show_default=False,
        help="Bytes that are not UTF-8: `strict` (stop) or `replace` (U+FFFD).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the prepared data exists.")] = False,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Clean, split and tokenize stories into train.bin / val.bin + meta.json + tokenizer files."""
    settings = resolve(profile, config, set_, flags={
        "data.dataset": (dataset, "--dataset"),
        "data.revision": (revision, "--revision"),
        "data.tokenizer": (tokenizer, "--tokenizer"),
        "data.out": (str(out) if out is not None else None, "--out"),
        "data.max_stories": (max_stories, "--max-stories"),
        "data.num_proc": (num_proc, "--num-proc"),
        "data.text_field": (text_field, "--text-field"),
        "data.errors": (errors, "--errors"),
    }, print_only=print_settings, sections=["data"])
    from tinystory.prepare import prepare as run
    from tinystory.prepare import print_summary

    path = run(settings, force=force)
    print_summary(path)
    print(path)
