"""Shared fixtures (helpers live in tlm_testing.py so that test modules can import them by a unique name)."""

from pathlib import Path

import pytest
from tlm_testing import CANARY, QUESTIONS, _build_tiny_model, write_dataset


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_model(path)
    return path


@pytest.fixture()
def tiny_data(tmp_path) -> Path:
    """Twelve prompts whose reference answers all carry a canary string that must never be trained on."""
    rows = [{"instruction": q, "input": "", "output": f"{a} {CANARY}"} for q, a in QUESTIONS]
    return write_dataset(tmp_path / "data", rows)
