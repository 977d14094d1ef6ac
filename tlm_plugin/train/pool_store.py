"""Pools of millions for the pool selectors: sentence-encoder embeddings streamed to memory-mapped shards on disk, and
a faiss index built once beside them.

A store is one folder per (pool texts, encoder, precision, shard size), ``<cache>/pools/<key>/`` or
``tlm_pool_store``:

    manifest.json       what the store holds: encoder, dtype, dim, rows, its shards and its index, how both were built
    shard-00000.npy     rows [0, shard_rows) as a (rows, dim) float16 / float32 array, read with np.load(mmap_mode="r")
    shard-00000.json    the shard's record, written after the shard: its rows and the sha256 of its texts
    index.faiss         an inner-product index over every row: exact (flat) up to a size, IVF above it

Embedding streams: one shard's texts and vectors are in memory at a time, so resident memory is bounded by the shard
size, not the pool size. A shard is written under a temporary name and renamed, then its record, so a killed run
resumes at the first shard without a record. With several ranks, rank r embeds shards r, r + world, ...; a rank that
cannot see a shard afterwards (nodes without a shared file system) embeds it itself, and builds the index itself.

Selection (:class:`PoolStore`) pre-selects candidates through the index (largest |cosine|, as SIFT's pre-selection
does) and reads only their vectors from the shards; the exact SIFT greedy then runs over those candidates.
"""

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from llamafactory.extras.logging import get_logger

from tlm_plugin.cache import cache_dir
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train.backend import all_gather_objects, rank_and_world, wait_for_all
from tlm_plugin.train.outputs import atomic_replace, atomic_write


logger = get_logger(__name__)

FORMAT = "llamafactory-tlm/pool-store/1"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
FLAT_MAX_ROWS = 262_144  # tlm_pool_index auto: an exact flat index up to this many rows, IVF above
IVF_TRAIN_PER_LIST = 40  # training points per IVF list (faiss warns below 39)
DTYPES = {"float16": np.float16, "float32": np.float32}


def ivf_lists(rows: int) -> int:
    """IVF lists for ``rows`` vectors: the power of two nearest sqrt(rows), at least 1, at most rows // 40."""
    lists = 2 ** round(math.log2(max(math.sqrt(rows), 1)))
    return int(max(1, min(lists, rows // IVF_TRAIN_PER_LIST)))


def _faiss():
    try:
        import faiss  # noqa: PLC0415  (optional: only a pool store needs it)
    except ImportError:
        raise TLMConfigError(
            "A tlm_pool_dataset with a sentence-encoder tlm_sift_embedder keeps its embeddings in a faiss index: "
            "pip install faiss-cpu (or faiss-gpu), or the plugin's `pool` extra."
        ) from None
    return faiss


class PoolStore:
    """A built store: ``len``, ``dim``, :meth:`vectors` (rows from the shards) and :meth:`candidates` (the index)."""

    def __init__(self, root: str | os.PathLike, nprobe: int | None = None) -> None:
        self.root = Path(root)
        self.manifest = json.loads((self.root / MANIFEST).read_text())
        info = self.manifest["index"]
        # IVF lists searched per query: this run's tlm_pool_nprobe (a search setting, not part of the store's key)
        self.nprobe = None if info["kind"] != "ivf" else int(min(nprobe or info["nprobe"], info["lists"]))
        self.rows, self.dim = int(self.manifest["rows"]), int(self.manifest["dim"])
        self.shard_rows = int(self.manifest["shard_rows"])
        self._shards = [None] * len(self.manifest["shards"])
        self._index = None

    def __len__(self) -> int:
        return self.rows

    def shard(self, number: int) -> np.ndarray:
        if self._shards[number] is None:
            self._shards[number] = np.load(self.root / self.manifest["shards"][number]["file"], mmap_mode="r")
        return self._shards[number]

    def vectors(self, rows) -> np.ndarray:
        """The stored vectors of ``rows`` (any order, repeats allowed) as float32, read shard by shard."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"pool rows must lie in [0, {self.rows}); got {rows.min()}..{rows.max()}")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_of = sorted_rows // self.shard_rows
        for number in np.unique(shard_of):
            at = order[shard_of == number]
            out[at] = self.shard(int(number))[rows[at] - number * self.shard_rows]
        return out

    @property
    def index(self):
        if self._index is None:
            faiss = _faiss()
            # memory-mapped: the index's pages are the page cache's, shared by the ranks of a node, not each rank's
            self._index = faiss.read_index(str(self.root / INDEX_FILE), getattr(faiss, "IO_FLAG_MMAP", 0))
            if self.nprobe is not None:
                self._index.nprobe = self.nprobe
        return self._index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's top ``k`` rows by inner product for each (unit) query: scores (m, k), rows (m, k); -1 pads."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, int(min(k, self.rows)))

    def candidates(self, target: np.ndarray, k: int, absolute: bool = True) -> np.ndarray:
        """The ``k`` rows with the largest max over targets of |cos| (``absolute``) or cos, ascending row order.

        Searching +x* and -x* finds the rows with the largest |cos|: a row in the overall top k is in the top k of
        the query (and sign) that attains its maximum, so with a flat index the union of the lists is exact.
        """
        target = np.asarray(target, dtype=np.float32).reshape(-1, self.dim)
        target = target / np.linalg.norm(target, axis=1, keepdims=True)
        queries = np.concatenate([target, -target]) if absolute else target
        scores, rows = self.search(queries, k)
        scores, rows = scores.reshape(-1), rows.reshape(-1)
        keep = rows >= 0
        scores, rows = scores[keep], rows[keep]
        order = np.lexsort((rows, -scores))  # best score first, then the lower row
        rows = rows[order]
        _, first = np.unique(rows, return_index=True)
        best = rows[np.sort(first)][:k]
        return np.sort(best)

    def describe(self) -> dict[str, Any]:
        """The manifest's summary for the run's records: where, how many rows, which index."""
        m = self.manifest
        index = {**m["index"], "nprobe": self.nprobe}
        return {"store": str(self.root), "rows": self.rows, "dim": self.dim, "dtype": m["dtype"], "index": index}


def build_store(
    texts_of: Callable[[int, int], list[str]],
    rows: int,
    embed: Callable[[list[str]], np.ndarray],
    encoder_key: str,
    *,
    root: str | os.PathLike | None = None,
    shard_rows: int = 65_536,
    dtype: str = "float16",
    index: str = "auto",
    nprobe: int = 128,
) -> PoolStore:
    """Embed a pool of ``rows`` texts into a store (or reuse the one already built) and return it.

    Args:
        texts_of: ``texts_of(start, stop)`` -> the texts of rows [start, stop) (read a shard at a time).
        embed: texts -> (n, dim) unit-normalised float32 vectors (the sentence encoder; loaded by the caller only
            when called, so a built store needs no encoder).
        encoder_key: what identifies the encoder and its precision (part of the store's key).
        root: the store folder (``tlm_pool_store``); None: ``<cache>/pools/<key>``.
        shard_rows, dtype, index, nprobe: ``tlm_pool_shard_rows``, ``tlm_pool_dtype``, ``tlm_pool_index``,
            ``tlm_pool_nprobe``.
    """
    if dtype not in DTYPES:
        raise TLMConfigError(f"tlm_pool_dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    shards = [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]
    digests = [_digest(texts_of(a, b)) for a, b in shards]  # one streamed pass over the texts
    key = hashlib.sha256(json.dumps([FORMAT, encoder_key, dtype, shard_rows, rows, digests]).encode()).hexdigest()[:32]
    root = Path(root) if root is not None else cache_dir() / "pools" / key
    built = False
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("key") != key:
            raise TLMConfigError(
                f"tlm_pool_store {root} holds another pool or encoder (its manifest's key {manifest.get('key')} is "
                f"not {key}): point tlm_pool_store at an empty folder, or delete this one."
            )
        built = (root / INDEX_FILE).is_file()
    if all(all_gather_objects(built)):  # every rank sees the built store (the decision is collective)
        return PoolStore(root, nprobe)
    root.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    start_time = time.perf_counter()
    mine = [n for n in range(len(shards)) if n % world == rank]
    _embed_shards(root, key, shards, digests, mine, texts_of, embed, dtype)
    wait_for_all()
    missing = [n for n in range(len(shards)) if not _shard_done(root, key, n, digests[n])]
    if missing:  # another rank's shards this rank cannot see (no shared file system)
        _embed_shards(root, key, shards, digests, missing, texts_of, embed, dtype)
    embed_s = time.perf_counter() - start_time
    if rank == 0 and not built:
        _write_index(root, key, shards, digests, dtype, index, nprobe, embed_s)
    wait_for_all()
    if not (root / INDEX_FILE).is_file() or not (root / MANIFEST).is_file():  # not shared with rank 0
        _write_index(root, key, shards, digests, dtype, index, nprobe, embed_s)
    return PoolStore(root, nprobe)


def _digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def _shard_done(root: Path, key: str, number: int, digest: str) -> bool:
    record = root / f"{_shard_name(number)}.json"
    if not record.is_file() or not (root / f"{_shard_name(number)}.npy").is_file():
        return False
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    return saved.get("key") == key and saved.get("digest") == digest


def _embed_shards(root, key, shards, digests, numbers, texts_of, embed, dtype) -> None:
    todo = [n for n in numbers if not _shard_done(root, key, n, digests[n])]
    if len(todo) < len(numbers):
        logger.info(f"Pool store {root}: {len(numbers) - len(todo)} of {len(numbers)} shards already embedded.")
    for count, number in enumerate(todo, 1):
        start, stop = shards[number]
        began = time.perf_counter()
        vectors = np.asarray(embed(texts_of(start, stop)), dtype=np.float32)
        if vectors.shape[0] != stop - start or vectors.ndim != 2:
            raise RuntimeError(f"the encoder returned {vectors.shape} for {stop - start} texts (shard {number})")
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):
            raise TLMConfigError(
                f"Non-finite pool embeddings at rows {(bad[:10] + start).tolist()}: check the encoder."
            )
        name = _shard_name(number)

        def write(tmp: str, vectors=vectors) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, vectors.astype(DTYPES[dtype]))

        atomic_replace(root / f"{name}.npy", write)
        record = {"key": key, "start": start, "rows": stop - start, "digest": digests[number]}
        atomic_write(root / f"{name}.json", json.dumps(record))
        seconds = time.perf_counter() - began
        logger.info(
            f"Pool store: shard {number + 1}/{len(shards)} ({stop - start} rows, {(stop - start) / seconds:.0f} "
            f"rows/s; {count}/{len(todo)} of this rank's)"
        )


def _write_index(root, key, shards, digests, dtype, kind, nprobe, embed_s) -> None:
    faiss = _faiss()
    arrays = [np.load(root / f"{_shard_name(n)}.npy", mmap_mode="r") for n in range(len(shards))]
    rows, dim = shards[-1][1], int(arrays[0].shape[1])
    chosen = ("flat" if rows <= FLAT_MAX_ROWS else "ivf") if kind == "auto" else kind
    began = time.perf_counter()
    info: dict[str, Any] = {"kind": chosen, "metric": "inner_product", "requested": kind}
    if chosen == "flat":
        index = faiss.IndexFlatIP(dim)
        info["nprobe"] = None
    elif chosen == "ivf":
        lists = ivf_lists(rows)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).choice(rows, min(rows, IVF_TRAIN_PER_LIST * lists), replace=False))
        store_rows = shards[0][1] - shards[0][0]
        train = np.concatenate(
            [arrays[n][sample[sample // store_rows == n] - n * store_rows] for n in range(len(arrays))]
        ).astype(np.float32)
        index.train(train)
        info.update(lists=lists, nprobe=int(min(nprobe, lists)), trained_on=len(train))
        del train
    else:
        raise TLMConfigError(f"tlm_pool_index must be auto, flat or ivf; got {kind!r}.")
    for array in arrays:  # a shard at a time
        index.add(np.ascontiguousarray(array, dtype=np.float32))
    info["build_s"] = round(time.perf_counter() - began, 3)
    atomic_replace(root / INDEX_FILE, lambda tmp: faiss.write_index(index, tmp))
    manifest = {
        "format": FORMAT,
        "key": key,
        "rows": rows,
        "dim": dim,
        "dtype": dtype,
        "shard_rows": shards[0][1] - shards[0][0],
        "shards": [
            {"file": f"{_shard_name(n)}.npy", "start": a, "rows": b - a, "digest": digests[n]}
            for n, (a, b) in enumerate(shards)
        ],
        "index": info,
        "embed_s": round(embed_s, 3),
    }
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2))
    logger.info(f"Pool store {root}: {rows} rows, {chosen} index built in {info['build_s']:.1f}s.")
