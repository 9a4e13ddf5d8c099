"""One rich Console on stderr for logs and progress; stdout is kept for results."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@lru_cache(maxsize=1)
def console() -> Console:
    """The shared stderr console (logs, progress, tables that are not results)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


@lru_cache(maxsize=1)
def out() -> Console:
    """A console on stdout, for results printed as rich tables."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """A log line on stderr."""
    console().print(message)


def warn(message: str) -> None:
    """A yellow warning line on stderr."""
    console().print(f"[yellow]warning:[/yellow] {message}")


def interactive() -> bool:
    """True when stderr is a terminal, so live displays make sense (else plain lines)."""
    if os.environ.get("TINYSTORY_PLAIN"):
        return False
    return sys.stderr.isatty()
