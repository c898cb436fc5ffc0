"""Exceptions that carry a message meant for the user.

Every error caused by the user's input (a file, a clinical value, a bundle, a flag) is a
:class:`StrokePredictorError`. Command-line tools catch it, print its message on one line and
exit with a non-zero status, without a traceback. Anything else is a bug.
"""

from __future__ import annotations


class StrokePredictorError(Exception):
    """Base class of all user-facing errors. ``str(error)`` is a complete sentence."""

    exit_code = 2


class InputImageError(StrokePredictorError, ValueError):
    """An input image cannot be used (unreadable, wrong dimension, non-finite, no overlap...)."""


class ClinicalValueError(StrokePredictorError, ValueError):
    """A clinical value is malformed, out of range or unknown."""


class BundleError(StrokePredictorError):
    """A model bundle is missing, malformed or fails its checksum."""


class OutputExistsError(StrokePredictorError):
    """An output exists already and overwriting was not asked for."""
