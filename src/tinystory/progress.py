"""Progress on stderr: training's live line (`Display`: one rich line on a terminal, plain
log lines otherwise) and the transient bar of a long loop (`bar`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from tinystory import console


@contextlib.contextmanager
def bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr, advanced by the function it yields (nothing when
    stderr is not a terminal or `what` is empty, e.g. inside training's own live display)."""
    if not what or not console.interactive():
        yield lambda n: None
        return
    cols = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*cols, console=console.console(), transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Display:
    """Shows step, loss, eval loss, tok/s, MFU and ETA.

    total: a callable giving the current planned total steps (it can change with --minutes).
    time_left: a callable giving the seconds left of a time budget (None: no budget); the
    ETA never passes it, since the run stops at the deadline whatever the step count says.
    """

    def __init__(self, total: Callable[[], int], interactive: bool | None = None,
                 time_left: Callable[[], float | None] | None = None, slice_tokens: int = 0,
                 target_bpb: float = 0.0) -> None:
        self.total = total
        self.time_left = time_left
        # evaluations score a slice of the validation split (labelled so), or all of it
        self.scope = f" ({slice_tokens:,}-token slice of val)" if slice_tokens else " (whole val split)"
        self.target = f" target {target_bpb:g}" if target_bpb else ""
        self.interactive = console.interactive() if interactive is None else interactive
        self.fields: dict[str, Any] = {}
        self._live: Any = None
        self._t0 = time.monotonic()
        self._step0 = 0
        self._step = 0

    def start(self, step: int) -> None:
        self._t0, self._step0 = time.monotonic(), step
        if self.interactive:
            self._step = step
            self._live = Live(self, console=console.console(), refresh_per_second=2, transient=False)
            self._live.start()

    def _eta(self, step: int) -> str:
        done = step - self._step0
        if done <= 0:
            return "?"
        per_step = (time.monotonic() - self._t0) / done
        eta = per_step * max(0, self.total() - step)
        left = self.time_left() if self.time_left else None
        return _clock(eta if left is None else min(eta, max(0.0, left)))

    def _line(self, step: int) -> str:
        f = self.fields
        parts = [f"step {step}/{self.total()}"]
        if "loss" in f:
            parts.append(f"loss {f['loss']:.4f}")
        if "eval_loss" in f:
            parts.append(f"eval {f['eval_loss']:.4f} (bpb {f.get('eval_bpb', float('nan')):.3f}"
                         f"{' slice' if 'slice' in self.scope else ''}{self.target})")
        if "lr" in f and f["lr"] is not None:
            parts.append(f"lr {f['lr']:.2e}")
        if "tok_per_s" in f:
            parts.append(f"{f['tok_per_s']:,.0f} tok/s")
        if f.get("mfu"):
            parts.append(f"MFU {100 * f['mfu']:.0f}%")
        parts.append(f"ETA {self._eta(step)}")
        return "  ".join(parts)

    def __rich__(self) -> Any:
        """Re-rendered at every refresh, so the ETA keeps moving between log steps."""
        return Text(self._line(self._step))

    def update(self, row: dict[str, Any], state: Any) -> None:
        """A new metrics row: refresh the live line, or print a plain line."""
        self.fields.update({k: v for k, v in row.items() if v is not None})
        step = self._step = row["step"]
        if self._live is not None:
            self._live.refresh()
            if "eval_loss" in row:  # keep evaluations in the scrollback
                self._live.console.print(
                    f"eval at step {step}{self.scope}: loss {row['eval_loss']:.4f}  ppl {row['eval_ppl']:.2f}  "
                    f"bpb {row['eval_bpb']:.4f}{self.target}")
        elif "eval_loss" in row:
            console.info(f"eval  step {step}{self.scope}: loss {row['eval_loss']:.4f}  ppl {row['eval_ppl']:.2f}  "
                         f"bpb {row['eval_bpb']:.4f}{self.target}")
        elif "loss" in row:
            console.info(self._line(step))

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
