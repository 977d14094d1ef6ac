"""The one error type of bad input: a setting, recipe option or file a run cannot work with (names it)."""


class TLMConfigError(ValueError):
    """A ``tlm_*`` setting (or an option that cannot work with ``stage: tlm``) is invalid."""
