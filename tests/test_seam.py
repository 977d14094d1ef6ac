"""The LLaMA-Factory internals stage tlm reaches, all through tlm_plugin.seam: present, and named when they move."""

import importlib

import pytest

from tlm_plugin import seam


def test_every_internal_is_there_with_the_parameters_stage_tlm_passes():
    assert seam.changes() == [], "\n".join(seam.changes())


def test_a_moved_internal_is_named_with_what_it_was_for(monkeypatch):
    loader = importlib.import_module("llamafactory.data.loader")
    monkeypatch.delattr(loader, "_get_merged_dataset")
    message = seam.check("llamafactory.data.loader._get_merged_dataset")
    assert "_get_merged_dataset" in message and "user-token masks" in message
    with pytest.raises(seam.SeamError, match="_get_merged_dataset"):
        seam.merged_dataset(["x"], None, None, None)


def test_a_changed_signature_is_named(monkeypatch):
    template = importlib.import_module("llamafactory.data.template")
    monkeypatch.setattr(template.Template, "_convert_elements_to_ids", lambda self, tokenizer, parts: [])
    message = seam.check("llamafactory.data.template.Template._convert_elements_to_ids")
    assert "no longer takes elements" in message
