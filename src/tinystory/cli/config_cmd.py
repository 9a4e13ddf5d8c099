"""`tinystory profiles` and `tinystory config show|path`: what the settings are and why."""

from __future__ import annotations

from typing import Annotated

import typer

from tinystory.cli.options import ConfigOpt, ProfileOpt, SetOpt, resolve

config_app = typer.Typer(no_args_is_help=True)


def profiles() -> None:
    """List the shipped hardware profiles (name, model, tokenizer, precision, batch, description)."""
    from rich.table import Table

    from tinystory.console import out
    from tinystory.settings import profile_names, read_profile

    table = Table(title="profiles (use with --profile NAME)", title_justify="left")
    for col in ("name", "model", "tokenizer", "precision", "batch x block", "optimizer", "description"):
        table.add_column(col, overflow="fold")
    for name in profile_names():
        p = read_profile(name)
        t = p.get("train", {})
        table.add_row(
            name,
            p.get("model", {}).get("preset", "-"),
            p.get("data", {}).get("tokenizer", "-"),
            t.get("precision", "auto"),
            f"{t.get('batch_size', '-')} x {t.get('block_size', '-')}",
            t.get("optimizer", "adamw_torch"),
            p.get("description", ""),
        )
    out().print(table)


@config_app.command("show")
def show(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    section: Annotated[
        list[str] | None, typer.Option("--section", help="Only these sections (repeatable).", show_default=False)
    ] = None,
) -> None:
    """Print every setting, its value and the layer it came from."""
    resolve(profile, config, set_, print_only=True, sections=section)


@config_app.command("path")
def path() -> None:
    """Print the config file, cache and runs locations."""
    from tinystory import paths

    print(f"config: {paths.config_file()}")
    print(f"cache:  {paths.cache_dir()}")
    print(f"runs:   {paths.runs_dir()}")
