"""One builder module per AdaptEval dataset (see ``_base`` for what a builder provides); the registry is
``adapteval.registry``."""
