"""The ``tlm_*`` settings, one group beside each method family; composed into ``tlm_plugin.hparams.TLMArguments``."""
