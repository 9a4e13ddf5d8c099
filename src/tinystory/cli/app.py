"""The `tinystory` command: one Typer app, one thin module per command.

Nothing here imports torch, transformers, datasets, bitsandbytes or wandb: `--help`,
`--version` and tab completion stay instant. Errors become one red line on stderr with a
stable exit code: 1 for a tinystory error, 2 for usage, 130 for Ctrl-C;
TINYSTORY_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from tinystory import __version__

app = typer.Typer(
    name="tinystory",
    help="Train a small story-telling language model from scratch, then measure it, talk to it, "
    "shrink it and publish it.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"tinystory {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Train a small story-telling language model from scratch."""


def _register() -> None:
    from tinystory.cli import config_cmd, eval_cmd, generate, prepare, push, quantize, serve, train

    app.command("prepare", help="Text -> tokenizer + packed token shards (train.bin, val.bin, meta.json).")(prepare.prepare)
    app.command("train", help="Train a model on prepared data; writes a run dir.")(train.train)
    app.command("eval", help="Loss, perplexity, bits per byte and story diversity of trained models.")(eval_cmd.eval_)
    app.command("generate", help="Tell a story: stream a continuation of a prompt to stdout.")(generate.generate)
    app.command("quantize", help="Make a smaller, faster model: int8, bitsandbytes or GGUF for llama.cpp.")(quantize.quantize)
    app.command("push", help="Publish a run to the Hugging Face Hub with a model card.")(push.push)
    app.command("serve", help="Serve a model: a web page and an OpenAI-compatible API.")(serve.serve)
    app.command("profiles", help="List the hardware profiles and what each sets.")(config_cmd.profiles)
    app.add_typer(config_cmd.config_app, name="config", help="Show the resolved settings and where each value came from.")


_register()


def _fail(message: str, code: int) -> None:
    from tinystory.console import console

    console().print(f"[bold red]error:[/bold red] {message}", soft_wrap=True, markup=True, highlight=False)
    raise SystemExit(code)


def _click_exceptions():  # type: ignore[no-untyped-def]
    """Click's exception classes (typer 0.29 vendors click as `typer._click`)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer on the real click
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and `python -m tinystory`."""
    from tinystory.errors import TinystoryError

    click = _click_exceptions()

    debug = os.environ.get("TINYSTORY_DEBUG", "").strip() not in ("", "0")
    try:
        rv = app(args=argv, prog_name="tinystory", standalone_mode=False)
        raise SystemExit(rv if isinstance(rv, int) else 0)
    except TinystoryError as e:
        if debug:
            raise
        from rich.markup import escape

        _fail(escape(str(e)), e.exit_code)
    except typer.Exit as e:
        if e.exit_code == 130:  # typer turns Ctrl-C into a silent Exit(130)
            _fail("interrupted", 130)
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        _fail("interrupted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except click.ClickException as e:
        e.show(file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except SystemExit:
        raise
    except BrokenPipeError:  # `tinystory generate ... | head`
        raise SystemExit(0) from None
    except Exception as e:  # a bug: one line unless debugging
        if debug:
            raise
        from rich.markup import escape

        _fail(escape(f"{type(e).__name__}: {e} (set TINYSTORY_DEBUG=1 for the traceback)"), 1)
