"""SIFT: pick the data that most reduces the model's uncertainty about the prompt (pure math, no training).

Hübotter, Bongni, Hakimi, Krause, "Efficiently Learning at Test-Time: Active Fine-Tuning of LLMs", ICLR 2025,
arXiv:2410.08020. The surrogate model is linear in a fixed embedding phi; with unit-normalised embeddings the
kernel is the cosine k(x, x') = phi(x)^T phi(x'), so k(x, x) = 1. After selecting X_n = (x_1, ..., x_n), repeats
allowed, with regularisation (noise variance) lambda', the posterior variance of a target x* is

    sigma_n^2(x*) = k(x*, x*) - k_X(x*)^T (K_X + lambda' I)^{-1} k_X(x*)

and SIFT picks greedily x_{n+1} = argmin_x sigma^2_{X_n + {x}}(x*). With m targets the objective is the sum of
their posterior variances (the trace). Every function here unit-normalises ``target`` and ``pool`` itself, so raw
embeddings may be passed; the greedy updates run in float64.
"""

import math
from numbers import Integral, Real

import torch


def sift_select(
    target: torch.Tensor,
    pool: torch.Tensor,
    budget: int,
    lambda_: float = 0.01,
    candidates: int | None = None,
    alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy SIFT selection of ``budget`` pool rows for ``target`` (exact greedy, incremental updates).

    Args:
        target: (m, d) embeddings of the target(s), or (d,) for one; m > 1 minimises the summed variance.
        pool: (n, d) embeddings of the data to select from.
        budget: N >= 1, the number of picks (repeats allowed: a repeat is one more gradient step on that row).
        lambda_: lambda' > 0. Small values force diversity, large values favour repeating the nearest row.
        candidates: K, run the exact greedy only over the K pool rows with the largest absolute cosine to any
            target (the max over targets, see :func:`preselect`); ``None`` runs it over the whole pool (which is
            then copied to float64, so pass K for large pools).
        alpha: adaptive SIFT. Stop at the first step n with alpha * n * sigma_n > 1 and drop that pick, where
            sigma_n^2 is the target's posterior variance after n picks (the mean over targets when m > 1).
            May return fewer than ``budget`` picks, or none.

    Returns:
        indices: (N',) int64 pool rows in pick order, N' = budget unless ``alpha`` stopped early.
        variances: (N',) float64, the targets' total posterior variance sum_i sigma_n^2(x*_i) after each pick.
    """
    target, pool = _check_pair(target, pool)
    _check_count(budget, "budget")
    _check_positive(lambda_, "lambda_")
    if candidates is not None:
        _check_count(candidates, "candidates")
    if alpha is not None:
        _check_positive(alpha, "alpha")

    if candidates is None or candidates >= len(pool):
        rows = None
    else:
        rows = _preselect_torch(target, pool, candidates).sort().values  # ascending keeps full-pool tie-breaking
    phi_q = _unit64(target)
    phi_k = _unit64(pool if rows is None else pool[rows])
    picks, variances = _greedy_trace(phi_q, phi_k, budget, lambda_, alpha)
    indices = picks if rows is None else rows[picks]
    return indices.to(pool.device), variances.to(pool.device)


def _greedy_trace(
    phi_q: torch.Tensor, phi_k: torch.Tensor, budget: int, lambda_: float, alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The incremental greedy on unit float64 rows: phi_q (m, d), phi_k (K, d) -> local picks (N',), totals (N',).

    Keeps rows u_t of the Cholesky factor of K_X + lambda' I, so that k_n(a, b) = k(a, b) - sum_t u_t(a) u_t(b).
    A pick is one rank-one Schur update, O(K (d + n + m)), instead of a solve per candidate; no K x K matrix.
    """
    num_rows, num_targets = phi_k.shape[0], phi_q.shape[0]
    u = phi_k.new_zeros(budget, num_rows)
    cross = phi_q @ phi_k.T  # k_n(x*_i, x), (m, K)
    diag = phi_k.new_ones(num_rows)  # k_n(x, x)
    var = phi_q.new_ones(num_targets)  # k_n(x*_i, x*_i)
    picks, totals = [], []
    for t in range(budget):
        # Picking x lowers the trace by sum_i k_n(x*_i, x)^2 / (k_n(x, x) + lambda').
        j = int((cross.square().sum(0) / (diag + lambda_)).argmax())
        col = phi_k @ phi_k[j] - u[:t].T @ u[:t, j]  # k_n(x, x_j), (K,)
        scale = (col[j] + lambda_).sqrt()
        u[t] = col / scale
        w = cross[:, j] / scale
        diag -= u[t].square()
        cross -= torch.outer(w, u[t])
        var -= w.square()
        total = float(var.sum())
        if alpha is not None and alpha * (t + 1) * math.sqrt(max(total / num_targets, 0.0)) > 1:
            break
        picks.append(j)
        totals.append(total)
    return torch.tensor(picks, dtype=torch.long), torch.tensor(totals, dtype=torch.float64)


def posterior_variance(target: torch.Tensor, selected: torch.Tensor, lambda_: float = 0.01) -> torch.Tensor:
    """Closed-form posterior variance sigma_n^2(x*) of each target given ``selected`` (direct solve).

    Args:
        target: (m, d) or (d,) embeddings; selected: (n, d) embeddings, n may be 0 (then every variance is 1).

    Returns:
        (m,) float64 sigma_n^2(x*_i); ``.sum()`` is the trace that SIFT minimises.
    """
    _check_positive(lambda_, "lambda_")
    target, selected = _check_pair(target, selected, second_name="selected", allow_empty=True)
    phi_q, phi_x = _unit64(target), _unit64(selected)
    return _posterior_variance_gram(phi_q.square().sum(1), phi_q @ phi_x.T, phi_x @ phi_x.T, lambda_)


def _posterior_variance_gram(
    prior: torch.Tensor, k_tx: torch.Tensor, gram: torch.Tensor, lambda_: float
) -> torch.Tensor:
    """k(x*, x*) - k_X(x*)^T (K_X + lambda' I)^{-1} k_X(x*) batched: prior (m,), k_tx (..., m, n), gram (..., n, n)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    solved = torch.linalg.solve(gram + lambda_ * eye, k_tx.transpose(-1, -2))  # (..., n, m)
    return prior - (k_tx.transpose(-1, -2) * solved).sum(-2)


def naive_sift_select(
    target: torch.Tensor, pool: torch.Tensor, budget: int, lambda_: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference greedy: each step evaluates sum_i sigma^2_{X_n + {x}}(x*_i) in closed form for every pool row.

    O(K N^4): one batched (n+1) x (n+1) solve per pool row and step. An oracle for tests and the bench only.
    Same arguments and returns as :func:`sift_select` without ``candidates`` and ``alpha``.
    """
    target, pool = _check_pair(target, pool)
    _check_count(budget, "budget")
    _check_positive(lambda_, "lambda_")
    phi_q, phi_k = _unit64(target), _unit64(pool)
    num_rows = phi_k.shape[0]
    prior, self_k, k_qx = phi_q.square().sum(1), phi_k.square().sum(1), phi_q @ phi_k.T
    picks, totals = [], []
    for n in range(budget):
        chosen = phi_k[picks]  # (n, d)
        k_xc = phi_k @ chosen.T  # (K, n)
        gram = phi_k.new_empty(num_rows, n + 1, n + 1)  # K_X for X = X_n + {x}, one per pool row x
        gram[:, :n, :n] = chosen @ chosen.T
        gram[:, :n, n] = k_xc
        gram[:, n, :n] = k_xc
        gram[:, n, n] = self_k
        k_tx = phi_k.new_empty(num_rows, phi_q.shape[0], n + 1)
        k_tx[:, :, :n] = phi_q @ chosen.T
        k_tx[:, :, n] = k_qx.T
        trace = _posterior_variance_gram(prior, k_tx, gram, lambda_).sum(-1)  # (K,)
        j = int(trace.argmin())
        picks.append(j)
        totals.append(float(trace[j]))
    return torch.tensor(picks, dtype=torch.long), torch.tensor(totals, dtype=torch.float64)


def nearest_select(
    target: torch.Tensor, pool: torch.Tensor, budget: int, lambda_: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour retrieval baseline: the ``budget`` pool rows with the highest cosine, no repeats.

    Args:
        target: (m, d) or (d,); a row's score is its largest (signed) cosine to any target, as in retrieval.
        pool: (n, d). budget: N >= 1; at most n rows are returned.
        lambda_: only used to report ``variances`` on the same scale as :func:`sift_select`.

    Returns:
        indices: (min(N, n),) int64, best first; variances: (min(N, n),) float64 closed-form total posterior
        variance after each pick.
    """
    target, pool = _check_pair(target, pool)
    _check_count(budget, "budget")
    _check_positive(lambda_, "lambda_")
    cosine = _cosine(target, pool).amax(dim=1)
    indices = cosine.topk(min(budget, len(pool))).indices
    phi_q, phi_x = _unit64(target), _unit64(pool[indices])
    prior, k_tx, gram = phi_q.square().sum(1), phi_q @ phi_x.T, phi_x @ phi_x.T
    variances = [
        _posterior_variance_gram(prior, k_tx[:, :n], gram[:n, :n], lambda_).sum() for n in range(1, len(indices) + 1)
    ]
    return indices, torch.stack(variances)


def preselect(target: torch.Tensor, pool: torch.Tensor, k: int, backend: str = "matmul") -> torch.Tensor:
    """Pre-selection for large pools: the k pool rows with the largest max_i |cos(x*_i, x)|, ascending row order.

    ``backend="matmul"`` (what ``sift_select(candidates=k)`` uses) is one exact matmul with no copy of the pool;
    ``"faiss"`` builds an exact inner-product index per call and returns the same rows. Per call the index build
    dominates (see docs/sift.md), so faiss only pays off for callers that keep an index of their own.
    target: (m, d) or (d,), pool: (n, d) -> (min(k, n),) int64.
    """
    target, pool = _check_pair(target, pool)
    _check_count(k, "k")
    if backend not in ("matmul", "faiss"):
        raise ValueError(f"backend must be 'matmul' or 'faiss', got {backend!r}.")
    k = min(k, len(pool))
    rows = _preselect_torch(target, pool, k) if backend == "matmul" else _preselect_faiss(target, pool, k)
    return rows.sort().values


def _preselect_torch(target: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    return _cosine(target, pool).abs().amax(dim=1).topk(k).indices


def _preselect_faiss(target: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    try:
        import faiss
    except ImportError as err:
        raise ImportError("preselect(backend='faiss') needs faiss: pip install faiss-cpu") from err
    # Searching +x* and -x* finds the rows with the largest |cos|; a row in the overall top k is in the top k
    # of the query (and sign) that attains its max, so the union of the 2m lists holds the exact answer.
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(_unit32(pool).numpy())
    queries = _unit32(target)
    scores, rows = index.search(torch.cat([queries, -queries]).numpy(), k)
    rows, scores = torch.from_numpy(rows).flatten(), torch.from_numpy(scores).flatten()
    best = torch.full((len(pool),), -math.inf).scatter_reduce(0, rows, scores, reduce="amax")
    return best.topk(k).indices


def _cosine(target: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """(m, d), (n, d) -> (n, m) cosines, without a normalised copy of the pool."""
    dtype = torch.float32 if pool.dtype in (torch.float16, torch.bfloat16) else pool.dtype
    queries = _unit64(target).to(dtype)
    return (pool.to(dtype) @ queries.T) / torch.linalg.vector_norm(pool, dim=1, dtype=dtype).unsqueeze(1)


def _unit64(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _unit32(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().cpu().to(torch.float32)
    return (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).contiguous()


def _check_pair(
    target, second, second_name: str = "pool", allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(target)
    target = target.unsqueeze(0) if target.ndim == 1 else target
    target, second = _check_embeddings(target, "target"), _check_embeddings(second, second_name, allow_empty)
    if target.shape[1] != second.shape[1]:
        raise ValueError(f"target has dimension {target.shape[1]} but {second_name} has dimension {second.shape[1]}.")
    return target, second


def _check_embeddings(x, name: str, allow_empty: bool = False) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) tensor, got shape {tuple(x.shape)}.")
    if len(x) == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: it has 0 rows.")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    # One pass over a large pool: a nan or inf entry makes the row norm non-finite, an all-zero row makes it 0.
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero()
    if len(bad):
        row = int(bad[0])
        if not bool(torch.isfinite(x[row]).all()):
            raise ValueError(f"{name} row {row} is not finite (contains nan or inf).")
        problem = "is all zeros" if norms[row] == 0 else "has a norm that overflows"
        raise ValueError(f"{name} row {row} {problem} and cannot be unit-normalised.")
    return x


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
