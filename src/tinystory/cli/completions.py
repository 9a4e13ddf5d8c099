"""Shell completion scripts for bash, zsh and fish, generated from the app.

`python -m tinystory.cli.completions [DIR]` rewrites `completions/` (a test fails when
the committed scripts are stale). The scripts call `tinystory` back with
`_TINYSTORY_COMPLETE` set, which never imports torch, so completion stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "tinystory.bash", "zsh": "_tinystory", "fish": "tinystory.fish"}
COMPLETE_VAR = "_TINYSTORY_COMPLETE"


def script(shell: str) -> str:
    """The completion script for `shell`, exactly as written to completions/."""
    from typer.completion import get_completion_script

    return get_completion_script(prog_name="tinystory", complete_var=COMPLETE_VAR, shell=shell).rstrip() + "\n"


def write_all(folder: Path) -> list[Path]:
    """Write every shell's script into `folder`; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(script(shell), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(p)
