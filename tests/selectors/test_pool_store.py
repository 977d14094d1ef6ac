"""The pool store: embeddings streamed to shards on disk, resumed after a kill, shared across ranks, and selection
through its faiss index equal to the in-memory selectors where the index is exact.

The embeddings here come from a deterministic stand-in encoder (a seeded random unit vector per text), so every
expected vector is known without the store.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.selectors.pool import NearestSelector, RandomPoolSelector, SiftSelector
from tlm_plugin.train import pool_store
from tlm_plugin.train.pool_store import PoolStore, build_store, ivf_lists


pytest.importorskip("faiss", reason="the pool store's index needs faiss: pip install faiss-cpu (dev extra)")

DIM = 16


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


class Encoder:
    """Counts what it embeds; fails after ``fail_after`` calls (a killed run)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.texts, self.fail_after = 0, 0, fail_after

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.texts += len(texts)
        return np.stack([vector(t) for t in texts])


def texts_of(texts):
    return lambda start, stop: texts[start:stop]


TEXTS = [f"row {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(i % 5 + 1)) for i in range(1000)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFACTORY_TLM_CACHE", str(tmp_path / "cache"))


def build(texts=TEXTS, encoder=None, **kw) -> PoolStore:
    kw.setdefault("shard_rows", 128)
    return build_store(texts_of(texts), len(texts), encoder or Encoder(), "test-encoder", **kw)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shards_hold_every_row_in_order(dtype, tmp_path):
    store = build(dtype=dtype)
    want = np.stack([vector(t) for t in TEXTS])
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["rows"] == 1000 and manifest["dim"] == DIM and len(manifest["shards"]) == 8
    assert [s["rows"] for s in manifest["shards"]] == [128] * 7 + [104]
    assert store.shard(0).dtype == np.dtype(dtype) and isinstance(store.shard(0), np.memmap)
    rows = np.array([999, 0, 128, 127, 500, 500])
    expected = want[rows].astype(dtype).astype(np.float32)
    assert np.array_equal(store.vectors(rows), expected)
    assert manifest["index"]["kind"] == "flat" and store.index.ntotal == 1000


def test_a_killed_build_resumes_at_the_first_missing_shard():
    with pytest.raises(KeyboardInterrupt):
        build(encoder=Encoder(fail_after=3))
    again = Encoder()
    store = build(encoder=again)
    assert again.calls == 5 and again.texts == 1000 - 3 * 128  # shards 4..8 only
    fresh = build_store(texts_of(TEXTS), 1000, Encoder(), "other-encoder", shard_rows=128)
    assert np.array_equal(store.vectors(np.arange(1000)), fresh.vectors(np.arange(1000)))
    third = Encoder()
    build(encoder=third)  # built: nothing embedded, nothing rebuilt
    assert third.calls == 0


def test_a_torn_shard_is_embedded_again():
    store = build()
    (store.root / "index.faiss").unlink()
    (store.root / "shard-00002.json").write_text('{"key": "x"')  # torn record: the shard is not trusted
    again = Encoder()
    build(encoder=again)
    assert again.calls == 1 and again.texts == 128


def test_changed_texts_are_another_store_and_a_named_folder_refuses_them(tmp_path):
    first = build()
    changed = list(TEXTS)
    changed[300] = "something else"
    second = build(changed)
    assert second.root != first.root
    assert np.array_equal(second.vectors([300])[0], vector("something else").astype(np.float16).astype(np.float32))
    folder = tmp_path / "store"
    build(root=folder)
    with pytest.raises(TLMConfigError, match="tlm_pool_store"):
        build(changed, root=folder)


def test_auto_index_is_flat_up_to_the_limit_and_ivf_above(monkeypatch):
    monkeypatch.setattr(pool_store, "FLAT_MAX_ROWS", 500)
    store = build()
    info = store.manifest["index"]
    assert info["kind"] == "ivf" and info["requested"] == "auto"
    # sqrt(1000) ~ 32 lists, capped at 1000 // 40 = 25 so that each list has 40 training points
    assert info["lists"] == ivf_lists(1000) == 25 and store.index.nlist == 25
    assert store.index.nprobe == info["nprobe"] == 25  # min(nprobe 128, lists)
    import faiss

    whole = faiss.read_index(str(store.root / "index.faiss"))  # read whole, not memory-mapped as the store reads it
    whole.nprobe = store.index.nprobe
    queries = np.stack([vector("q1"), vector("q2")])
    assert all(np.array_equal(a, b) for a, b in zip(whole.search(queries, 30), store.search(queries, 30)))
    again = build(nprobe=4)  # the same store searched with another tlm_pool_nprobe: nothing rebuilt
    assert again.index.nprobe == 4 and again.describe()["index"]["nprobe"] == 4
    assert info["trained_on"] == 1000 and store.index.ntotal == 1000 and info["build_s"] >= 0
    assert ivf_lists(1_000_000) == 1024 and ivf_lists(10) == 1


def test_ivf_finds_the_exact_neighbours_when_it_probes_every_list():
    store = build(index="ivf", nprobe=64, dtype="float32")
    target = np.stack([vector("query one"), vector("query two")])
    everything = torch.from_numpy(store.vectors(np.arange(1000)))
    exact = torch.from_numpy(target) @ everything.T
    want = np.sort(exact.abs().amax(0).topk(40).indices.numpy())
    assert np.array_equal(store.candidates(target, 40), want)


def test_flat_candidates_are_the_largest_absolute_cosines():
    store = build(dtype="float32")
    target = np.stack([vector("a query"), -vector("another")])
    everything = store.vectors(np.arange(1000))
    cosine = target @ everything.T
    want = np.sort(np.argsort(-np.abs(cosine).max(0), kind="stable")[:25])
    assert np.array_equal(store.candidates(target, 25), want)
    signed = np.sort(np.argsort(-cosine.max(0), kind="stable")[:25])
    assert np.array_equal(store.candidates(target, 25, absolute=False), signed)


@pytest.mark.parametrize(
    "selector",
    [
        SiftSelector(budget=12, lambda_=0.05, candidates=60),
        SiftSelector(budget=5, candidates=None),
        NearestSelector(budget=9),
        RandomPoolSelector(budget=7, seed=3),
    ],
    ids=["sift-preselect", "sift-whole-pool", "nearest", "random"],
)
def test_selection_through_a_flat_store_equals_the_in_memory_selector(selector):
    store = build(dtype="float32")
    target = torch.from_numpy(vector("what the prompt asks")).unsqueeze(0)
    everything = torch.from_numpy(store.vectors(np.arange(1000)))
    rows, variances = selector.select(target, store)
    selector.generator.manual_seed(3)  # the random control draws again from the same seed
    want_rows, want_variances = selector.pick(target, everything)
    assert rows.tolist() == want_rows.tolist()
    assert torch.allclose(variances, want_variances)


def _rank(rank: int, world: int, init: str, roots: list[str], logs: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    os.environ["LLAMAFACTORY_TLM_CACHE"] = os.path.join(logs, f"cache{rank}")
    seen = []

    def embed(texts):
        seen.append(texts[0])
        return np.stack([vector(t) for t in texts])

    store = build_store(texts_of(TEXTS), 1000, embed, "test-encoder", root=roots[rank], shard_rows=128)
    with open(os.path.join(logs, f"rank{rank}.json"), "w") as f:
        json.dump({"first_texts": seen, "rows": len(store)}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-folder", "a-folder-per-node"])
def test_ranks_embed_their_own_shards_and_complete_what_they_cannot_see(shared, tmp_path):
    roots = [str(tmp_path / "store")] * 2 if shared else [str(tmp_path / "node0"), str(tmp_path / "node1")]
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(2, init, roots, str(tmp_path)), nprocs=2, join=True)
    firsts = {r: json.loads((tmp_path / f"rank{r}.json").read_text())["first_texts"] for r in (0, 1)}
    starts = [TEXTS[n * 128] for n in range(8)]
    if shared:  # rank r embeds shards r, r + 2, ...: each shard once
        assert firsts == {0: starts[0::2], 1: starts[1::2]}
    else:  # each node embeds its own shards first, then the ones the other node wrote elsewhere
        assert firsts == {0: starts[0::2] + starts[1::2], 1: starts[1::2] + starts[0::2]}
    want = np.stack([vector(t) for t in TEXTS]).astype(np.float16).astype(np.float32)
    for root in set(roots):
        assert np.array_equal(PoolStore(root).vectors(np.arange(1000)), want)
        assert PoolStore(root).index.ntotal == 1000
