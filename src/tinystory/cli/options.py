"""Options shared by every command, declared once (Annotated aliases), and the one
function that turns typed flags into a resolved `Settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tinystory.settings import Settings, load_settings, parse_set, print_settings

PANEL = "Settings"

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Hardware profile (`tinystory profiles`); default: TINYSTORY_PROFILE or auto.",
                 rich_help_panel=PANEL, show_default=False),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file; default: TINYSTORY_CONFIG or the user config dir.",
                 rich_help_panel=PANEL, show_default=False, dir_okay=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override any setting: section.key=value (repeatable).",
                 rich_help_panel=PANEL, show_default=False),
]
PrintSettingsOpt = Annotated[
    bool,
    typer.Option("--print-settings", help="Print the resolved settings with their sources and exit.",
                 rich_help_panel=PANEL),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="auto, cpu, cuda or mps (auto: a CUDA GPU, else an Apple GPU, else the CPU).",
                 show_default=False),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (reproducible results).", show_default=False)]
RunArg = Annotated[
    str | None,
    typer.Option("--run", "-r",
                 help="Run dir, checkpoint, quantized model, .gguf file or hub id; default: the latest run.",
                 show_default=False),
]


def resolve(
    profile: str | None,
    config: Path | None,
    set_items: list[str] | None,
    flags: dict[str, tuple[Any, str]] | None = None,
    print_only: bool = False,
    sections: list[str] | None = None,
) -> Settings:
    """Settings from the layers, with the flags the user typed on top (None = not typed).

    flags: `section.key -> (value, "--flag")`. With `print_only`, print the table and exit 0.
    """
    overrides = parse_set(set_items)
    for dotted, (value, flag) in (flags or {}).items():
        if value is not None:
            overrides[dotted] = (value, flag)
    settings = load_settings(profile=profile, config=config, overrides=overrides)
    if print_only:
        print_settings(settings, sections)
        raise typer.Exit(0)
    return settings
