"""Typed errors the engine raises for bad inputs. Each message names the problem.

The service turns any `InputError` into a 4xx problem; anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def close_names(word: str, known: Sequence[str], n: int = 1, cutoff: float = 0.75) -> list[str]:
    """The names in ``known`` close to a misspelled ``word`` (best first), for a "did you mean"."""
    return difflib.get_close_matches(word, list(known), n=n, cutoff=cutoff)


def did_you_mean(word: str, known: Sequence[str], n: int = 1, cutoff: float = 0.75) -> str:
    """``"; did you mean 'label'?"`` when names in ``known`` are close to ``word``, else ``""``."""
    close = close_names(word, known, n, cutoff)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


class CompressionError(Exception):
    """Base of every error the engine raises on purpose."""


class InputError(CompressionError):
    """The user's file, data or spec is wrong. `code` is a stable machine-readable tag."""

    code = "invalid_input"


class SpecError(InputError):
    code = "invalid_spec"


# --- model files -----------------------------------------------------------------------

class ModelFileError(InputError):
    code = "invalid_model"


class UnsupportedFormatError(ModelFileError):
    code = "unsupported_format"


class TruncatedFileError(ModelFileError):
    code = "truncated_file"


class MissingTensorError(ModelFileError):
    code = "missing_tensor"


class UnexpectedTensorError(ModelFileError):
    code = "unexpected_tensor"


class ShapeMismatchError(ModelFileError):
    code = "shape_mismatch"


class NonFiniteWeightsError(ModelFileError):
    code = "non_finite_weights"


class UnsupportedOpError(ModelFileError):
    code = "unsupported_op"


class UnsafeFileError(ModelFileError):
    """A file that would need code execution (pickle, TorchScript) or escapes its folder."""

    code = "unsafe_file"


# --- data ------------------------------------------------------------------------------

class DatasetError(InputError):
    code = "invalid_dataset"

    def __init__(self, message: str, *, row: int | None = None) -> None:
        self.row = row
        super().__init__(f"row {row}: {message}" if row is not None else message)


class TooCostlyError(InputError):
    """What an upload or job would need, estimated before running it, is past a limit (its memory,
    usually): refused up front instead of being killed for it."""

    code = "resource_limit"

    def __init__(self, message: str, *, limit: str = "memory") -> None:
        self.limit = limit
        super().__init__(message)


# --- control flow ----------------------------------------------------------------------

class Cancelled(CompressionError):
    """Raised inside the engine when the cancel check answers True."""


class BudgetExceeded(CompressionError):
    """Internal: the wall-clock budget ran out (the trainer stops cleanly, not an error)."""
