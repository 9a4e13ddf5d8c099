"""Deciding how W&B runs before `wandb.init`: online, offline or off, never a hang.

`wandb.init` in online mode without a network (or with a bad key) waits ~100 s before it
fails, so we decide first: online only when logged in and api.wandb.ai answers within
seconds; otherwise an offline run (synced later with `wandb sync`). Keys are never printed.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import socket
from urllib.parse import urlparse

from tinystory.errors import TinystoryError

PROBE_TIMEOUT_S = 3.0


def _host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def logged_in() -> bool:
    """A W&B key in WANDB_API_KEY or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def decide(setting: str) -> tuple[str | None, str]:
    """(WANDB_MODE to use or None for no W&B, why) for train.wandb = auto | on | off."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if setting == "off" or env == "disabled":
        return None, "off"
    if importlib.util.find_spec("wandb") is None:  # a core dependency, but a user may have removed it
        if setting == "auto":
            return None, "wandb is not installed"
        raise TinystoryError("train.wandb = on needs the wandb package, which is not installed", "pip install wandb")
    if env in ("offline", "dryrun"):
        return "offline", "WANDB_MODE=offline"
    if not logged_in():
        if setting == "auto":
            return None, "not logged in"
        return "offline", "not logged in (`wandb login` to upload runs), so an offline run"
    if not reachable():
        return "offline", f"{_host()} cannot be reached, so an offline run"
    return "online", "logged in"
