"""``stage: tlm``: the workflow, trainer and loss (mirrors LLaMA-Factory's ``train/<stage>/`` folders)."""

import logging
import sys

from llamafactory.extras import logging as llamafactory_logging


def _plugin_logging() -> None:
    """The plugin's log records (``tlm_plugin.*``) are printed in LLaMA-Factory's format at its verbosity
    (``LLAMAFACTORY_VERBOSITY``), on stderr; without this only warnings would reach the console, unformatted."""
    ours = logging.getLogger("tlm_plugin")
    if any(getattr(handler, "tlm_plugin", False) for handler in ours.handlers):
        return
    library = llamafactory_logging.get_logger()  # LLaMA-Factory's root logger, configured once
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            fmt="[%(levelname)s|%(asctime)s] %(name)s:%(lineno)s >> %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
        )
    )
    handler.tlm_plugin = True
    ours.addHandler(handler)
    ours.setLevel(library.level)


_plugin_logging()
