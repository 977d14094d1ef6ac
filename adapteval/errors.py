"""Errors raised by AdaptEval: problems the user can fix (names, missing data, missing packages, a cache made with
other settings), a cell that could not be produced, and a learning server that did not start."""


class UnknownNameError(ValueError):
    """A dataset, bench or metric name that is not registered; the message lists the valid names."""


class DataUnavailableError(RuntimeError):
    """A dataset cannot be built here: no hub access, no fixed file, or an unreadable source."""


class MissingPackageError(DataUnavailableError):
    """An offline pack needs a PyPI package that is not installed; the message names the pip command."""


class RunnerError(RuntimeError):
    """A cell could not be produced (its run failed, or its outputs do not match its inputs)."""


class CacheConflictError(ValueError):
    """The output folder holds a cell made with another configuration."""


class ServerError(RuntimeError):
    """The learning server started for ``adapteval stream`` did not come up (its log says why)."""
