"""Where tinystory keeps things (from platformdirs, each overridable by environment), and
how it writes a file whole or not at all (`atomic_path`, `write_atomic`).

- config: `TINYSTORY_CONFIG` (a file) else `<user config dir>/config.toml`
- cache (prepared data): `TINYSTORY_CACHE_DIR` else the user cache dir
- runs (trained models): `TINYSTORY_RUNS_DIR` else `<user data dir>/runs`
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

APP = "tinystory"


def config_file() -> Path:
    """The TOML config file read when `--config` is not given (it may not exist)."""
    env = os.environ.get("TINYSTORY_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_path

    return user_config_path(APP) / "config.toml"


def cache_dir() -> Path:
    """Root of prepared datasets (one folder per fingerprint)."""
    env = os.environ.get("TINYSTORY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path(APP)


def runs_dir() -> Path:
    """Root of run dirs made by `tinystory train` when `--out` is not given."""
    env = os.environ.get("TINYSTORY_RUNS_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_path

    return user_data_path(APP) / "runs"


def prepared_dir() -> Path:
    """Where `prepare` puts datasets named by fingerprint."""
    return cache_dir() / "prepared"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp file beside `path` for the caller to write by name; renamed over `path` when
    the block ends well, removed when it fails (a full disk, Ctrl-C): `path` then holds the
    old content or the new, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the result private
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` whole or not at all (`atomic_path`), flushed
    to the disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temp folder beside `path` for the caller to fill; renamed to `path` (replacing an
    older one) when the block ends well, removed when it fails: `path` never holds part of
    a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the result private
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone already when it was renamed)
