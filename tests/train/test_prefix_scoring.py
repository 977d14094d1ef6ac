"""Scoring with a shared prefix (tlm_plugin.train.prefix) gives the scores of full forwards, and falls back safely."""

import json

import pytest
import torch
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, write_dataset

from tlm_plugin.train.prefix import SharedPrefix, _plain_cache, common_prefix_length


INSTRUCTION = "Read the question below carefully and answer it in one short sentence. Question: "


@pytest.mark.parametrize(
    ("sequences", "expected"),
    [
        ([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]], 3),
        ([[1, 2, 3], [1, 2, 3], [1, 2, 3, 4]], 2),  # every sequence keeps at least one token of its own
        ([[1, 2], [3, 2]], 0),
        ([[7, 7, 7, 7]], 3),
        ([], 0),
    ],
)
def test_common_prefix_length(sequences, expected):
    assert common_prefix_length(sequences) == expected


@pytest.fixture()
def prefixed_data(tmp_path):
    rows = [{"instruction": INSTRUCTION + q, "input": "", "output": a} for q, a in QUESTIONS]
    return write_dataset(tmp_path / "data", rows)


def _run(tiny_model, data, out, **overrides):
    from llamafactory.train.tuner import run_exp

    run_exp(base_recipe(tiny_model, data, out, per_device_eval_batch_size=4, tlm_score_batch_size=5, **overrides))
    return read_jsonl(out / "tlm_scores.jsonl"), json.loads((out / "tlm_summary.json").read_text())


def test_shared_prefix_scores_equal_full_forward_scores(tiny_model, prefixed_data, tmp_path):
    shared_rows, shared = _run(tiny_model, prefixed_data, tmp_path / "shared", tlm_loss_tokens="user")
    full_rows, full = _run(
        tiny_model, prefixed_data, tmp_path / "full", tlm_loss_tokens="user", tlm_score_prefix_cache=False
    )
    assert shared["score_shared_prefix_tokens"] > 10  # template opening + the fixed instruction
    assert full["score_shared_prefix_tokens"] == 0
    for a, b in zip(shared_rows, full_rows, strict=True):
        for key in ("log_ppl", "log_ppl_after", "log_ppl_user", "log_ppl_user_after"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["selected"] == b["selected"] and a["weight"] == pytest.approx(b["weight"], rel=1e-5)


def test_shared_prefix_embeddings_equal_full_forward_embeddings(tiny_model, prefixed_data, tmp_path):
    """SIFT's model embeddings: the last prompt token's state, read at the right place of the shorter outputs."""
    kw = {"tlm_selector": "nearest", "tlm_sift_budget": 2, "do_train": False}
    _run(tiny_model, prefixed_data, tmp_path / "shared", **kw)
    _run(tiny_model, prefixed_data, tmp_path / "full", tlm_score_prefix_cache=False, **kw)
    shared = torch.load(tmp_path / "shared" / "tlm_embeddings.pt")
    full = torch.load(tmp_path / "full" / "tlm_embeddings.pt")
    assert shared["prompts"].shape == (len(QUESTIONS), full["prompts"].shape[1])
    torch.testing.assert_close(shared["prompts"], full["prompts"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared["pool"], full["pool"], atol=1e-5, rtol=1e-4)


def test_disagreeing_prefix_scores_fall_back_to_full_forwards(tiny_model, prefixed_data, tmp_path, monkeypatch):
    full_rows, _ = _run(tiny_model, prefixed_data, tmp_path / "full", tlm_score_prefix_cache=False, do_train=False)
    original = SharedPrefix.forward

    def wrong(self, *args, **kwargs):  # e.g. a model whose cached positions are off
        nll, out = original(self, *args, **kwargs)
        return nll + 0.5, out

    monkeypatch.setattr(SharedPrefix, "forward", wrong)
    rows, summary = _run(tiny_model, prefixed_data, tmp_path / "broken", do_train=False)
    assert summary["score_shared_prefix_tokens"] == 0
    assert [r["log_ppl"] for r in rows] == pytest.approx([r["log_ppl"] for r in full_rows], abs=1e-6)


def test_only_plain_dynamic_caches_are_shared():
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), layer_idx=0)
    assert _plain_cache(cache)
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=8))
    assert not _plain_cache(cache)
    assert not _plain_cache(None)
