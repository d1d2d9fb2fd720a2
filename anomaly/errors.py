"""Errors raised by the ML core.

Every error the core raises derives from :class:`AnomalyError`, so a caller (the CLI, the
stream processor, a notebook) can catch the package's failures by name instead of by message.
Errors an operator must act on say what to do in their docstring.
"""

from __future__ import annotations

__all__ = [
    "AnomalyError",
    "BundleError",
    "DataError",
    "InvalidReadingError",
    "StateFormatError",
    "StateModelMismatchError",
    "TrainingError",
]


class AnomalyError(Exception):
    """Root of every error raised by :mod:`anomaly`."""


class DataError(AnomalyError, ValueError):
    """A table (CSV, Parquet, DataFrame) cannot be used: missing columns, non-numeric values, empty."""


class InvalidReadingError(AnomalyError, ValueError):
    """A reading handed to the detector breaks the input contract (shape, infinite value, bad timestamp)."""


class TrainingError(AnomalyError, ValueError):
    """Training cannot proceed, e.g. too little normal data for the requested window and split."""


class BundleError(AnomalyError):
    """A model bundle is missing, corrupt or does not match its metadata.

    The operator should point the service at a bundle written by ``sensor-anomaly train`` (or
    ``anomaly.ModelBundle.save``) of a supported format version; the message names the file and
    the field that failed.
    """


class StateFormatError(AnomalyError, ValueError):
    """A device-state snapshot cannot be decoded (garbage, truncated, unknown format version)."""


class StateModelMismatchError(StateFormatError):
    """A snapshot was written under another model version (or shape) than the store's.

    Hidden state of one model means nothing to another; the caller discards the snapshot and the
    device warms up again.
    """
