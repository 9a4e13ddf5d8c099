"""`tinystory quantize [RUN] --method METHOD [--out DIR]`: flags -> settings -> library call.

Prints the comparison table on stderr and the output path on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinystory.cli.options import ConfigOpt, PrintSettingsOpt, ProfileOpt, SetOpt, resolve

METHOD_HELP = ("int8 (CPU), bnb-int8 / bnb-nf4 (CUDA), gguf-f32 / gguf-f16 / gguf-q8_0 (llama.cpp); "
               "default: quantize.method")


def quantize(
    run: Annotated[str | None, typer.Argument(help="Run dir, checkpoint or hub id; default: the latest run.",
                                                  show_default=False)] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help=METHOD_HELP, show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder, or .gguf file for gguf-*; "
                                                 "default: RUN/quantized/.", show_default=False)] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_settings: PrintSettingsOpt = False,
) -> None:
    """Make a smaller, faster model and compare it with the unquantized one."""
    settings = resolve(profile, config, set_,
                       flags={"quantize.method": (method, "--method"),
                              "quantize.out": (str(out) if out is not None else None, "--out")},
                       print_only=print_settings, sections=["quantize", "generate"])
    from tinystory.console import console
    from tinystory.quantization import format_table
    from tinystory.quantization import quantize as quantize_run
    from tinystory.runs import Run

    target, rows = quantize_run(Run.open(run).path, settings)
    console().print(format_table(rows), markup=False)  # notes hold "[gguf]", not markup
    print(target)
