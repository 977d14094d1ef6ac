"""SIFT selection math (Hübotter et al., ICLR 2025): closed form, incremental == naive, and the paper's claims."""

import math

import pytest
import torch

from tlm_plugin.selectors.sift import naive_sift_select, nearest_select, posterior_variance, preselect, sift_select


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_data(seed: int, m: int, n: int = 60, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen), torch.randn(n, d, generator=gen)


def test_posterior_variance_hand_computed():
    lam = 0.01
    e1, e2 = torch.eye(2)
    target = e1.unsqueeze(0)
    assert posterior_variance(target, torch.empty(0, 2), lam).item() == pytest.approx(1.0)
    # One observation of the target itself: 1 - 1 / (1 + lambda).
    assert posterior_variance(target, e1.unsqueeze(0), lam).item() == pytest.approx(lam / (1 + lam))
    # An orthogonal row carries no information about the target.
    assert posterior_variance(target, torch.stack([e1, e2]), lam).item() == pytest.approx(lam / (1 + lam))
    # At 45 degrees: 1 - cos^2 / (1 + lambda); the 5x scale shows the inputs are normalised inside.
    assert posterior_variance(5 * target, unit(e1 + e2).unsqueeze(0), lam).item() == pytest.approx(1 - 0.5 / (1 + lam))


def test_posterior_variance_matches_explicit_inverse():
    target, selected = random_data(0, m=3, n=7)
    lam = 0.1
    q, x = unit(target.double()), unit(selected.double())
    k_qx = q @ x.T
    expected = 1 - torch.einsum(
        "in,nk,ik->i", k_qx, torch.linalg.inv(x @ x.T + lam * torch.eye(7, dtype=x.dtype)), k_qx
    )
    torch.testing.assert_close(posterior_variance(target, selected, lam), expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("m", [1, 4])
def test_incremental_greedy_equals_naive(seed, m):
    target, pool = random_data(seed, m)
    fast_idx, fast_var = sift_select(target, pool, budget=15)
    slow_idx, slow_var = naive_sift_select(target, pool, budget=15)
    assert fast_idx.tolist() == slow_idx.tolist()
    torch.testing.assert_close(fast_var, slow_var, rtol=1e-10, atol=1e-12)
    assert fast_idx.dtype == torch.long and fast_var.dtype == torch.float64
    # The reported variances are the closed-form trace of the prefix picked so far.
    for n in (1, 7, 15):
        assert fast_var[n - 1].item() == pytest.approx(posterior_variance(target, pool[fast_idx[:n]]).sum().item())
    assert fast_idx.unique().numel() > 1


def test_first_pick_is_nearest_by_absolute_cosine():
    target, pool = random_data(4, m=1)
    pool[17] = -(target[0] + 0.1 * pool[17])  # the closest row points the opposite way
    cosine = unit(pool) @ unit(target[0])
    assert cosine.argmin().item() == 17 and cosine.abs().argmax().item() == 17
    assert sift_select(target, pool, budget=1)[0].tolist() == [17]


def duplicates_pool() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0-9: ten copies of the most relevant row e0; rows 10, 11: the target's other two directions."""
    gen = torch.Generator().manual_seed(5)
    d = 32
    eye = torch.eye(d)
    target = unit(0.8 * eye[0] + 0.42 * eye[1] + 0.42 * eye[2]).unsqueeze(0)
    informative = unit(eye[1:3] + 0.05 * torch.randn(2, d, generator=gen))
    background = torch.randn(20, d, generator=gen)
    return target, torch.cat([eye[0].repeat(10, 1), informative, background])


def test_nearest_spends_budget_on_duplicates_sift_does_not():
    target, pool = duplicates_pool()
    near_idx, _ = nearest_select(target, pool, budget=10)
    assert sorted(near_idx.tolist()) == list(range(10))
    # lambda_ = 0.01: once e0 is observed its remaining variance is ~lambda, so a second copy gains almost nothing
    # and the informative rows win the next picks.
    sift_idx, _ = sift_select(target, pool, budget=3, lambda_=0.01)
    assert sum(i < 10 for i in sift_idx.tolist()) == 1
    assert sift_idx[0].item() < 10 and set(sift_idx[1:].tolist()) == {10, 11}


def test_large_lambda_repeats_the_top_row_small_lambda_diversifies():
    _, pool = random_data(6, m=1, n=40, d=16)
    gen = torch.Generator().manual_seed(7)
    target = (0.9 * unit(pool[7]) + 0.3 * unit(torch.randn(16, generator=gen))).unsqueeze(0)
    assert sift_select(target, pool, budget=10, lambda_=1e3)[0].tolist() == [7] * 10
    assert sift_select(target, pool, budget=10, lambda_=0.01)[0].unique().numel() > 3


def test_prompt_in_pool_is_picked_every_time():
    target, pool = random_data(8, m=1)
    pool[23] = 3 * target[0]
    lam = 0.05
    idx, var = sift_select(target, pool, budget=12, lambda_=lam)
    assert idx.tolist() == [23] * 12
    n = torch.arange(1, 13, dtype=torch.float64)
    torch.testing.assert_close(var, lam / (n + lam))


@pytest.mark.parametrize("m", [1, 3])
def test_adaptive_stopping_follows_the_rule(m):
    target, pool = random_data(9, m)
    budget = 25
    full_idx, full_var = sift_select(target, pool, budget)
    # sigma_n: the root of the mean (over targets) posterior variance after n picks.
    steps = torch.arange(1, budget + 1) * (full_var / m).sqrt()
    stops = set()
    for alpha in (0.4, 0.9, 1.0, 1.3, 100.0):
        violated = (alpha * steps > 1).nonzero()
        expected = int(violated[0]) if len(violated) else budget
        idx, var = sift_select(target, pool, budget, alpha=alpha)
        assert len(idx) == len(var) == expected
        assert idx.tolist() == full_idx[:expected].tolist()
        stops.add(expected)
    assert 0 in stops and budget in stops and any(0 < s < budget for s in stops)


def test_candidates_covering_the_picks_change_nothing():
    target, pool = random_data(10, m=2, n=300, d=8)
    full_idx, full_var = sift_select(target, pool, budget=20)
    rank = torch.empty(len(pool), dtype=torch.long)
    score = (unit(pool) @ unit(target).T).abs().amax(dim=1)
    rank[score.argsort(descending=True)] = torch.arange(len(pool))
    k = int(rank[full_idx].max()) + 1
    assert k < len(pool)  # the test is only meaningful if pre-selection drops rows
    idx, var = sift_select(target, pool, budget=20, candidates=k)
    assert idx.tolist() == full_idx.tolist()
    torch.testing.assert_close(var, full_var)
    assert sift_select(target, pool, budget=20, candidates=10_000)[0].tolist() == full_idx.tolist()


def test_preselect_keeps_the_largest_absolute_cosine_to_any_target():
    target, pool = random_data(11, m=3, n=500, d=16)
    score = (unit(pool) @ unit(target).T).abs().amax(dim=1)
    rows = preselect(target, pool, 40)
    assert rows.tolist() == sorted(score.topk(40).indices.tolist())
    assert preselect(target, pool, 10_000).tolist() == list(range(500))
    with pytest.raises(ValueError, match="backend"):
        preselect(target, pool, 40, backend="annoy")
    with pytest.raises(ValueError, match="k must be an integer"):
        preselect(target, pool, 0)


def test_preselect_faiss_matches_matmul():
    pytest.importorskip("faiss")
    target, pool = random_data(11, m=3, n=500, d=16)
    assert preselect(target, pool, 40, backend="faiss").tolist() == preselect(target, pool, 40).tolist()


def test_nearest_select_is_top_cosine_without_repeats():
    target, pool = random_data(12, m=1)
    idx, var = nearest_select(target, pool, budget=8)
    assert idx.tolist() == (unit(pool) @ unit(target[0])).argsort(descending=True)[:8].tolist()
    for n in (1, 8):
        assert var[n - 1].item() == pytest.approx(posterior_variance(target, pool[idx[:n]]).sum().item())
    assert len(nearest_select(target, pool[:5], budget=8)[0]) == 5


def with_bad_row(x: torch.Tensor, row: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[row, 1] = value
    if value == 0:
        x[row] = 0
    return x


T, P = random_data(13, m=2, n=10, d=6)
BAD_INPUTS = [
    (dict(budget=0), "budget"),
    (dict(budget=2.5), "budget"),
    (dict(pool=torch.empty(0, 6)), "pool is empty"),
    (dict(pool=torch.randn(10, 5)), "target has dimension 6 but pool has dimension 5"),
    (dict(pool=torch.randn(6)), "pool must be a 2-D"),
    (dict(pool=with_bad_row(P, 3, math.nan)), "pool row 3 is not finite"),
    (dict(target=with_bad_row(T, 1, math.inf)), "target row 1 is not finite"),
    (dict(pool=with_bad_row(P, 4, 0.0)), "pool row 4 is all zeros"),
    (dict(pool=with_bad_row(P, 2, 1e30)), "pool row 2 has a norm that overflows"),
    (dict(lambda_=0.0), "lambda_"),
    (dict(lambda_=-1.0), "lambda_"),
]


@pytest.mark.parametrize("select", [sift_select, naive_sift_select, nearest_select])
@pytest.mark.parametrize(("change", "message"), BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(select, change, message):
    kwargs = dict(target=T, pool=P, budget=3, lambda_=0.01) | change
    with pytest.raises(ValueError, match=message):
        select(**kwargs)


@pytest.mark.parametrize(("change", "message"), [(dict(candidates=0), "candidates"), (dict(alpha=0.0), "alpha")])
def test_bad_sift_options_raise(change, message):
    with pytest.raises(ValueError, match=message):
        sift_select(T, P, 3, **change)


def test_posterior_variance_bad_input():
    with pytest.raises(ValueError, match="selected row 0 is not finite"):
        posterior_variance(T, with_bad_row(P, 0, math.nan))
    with pytest.raises(ValueError, match="lambda_"):
        posterior_variance(T, P, 0.0)
