"""Where tinystory keeps things, from platformdirs, each overridable by environment.

- config: `TINYSTORY_CONFIG` (a file) else `<user config dir>/config.toml`
- cache (prepared data): `TINYSTORY_CACHE_DIR` else the user cache dir
- runs (trained models): `TINYSTORY_RUNS_DIR` else `<user data dir>/runs`
"""

from __future__ import annotations

import os
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
