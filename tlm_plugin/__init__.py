"""llamafactory-tlm: test-time learning (TLM, SIFT) as a ``stage: tlm`` plugin for LLaMA-Factory."""

__version__ = "0.1.0"

from tlm_plugin import _bootstrap  # noqa: E402  (cheap: the start-up hook, no heavy import)


def install() -> None:
    """Enable ``stage: tlm`` in this process (for Python-API users, ``python -S`` or PYTHONPATH installs).

    Patches ``llamafactory.train.tuner`` now if it is already imported, and in any case when it is imported.
    The automatic hook installed by the wheel does the same at interpreter start-up.
    """
    _bootstrap.install()


__all__ = ["install", "__version__"]
