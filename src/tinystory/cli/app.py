"""The `tinystory` command: one Typer app, one thin module per command.

Nothing here imports torch, transformers, datasets, bitsandbytes or wandb: `--help`,
`--version` and tab completion stay instant. Errors become one red line on stderr with a
stable exit code: 1 for a tinystory error, 2 for usage, 130 for Ctrl-C;
TINYSTORY_DEBUG=1 shows the traceback.

`main` runs a command in an app that holds only that command (`build(only=...)`), and the
commands in QUICK_EXIT end the process without the interpreter's tear-down: both only make
the start and the end sooner (every millisecond shows on a 0.5 s `prepare`).
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Annotated

import typer

from tinystory import __version__
from tinystory.cli.completions import COMPLETE_VAR

# commands that close every file they open and start no threads, so a successful run may end
# the process without tearing the interpreter down (only when `main` is the process's entry)
QUICK_EXIT = {"prepare", "profiles", "config"}
COMMANDS = {  # name -> (module in tinystory.cli, function, help)
    "prepare": ("prepare", "prepare", "Text -> tokenizer + packed token shards (train.bin, val.bin, meta.json)."),
    "train": ("train", "train", "Train a model on prepared data; writes a run dir."),
    "eval": ("eval_cmd", "eval_", "Loss, perplexity, bits per byte and story diversity of trained models."),
    "generate": ("generate", "generate", "Tell a story: stream a continuation of a prompt to stdout."),
    "quantize": ("quantize", "quantize", "Make a smaller, faster model: int8, bitsandbytes or GGUF for llama.cpp."),
    "push": ("push", "push", "Publish a run to the Hugging Face Hub with a model card."),
    "serve": ("serve", "serve", "Serve a model: a web page and an OpenAI-compatible API."),
    "profiles": ("config_cmd", "profiles", "List the hardware profiles and what each sets."),
    "config": ("config_cmd", "config_app", "Show the resolved settings and where each value came from."),
}


def _version(value: bool) -> None:
    if value:
        print(f"tinystory {__version__}")
        raise typer.Exit(0)


def build(only: str | None = None) -> typer.Typer:
    """The Typer app with every command, or with just `only` (what `main` runs a command
    with: typer then works out one command's options instead of all of them, ~0.02 s
    sooner on every start)."""
    from importlib import import_module

    application = typer.Typer(
        name="tinystory",
        help="Train a small story-telling language model from scratch, then measure it, talk to it, "
        "shrink it and publish it.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @application.callback()
    def _root(
        version: Annotated[
            bool | None,
            typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
        ] = None,
    ) -> None:
        """Train a small story-telling language model from scratch."""

    for name, (module, attr, help_) in COMMANDS.items():
        if only is None or name == only:
            target = getattr(import_module(f"tinystory.cli.{module}"), attr)
            if isinstance(target, typer.Typer):
                application.add_typer(target, name=name, help=help_)
            else:
                application.command(name, help=help_)(target)
    return application


@lru_cache(maxsize=1)
def _full_app() -> typer.Typer:
    return build()


def __getattr__(name: str) -> typer.Typer:
    """`app`: the app with every command, built on first use (a command's run builds its
    own with `build(only=...)`, so it never imports the other commands' modules)."""
    if name == "app":
        return _full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fail(message: str, code: int) -> None:
    from tinystory.console import console

    console().print(f"[bold red]error:[/bold red] {message}", soft_wrap=True, markup=True, highlight=False)
    raise SystemExit(code)


def _click_exceptions():
    """Click's exception classes (typer 0.29 vendors click as `typer._click`)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer on the real click
        from click import exceptions
    return exceptions


def _quick_exit() -> None:
    """End the process now: what is printed is flushed, and the interpreter's tear-down
    (~0.03 s after `prepare`: modules, a last garbage collection) is skipped."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(0)


def _app_for(args: list[str]) -> typer.Typer:
    """An app with only the command that `args` name, else (and for completion, which
    needs them all) the full one."""
    if args and args[0] in COMMANDS and COMPLETE_VAR not in os.environ:
        return build(only=args[0])
    return _full_app()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and `python -m tinystory` (argv None: the
    process's own arguments, and a QUICK_EXIT command may end the process)."""
    from tinystory.errors import TinystoryError

    click = _click_exceptions()

    debug = os.environ.get("TINYSTORY_DEBUG", "").strip() not in ("", "0")
    if sys.platform == "darwin":  # an op without an Apple GPU (MPS) kernel runs on the CPU instead of failing;
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # set before torch starts (training says so)
    try:
        args = sys.argv[1:] if argv is None else argv
        rv = _app_for(args)(args=argv, prog_name="tinystory", standalone_mode=False)
        if argv is None and rv is None and args and args[0] in QUICK_EXIT:  # ran (not --help)
            _quick_exit()
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
    except Exception as e:  # a full disk, else a bug: one line unless debugging
        if debug:
            raise
        from rich.markup import escape

        from tinystory.errors import disk_full

        full = disk_full(e)
        if full:
            _fail(escape(f"{full} (free some space, or write elsewhere: --out, TINYSTORY_CACHE_DIR, "
                         "TINYSTORY_RUNS_DIR)"), 1)
        _fail(escape(f"{type(e).__name__}: {e} (set TINYSTORY_DEBUG=1 for the traceback)"), 1)
