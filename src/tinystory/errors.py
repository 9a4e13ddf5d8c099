"""Errors that reach the user as one red line on stderr (exit code 1).

Library code raises these; the CLI prints `error: <message>` and, when given, the hint.
Anything else is a bug and shows its traceback only with TINYSTORY_DEBUG=1.
"""

from __future__ import annotations


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
