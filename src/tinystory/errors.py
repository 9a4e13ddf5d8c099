"""Errors that reach the user as one red line on stderr (exit code 1).

Library code raises these; the CLI prints `error: <message>` and, when given, the hint.
Anything else is a bug and shows its traceback only with TINYSTORY_DEBUG=1.
"""

from __future__ import annotations

import errno
import re


class TinystoryError(Exception):
    """A problem the user can fix; `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class SettingsError(TinystoryError):
    """An unknown key, a wrong type or a bad value in the settings layers."""


class DataError(TinystoryError):
    """Bad or missing input text, or prepared data that cannot be used."""


class RunError(TinystoryError):
    """A run dir (or hub id) that holds no usable model."""


class OfflineError(TinystoryError):
    """The Hugging Face Hub (or another host) cannot be reached."""


class TrainingError(TinystoryError):
    """Training cannot start or cannot go on (divergence, impossible precision, ...)."""


class QuantizationError(TinystoryError):
    """A quantization method that cannot run here."""


class HubError(TinystoryError):
    """Publishing to the Hub failed (token, permission, repo id, network)."""


# A full disk, as the OS (ENOSPC, EDQUOT; EFBIG past a file-size limit) and the libraries
# that write for us (safetensors, torch.save) word it.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_WORDS = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28", "os error 27",
                   "StorageFull", "PytorchStreamWriter failed writing file")
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # Python's buffered writer, when the disk filled


def disk_full(error: BaseException) -> str | None:
    """One line for an error that a full disk caused (anywhere in its chain), else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            where = f" while writing {current.filename}" if current.filename else ""
            return f"the disk is full{where} ({current.strerror})"
        if any(word in str(current) for word in DISK_FULL_WORDS) or SHORT_WRITE.search(str(current)):
            return "the disk is full (a write failed: " + str(current).strip().splitlines()[0][:160] + ")"
        current = current.__cause__ or current.__context__
    return None
