"""The files AdaptEval reads and writes itself (data folders, ``<out>/cells/<dataset>/<method>/cell.json``); the files
a stage-tlm run leaves in its output_dir are named, read and written through ``tlm_plugin.train.outputs``."""

import json
from pathlib import Path
from typing import Any

from adapteval.errors import DataUnavailableError
from tlm_plugin.train.outputs import atomic_write


CELLS_DIR = "cells"  # <out>/cells/<dataset>/<method>/
CELL_FILE = "cell.json"  # a finished cell's record, written last


def read_json(path: Path) -> Any:
    """The JSON document in ``path`` (``DataUnavailableError`` if it is missing or not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataUnavailableError(f"{path} does not exist") from None
    except ValueError as err:
        raise DataUnavailableError(f"{path} is not valid JSON: {err}") from err


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (UTF-8, not escaped); the file appears whole or not at all."""
    atomic_write(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
