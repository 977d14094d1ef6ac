"""llamafactory-tlm: test-time learning (TLM, SIFT) as a ``stage: tlm`` plugin for LLaMA-Factory."""

__version__ = "0.1.0"


def install() -> None:
    """Enable ``stage: tlm`` in this process (for Python-API users, ``python -S`` or PYTHONPATH installs).

    Patches ``llamafactory.train.tuner`` now if it is already imported, and in any case when it is imported.
    The automatic hook installed by the wheel does the same at interpreter start-up.
    """
    import sys

    from tlm_plugin import _bootstrap

    _bootstrap.register()
    tuner = sys.modules.get(_bootstrap.TARGET)
    if tuner is not None:
        from tlm_plugin.patch import apply

        apply(tuner)


__all__ = ["install", "__version__"]
