"""Reaching the Hugging Face Hub: fail within seconds, in one line, when it is not there.

`huggingface_hub` retries and waits on a dead network; a learner offline should instead
be told at once how to work from local files. `HF_HUB_OFFLINE=1` is honoured.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from tinystory.errors import OfflineError

T = TypeVar("T")

PROBE_TIMEOUT_S = 3.0


def endpoint() -> str:
    """The Hub endpoint (HF_ENDPOINT, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the Hub endpoint be opened within `timeout` seconds?"""
    parsed = urlparse(url or endpoint())
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, local_hint: str) -> None:
    """Raise OfflineError (one line, with `local_hint`) unless the Hub can be reached."""
    if hub_offline():
        raise OfflineError(f"cannot fetch {what}: HF_HUB_OFFLINE is set", local_hint)
    if not reachable():
        raise OfflineError(f"cannot reach the Hugging Face Hub ({endpoint()}) to fetch {what}", local_hint)


def from_hub(fetch: Callable[[], T], what: str, local_hint: str = "use a local path instead") -> T:
    """Run `fetch()` (a hub download) after a quick reachability check, mapping failures."""
    require_hub(what, local_hint)
    try:
        return fetch()
    except OSError as e:  # huggingface_hub's connection errors subclass OSError
        raise OfflineError(f"could not fetch {what} from the Hub: {e.__class__.__name__}", local_hint) from None
