"""Where llamafactory-tlm keeps what it prepares once: the converted demo model, the demo data, pool embeddings."""

import os
from pathlib import Path


CACHE_ENV = "LLAMAFACTORY_TLM_CACHE"


def cache_dir() -> Path:
    """``$LLAMAFACTORY_TLM_CACHE`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/llamafactory-tlm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "llamafactory-tlm"
