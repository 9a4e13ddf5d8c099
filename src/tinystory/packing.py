"""From cleaned stories to packed token streams, for `prepare`.

- `Spool`: the cleaned stories of one split on disk (4-byte length + UTF-8 each), cut into
  blocks of ~SPOOL_BLOCK bytes, each handed to the packer as soon as it is written;
- `Packer`: encodes blocks (in worker processes, or here when the data is small) and
  appends BOS + ids + EOS of every story to `<split>.bin`, in story order. With a known
  tokenizer (Mistral) it runs while the stories are still being read;
- `Workers`: the `python -m tinystory.encoder` processes;
- `Meter`: progress with stories/s, tokens/s and MB/s (a rich bar, or plain lines).

Memory stays flat: a block is ~0.5 MB of text and at most two blocks a worker are in flight.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tinystory.console import console, info, interactive
from tinystory.data import ITEMSIZE
from tinystory.errors import TinystoryError

SPOOL_BLOCK = 1 << 19  # bytes of text per block: the unit of encoding work
ANSWER_PIPE = 1 << 20  # bytes a worker's answer pipe holds (Linux's default pipe-max-size)


class Spool:
    """Cleaned stories of one split, with the blocks written so far."""

    def __init__(self, path: Path, split: str, on_block: Callable[[Spool, int, int], None] | None = None) -> None:
        self.path, self.split, self.on_block = path, split, on_block
        self.file = open(path, "wb", buffering=SPOOL_BLOCK)  # noqa: SIM115 - closed by close(); flushed per block
        self.blocks: list[tuple[int, int]] = []  # (offset, nbytes)
        self.start = self.pos = 0
        self.stories = self.bytes = 0

    def add(self, data: bytes) -> None:
        self.file.write(len(data).to_bytes(4, "little") + data)
        self.pos += 4 + len(data)
        self.stories += 1
        self.bytes += len(data)
        if self.pos - self.start >= SPOOL_BLOCK:
            self._cut()

    def _cut(self) -> None:
        if self.pos > self.start:
            self.file.flush()  # a worker reads it next
            self.blocks.append((self.start, self.pos - self.start))
            if self.on_block is not None:
                self.on_block(self, self.start, self.pos - self.start)
        self.start = self.pos

    def close(self) -> None:
        self._cut()
        self.file.close()

    def texts(self) -> Iterator[str]:
        """Every story, in order (to train a BPE on)."""
        from tinystory.encoder import read_spool

        for offset, nbytes in self.blocks:
            yield from read_spool(self.path, offset, nbytes)


class Packer:
    """Encodes spool blocks and appends the tokens of each split to `<split>.bin`."""

    def __init__(self, folder: Path, nproc: int, meter: Meter | None = None) -> None:
        self.folder, self.nproc, self.meter = folder, nproc, meter
        self.workers: Workers | None = None
        self.local: Any = None
        self.pending: deque[tuple[int, str, int]] = deque()  # (task number, split, text bytes)
        self.submitted = 0
        self.outs = {s: open(folder / f"{s}.bin", "wb") for s in ("train", "val")}  # noqa: SIM115
        self.tokens = dict.fromkeys(self.outs, 0)

    def start(self, tokenizer_json: Path, bos: int, eos: int, dtype: str, kind: str | None,
              processes: bool) -> None:
        """Ready to encode with the tokenizer saved at `tokenizer_json`, whose
        `encoder.chunk_kind` is `kind`."""
        self.itemsize = ITEMSIZE[dtype]
        if processes and self.nproc > 1:
            self.workers = Workers(self.nproc, tokenizer_json, bos, eos, dtype, kind)
        else:
            from tinystory.encoder import ChunkEncoder

            self.local = ChunkEncoder(tokenizer_json, bos, eos, dtype, kind=kind)

    @property
    def started(self) -> bool:
        return self.workers is not None or self.local is not None

    def add(self, spool: Spool, offset: int, nbytes: int) -> None:
        """Encode one block of `spool` (now, or in a worker)."""
        if self.workers is None:
            from tinystory.encoder import read_spool

            texts = read_spool(spool.path, offset, nbytes)
            self._write(spool.split, self.local.encode_bytes(texts), len(texts), nbytes)
            return
        self.workers.submit(self.submitted, spool.path, offset, nbytes)
        self.pending.append((self.submitted, spool.split, nbytes))
        self.submitted += 1
        if len(self.pending) >= 2 * len(self.workers.procs):  # bounded: flat memory
            self._collect()

    def _collect(self) -> None:
        number, split, nbytes = self.pending.popleft()
        data, stories = self.workers.result(number)  # type: ignore[union-attr]
        self._write(split, data, stories, nbytes)

    def _write(self, split: str, data: bytes, stories: int, nbytes: int) -> None:
        self.outs[split].write(data)
        self.tokens[split] += len(data) // self.itemsize
        if self.meter is not None:
            self.meter.advance(0, tokens=len(data) // self.itemsize, encoded=stories)

    def finish(self) -> dict[str, int]:
        """Wait for every block, sync the files to disk; tokens per split. The workers are
        told to leave, and `close` waits for them (they exit meanwhile)."""
        while self.pending:
            self._collect()
        if self.workers is not None:
            self.workers.end_input()
        for out in self.outs.values():
            out.flush()
            os.fsync(out.fileno())
        return self.tokens

    def close(self) -> None:
        """Stop the workers (killing them if work is left) and close the files."""
        if self.workers is not None:
            self.workers.close(kill=bool(self.pending))
            self.workers = None
        for out in self.outs.values():
            out.close()


class Workers:
    """`python -m tinystory.encoder` processes; task i goes to process i % n, and each
    answers in order, so reading task i's answer from process i % n keeps story order.

    Plain subprocesses rather than multiprocessing: nothing re-imports the caller's
    script, a dead worker is an EOF rather than a hang, and a worker ends at EOF on its
    stdin, so a killed parent leaves none behind. Own session: Ctrl-C reaches only us.
    """

    def __init__(self, n: int, tokenizer_json: Path, bos: int, eos: int, dtype: str, kind: str | None) -> None:
        import tinystory

        pkg_root = str(Path(tinystory.__file__).resolve().parents[1])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",  # the processes are the parallelism
               "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "tinystory.encoder", str(tokenizer_json), str(bos), str(eos), dtype,
               kind or "none"]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                       start_new_session=True) for _ in range(n)]
        for proc in self.procs:
            widen_pipe(proc.stdout.fileno())  # type: ignore[union-attr]

    def submit(self, i: int, spool: Path, offset: int, nbytes: int) -> None:
        proc = self.procs[i % len(self.procs)]
        try:
            proc.stdin.write(f"{spool}\t{offset}\t{nbytes}\n".encode())  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            self._died(proc)

    def result(self, i: int) -> tuple[bytes, int]:
        proc = self.procs[i % len(self.procs)]
        head = proc.stdout.read(16)  # type: ignore[union-attr]
        if len(head) < 16:
            self._died(proc)
        size, stories = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
        data = proc.stdout.read(size)  # type: ignore[union-attr]
        if len(data) < size:
            self._died(proc)
        return data, stories

    def _died(self, proc: Any) -> None:
        code = proc.wait()
        raise TinystoryError(f"a tokenizer process died (exit code {code})",
                             "out of memory? try --num-proc 1; its error, if any, is printed above")

    def end_input(self) -> None:
        """No more tasks: each worker ends at EOF."""
        for proc in self.procs:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()  # type: ignore[union-attr]

    def close(self, kill: bool = False) -> None:
        if kill:
            for proc in self.procs:
                proc.kill()
        self.end_input()
        for proc in self.procs:
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


def widen_pipe(fd: int, size: int = ANSWER_PIPE) -> None:
    """Grow the pipe `fd` to `size` bytes where the OS allows it (Linux).

    The parent reads the answers in task order, so while it waits for one worker the
    other's finished answer (~0.26 MB of uint16 for a 0.5 MB block) sits in its pipe. In a
    64 KB pipe that worker stalls until the parent gets to it (on the 6.4 MB benchmark
    input the two workers waited 0.04-0.075 s in all on their writes); in a 1 MB pipe it
    goes on with its next block (0.002-0.013 s)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass  # the default pipe: slower, not wrong


class Meter:
    """Progress of one phase: a live rich line on a terminal, plain lines otherwise (one
    every 10 s and one at the end), with stories/s, tokens/s and MB/s."""

    def __init__(self, label: str, total: int | None = None, spinner_only: bool = False) -> None:
        self.label, self.total, self.spinner_only = label, total, spinner_only
        self.stories = self.encoded = self.tokens = self.nbytes = 0
        self.live = interactive()
        self.progress: Any = None

    def __enter__(self) -> Meter:
        self.t0 = self.last = time.perf_counter()
        if self.live:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
            if self.total:
                columns.append(BarColumn())
            columns += [TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
            self.progress = Progress(*columns, console=console(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, stats="")
        return self

    def stats(self) -> str:
        if self.spinner_only:
            return ""
        secs = max(time.perf_counter() - self.t0, 1e-9)
        parts = []
        if self.stories:
            parts.append(f"{self.stories:,} stories ({self.stories / secs:,.0f}/s)")
        if self.nbytes:
            parts.append(f"{self.nbytes / 1e6:,.1f} MB ({self.nbytes / 1e6 / secs:,.1f} MB/s)")
        if self.tokens:
            parts.append(f"{self.encoded:,} encoded, {self.tokens:,} tokens ({self.tokens / secs:,.0f}/s)")
        return ", ".join(parts)

    def advance(self, stories: int, tokens: int = 0, nbytes: int = 0, encoded: int = 0) -> None:
        self.stories += stories
        self.tokens += tokens
        self.nbytes += nbytes
        self.encoded += encoded
        now = time.perf_counter()
        if now - self.last < (0.1 if self.live else 10):
            return
        self.last = now
        if self.live:
            self.progress.update(self.task, completed=self.encoded or self.stories, stats=self.stats())
        else:
            info(f"{self.label}: {self.stats()}")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.live:
            self.progress.update(self.task, completed=self.encoded or self.stories, stats=self.stats())
            self.progress.stop()
        elif exc_type is None:
            stats = self.stats()
            info(f"{self.label}: {stats + ' ' if stats else ''}in {time.perf_counter() - self.t0:.1f} s")
