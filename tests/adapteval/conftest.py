"""Shared fixtures of the AdaptEval tests. No test here reaches the network: the hub is switched off, hub
builders run against in-memory datasets in the upstream column layout (``fake_hub``)."""

import os


# Before anything imports huggingface_hub / datasets, which read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_FIXED_DIR = REPO_ROOT.parent / "shared" / "data" / "adapteval"


@pytest.fixture
def fixed_dir() -> Path:
    """The released AdaptEval files (three of the ten), beside the repository on the development machine."""
    path = Path(os.environ.get("ADAPTEVAL_FIXED_DIR") or SHARED_FIXED_DIR)
    if not (path / "gsm8k_random_5k.json").is_file():
        pytest.skip("../shared/data/adapteval not present (only on the development machine)")
    return path


class FakeHub:
    """Stands in for ``datasets.load_dataset``: serves small ``datasets.Dataset`` objects keyed by
    (path, config, split) and records every call."""

    def __init__(self, tables: dict[tuple[str, str | None, str], list[dict]]):
        self.tables = tables
        self.calls: list[dict] = []

    def __call__(self, path, name=None, split=None, **kwargs):
        import datasets

        self.calls.append({"path": path, "name": name, "split": split, **kwargs})
        key = (path, name, split)
        if key not in self.tables:
            raise ConnectionError(f"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)")
        return datasets.Dataset.from_list(self.tables[key])

    def paths(self) -> list[str]:
        return [call["path"] for call in self.calls]


@pytest.fixture
def fake_hub(monkeypatch):
    """Install a ``FakeHub`` serving the given tables in place of ``datasets.load_dataset``; returns it."""
    import datasets

    def install(tables: dict[tuple[str, str | None, str], list[dict]]) -> FakeHub:
        hub = FakeHub(tables)
        monkeypatch.setattr(datasets, "load_dataset", hub)
        return hub

    return install


@pytest.fixture
def hub_offline(monkeypatch):
    """Force offline mode even if huggingface_hub / datasets were imported before this conftest set the env."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
