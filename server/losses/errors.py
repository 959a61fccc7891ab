"""Typed engine errors.

The engine knows nothing of gRPC; the service maps each class to one status code in one place
(``UnknownLossError`` -> NOT_FOUND, the others -> INVALID_ARGUMENT). Every message names the field,
what was expected and what arrived.
"""

from __future__ import annotations


class LossError(ValueError):
    """Base class of every error the loss engine raises on purpose.

    ``field`` names the offending config key or forward input (``"gamma"``, ``"target"``...), so a
    remote caller can point at it without parsing the message.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownLossError(LossError):
    """The config's ``type`` names no registered loss."""


class LossConfigError(LossError):
    """The config dict is malformed: unknown key, wrong type, value out of range."""


class LossInputError(LossError):
    """A forward input is unusable: shape, dtype, value range or a forbidden combination."""


class DuplicateLossError(LossError):
    """``register_module`` was asked to overwrite a registered name without ``force=True``."""
