"""lorakit's exceptions.

Every error lorakit raises on bad input is a :class:`LorakitError`. Messages name
the value that was wrong and what would be right, so that a person can act on
them without reading a traceback.
"""

from __future__ import annotations

__all__ = [
    "LorakitError",
    "ConfigError",
    "TargetNotFoundError",
    "UnsupportedModuleError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "ModelMismatchError",
    "ModelLoadError",
    "DataError",
    "TrainingError",
    "TrainingInterrupted",
    "ForwardConflictError",
]


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid (names the field, the value, what is allowed)."""


class TargetNotFoundError(LorakitError, ValueError):
    """A `target_modules` entry matched no module in the model."""


class UnsupportedModuleError(LorakitError, TypeError):
    """A matched module is of a kind lorakit cannot wrap."""


class AdapterFormatError(LorakitError, ValueError):
    """Adapter files on disk are missing, corrupt, or inconsistent."""


class AdapterNotFoundError(LorakitError, KeyError):
    """An adapter name is not present on the model."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class ModelMismatchError(LorakitError, ValueError):
    """An adapter does not fit the model (missing module, wrong shape)."""


class ModelLoadError(LorakitError, RuntimeError):
    """A base model could not be found or loaded."""


class DataError(LorakitError, ValueError):
    """A training or evaluation data file is malformed."""


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (e.g. a NaN/Inf loss)."""


class TrainingInterrupted(TrainingError):
    """Training was stopped with Ctrl-C; the last completed step is checkpointed.

    Attributes:
        step: The last completed step.
        checkpoint: The checkpoint to resume from (a ``pathlib.Path``), or None if there is none.
    """

    def __init__(self, message: str, step: int, checkpoint=None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class ForwardConflictError(LorakitError, RuntimeError):
    """Two parts of lorakit (or lorakit and user code) tried to replace one module's ``forward``."""
