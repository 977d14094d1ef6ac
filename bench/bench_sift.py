# Run: python bench/bench_sift.py [--threads N]   (about 30 s on 2 cores; prints two tables)
"""Times SIFT selection (Hübotter et al., ICLR 2025, arXiv:2410.08020) on random embeddings.

1. N = 50 picks from K = 1,000 candidates at d = 1,024 (one target): the incremental greedy against the naive
   recompute-the-posterior greedy, checked pick for pick.
2. A 100,000-row float32 pool at d = 1,024: pre-selection of K = 1,000 rows by |cos|, then the exact greedy.
"""

import argparse
import importlib.util
import time

import torch

from tlm_plugin.selectors.sift import naive_sift_select, nearest_select, preselect, sift_select


DIM, BUDGET, CANDIDATES, POOL_ROWS = 1024, 50, 1000, 100_000


def best_time(fn, repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` calls, in milliseconds, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), result


def against_naive(gen: torch.Generator) -> dict:
    target = torch.randn(1, DIM, generator=gen)
    pool = torch.randn(CANDIDATES, DIM, generator=gen)
    fast_ms, (fast_idx, fast_var) = best_time(lambda: sift_select(target, pool, BUDGET), repeats=5)
    naive_ms, (naive_idx, naive_var) = best_time(lambda: naive_sift_select(target, pool, BUDGET), repeats=1)
    return {
        "incremental_ms": fast_ms,
        "naive_ms": naive_ms,
        "same_picks": fast_idx.tolist() == naive_idx.tolist(),
        "max_variance_gap": float((fast_var - naive_var).abs().max()),
        "distinct_picks": fast_idx.unique().numel(),
    }


def large_pool(gen: torch.Generator) -> list[tuple[str, float]]:
    target = torch.randn(1, DIM, generator=gen)
    pool = torch.randn(POOL_ROWS, DIM, generator=gen)
    pre_ms, rows = best_time(lambda: preselect(target, pool, CANDIDATES), repeats=3)
    subset = pool[rows]
    greedy_ms, _ = best_time(lambda: sift_select(target, subset, BUDGET), repeats=3)
    total_ms, (idx, _) = best_time(lambda: sift_select(target, pool, BUDGET, candidates=CANDIDATES), repeats=3)
    near_ms, _ = best_time(lambda: nearest_select(target, pool, BUDGET), repeats=3)
    assert torch.isin(idx, rows).all()
    table = [
        (f"pre-selection of {CANDIDATES:,} rows (matmul, with input checks)", pre_ms),
        (f"exact greedy, N={BUDGET} from the {CANDIDATES:,} rows", greedy_ms),
        (f"sift_select(candidates={CANDIDATES}) end to end", total_ms),
        (f"nearest_select, N={BUDGET}", near_ms),
    ]
    if importlib.util.find_spec("faiss") is not None:
        faiss_ms, faiss_rows = best_time(lambda: preselect(target, pool, CANDIDATES, backend="faiss"), repeats=3)
        assert faiss_rows.tolist() == rows.tolist()
        table.append((f"pre-selection of {CANDIDATES:,} rows (faiss, index built per call)", faiss_ms))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    if (threads := parser.parse_args().threads) is not None:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={DIM}, one target")

    result = against_naive(gen)
    print(f"\nN={BUDGET} from K={CANDIDATES:,} candidates")
    print(f"| {'method':<28} | {'ms':>9} |\n|{'-' * 30}|{'-' * 11}|")
    print(f"| {'incremental (sift_select)':<28} | {result['incremental_ms']:9.1f} |")
    print(f"| {'naive (naive_sift_select)':<28} | {result['naive_ms']:9.1f} |")
    print(
        f"speedup {result['naive_ms'] / result['incremental_ms']:.0f}x; same picks: {result['same_picks']}; "
        f"max variance gap {result['max_variance_gap']:.1e}; {result['distinct_picks']} distinct rows"
    )
    if not result["same_picks"]:
        raise SystemExit("incremental and naive greedy disagree")

    rows = large_pool(gen)
    print(f"\npool of {POOL_ROWS:,} rows, float32")
    print(f"| {'step':<58} | {'ms':>7} |\n|{'-' * 60}|{'-' * 9}|")
    for name, ms in rows:
        print(f"| {name:<58} | {ms:7.1f} |")


if __name__ == "__main__":
    main()
