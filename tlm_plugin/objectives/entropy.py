"""Entropy-minimisation baselines of the TLM paper (Tent, EATA, COME) as pure functions on causal-LM logits.

Hu et al., "Test-Time Learning for Large Language Models" (ICML 2025) compares TLM with Tent, EATA and COME
adapted to LLMs: each minimises the uncertainty of the model's next-token distributions over the tokens it generated.
Every function here takes ``logits`` (B, T, V) of one forward pass over prompt + generated tokens and a ``mask``
(B, T) that marks the positions whose next-token distribution counts; for a generated continuation y_1..y_n after a
prompt of length P these are positions P-1 .. P+n-2 (the logits that predicted y_1..y_n). Everything is computed in
float32 (float64 stays float64) whatever the logits' dtype. Selection weights are detached; the losses keep the graph
of ``logits``. See docs/objectives.md for the formulas and the choices made.
"""

import math
from collections.abc import Mapping

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) values, (B, T) mask -> ((B,) mean over masked positions, 0 without any; (B,) number of positions)."""
    keep = mask.bool()
    # where, not multiply: a garbage value at a padded position must not leak into the sum as nan * 0.
    total = torch.where(keep, values, torch.zeros_like(values)).sum(dim=-1)
    count = keep.sum(dim=-1).to(values.dtype)
    return total / count.clamp(min=1), count


def _mean_over_samples(per_sample: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean of (B,) per-sample values over the samples that have at least one position (0 if none has)."""
    has_positions = count > 0
    return torch.where(has_positions, per_sample, torch.zeros_like(per_sample)).sum() / has_positions.sum().clamp(
        min=1
    )


# ---------------------------------------------------------------------------------------------------------------------
# Softmax entropy and Tent


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H(p_t) = -sum_v p_t(v) log p_t(v) of every next-token distribution p_t = softmax(z_t), in nats.

    Args:
        logits: (B, T, V) next-token logits (finite; raw model outputs).
        mask: (B, T) 1/True for the positions that count.

    Returns:
        (B, T) entropies, 0 at masked-out positions; float32 (log-softmax, so stable for any logit scale).
    """
    log_p = torch.log_softmax(_upcast(logits), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return torch.where(mask.bool(), entropy, torch.zeros_like(entropy))


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy H(x): the mean token entropy over the sample's masked positions.

    Args:
        logits: (B, T, V); mask: (B, T).

    Returns:
        (B,) mean entropy with the graph of ``logits``; 0 for a sample without any masked position.
    """
    return _masked_mean(token_entropy(logits, mask), mask)[0]


def tent_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Tent (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021: minimise the
    prediction entropy H = -sum_c p_c log p_c), as the TLM paper adapts it to LLMs: the entropy of the model's
    next-token distributions over the generated tokens.

    loss = mean over samples of H(x) (``mean_entropy``); samples without any masked position are left out of the mean.

    Args:
        logits: (B, T, V); mask: (B, T).

    Returns:
        Scalar loss (0, still attached to the graph, if no sample has a position).
    """
    per_sample, count = _masked_mean(token_entropy(logits, mask), mask)
    return _mean_over_samples(per_sample, count)


# ---------------------------------------------------------------------------------------------------------------------
# EATA


def eata_threshold(vocab_size: int, fraction: float = 0.4) -> float:
    """EATA's entropy margin E0 = fraction * ln C (Niu et al., ICML 2022, with Eq. 3: E0 = 0.4 * ln 1000 on ImageNet).

    For an LLM the classes are the vocabulary, C = V (the logits' last dimension). The TLM paper's "E0 set to 0.4"
    is read as this fraction; passing ``e0=0.4`` (nats) to ``eata_loss`` gives the other, absolute reading.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    if not fraction > 0:
        raise ValueError(f"fraction must be positive, got {fraction}")
    return fraction * math.log(vocab_size)


def eata_weights(entropy: torch.Tensor, e0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EATA's sample-adaptive weight S(x) = 1 / exp(H(x) - E0) * 1[H(x) < E0] (Niu et al., ICML 2022, Eq. 3).

    Args:
        entropy: (B,) per-sample entropies H(x).
        e0: the entropy margin E0 in nats (see ``eata_threshold``).

    Returns:
        ``(weights, selected)``: (B,) detached weights exp(E0 - H), > 1 for selected samples and 0 otherwise, and the
        (B,) bool reliable-sample mask H < E0 (strict, as in EATA).
    """
    entropy = _upcast(entropy.detach())
    selected = entropy < e0
    weights = torch.exp(e0 - entropy)
    return torch.where(selected, weights, torch.zeros_like(weights)), selected


def eata_loss(
    logits: torch.Tensor, mask: torch.Tensor, e0: float, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EATA's loss S(x) H(x) (Niu et al., ICML 2022, Eq. 8 without the regulariser; add ``fisher_penalty`` for it).

    H(x) is the sample's mean token entropy (``mean_entropy``). The loss averages over the selected samples, as
    EATA's code does (``entropys[selected].mul(coeff).mean(0)``):

        loss = sum_{i selected} w_i H_i / max(#selected, 1)

    Args:
        logits: (B, T, V); mask: (B, T).
        e0: entropy margin E0 in nats, e.g. ``eata_threshold(V)``.
        keep: optional (B,) bool mask ANDed with the reliability filter (samples another rule already dropped).

    Returns:
        ``(loss, weights, selected)``: scalar loss (0, still attached, when nothing is selected; unselected samples get
        zero gradient), (B,) detached weights (0 where not selected) and (B,) bool selection. A sample without any
        masked position is never selected.
    """
    entropy, count = _masked_mean(token_entropy(logits, mask), mask)
    weights, selected = eata_weights(entropy, e0)
    selected = selected & (count > 0)
    if keep is not None:
        selected = selected & keep.to(selected.device).bool()
    weights = torch.where(selected, weights, torch.zeros_like(weights))
    loss = (weights * entropy).sum() / selected.sum().clamp(min=1)
    return loss, weights, selected


def fisher_penalty(
    params: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    coeff: float,
) -> torch.Tensor:
    """EATA's anti-forgetting term beta * R, R = sum_i F_i (theta_i - theta_i^0)^2 (Niu et al., ICML 2022, Eqs. 8-9;
    EATA uses beta = 2000).

    Args:
        params: name -> current parameter (with gradient); only the names in ``fisher`` are penalised.
        anchor: name -> detached parameter value theta^0 before adaptation.
        fisher: name -> diagonal Fisher F, same shape as the parameter (``objectives.step.estimate_fisher``).
        coeff: beta.

    Returns:
        Scalar float32 penalty (0 if ``fisher`` is empty).
    """
    total = None
    for name, weight in fisher.items():
        if name not in params or name not in anchor:
            raise KeyError(f"fisher entry {name!r} has no matching parameter/anchor")
        delta = params[name].float() - anchor[name].detach().to(params[name].device).float()
        term = (weight.detach().to(delta) * delta.pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return coeff * total


def fisher_penalty_grad(param: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor, coeff: float) -> torch.Tensor:
    """d(beta * F (theta - theta0)^2) / d theta = 2 beta F (theta - theta0), elementwise, float32 (detached).

    Added to the parameter's gradient by a hook instead of adding ``fisher_penalty`` to the loss: a term that uses
    parameters outside the model's forward would be counted twice by DDP's gradient reducer.
    """
    return 2.0 * coeff * fisher.float() * (param.detach().float() - anchor.float())


def conservative_logits(
    logits: torch.Tensor, reference_norm: torch.Tensor | None = None, p: float = 2.0
) -> torch.Tensor:
    """COME's conservative constraint on the logit scale (Zhang et al., ICLR 2025; official code, ``dirichlet_entropy``):
    z_hat = r * z / ||z||_p with r a constant (detached).

    With ``reference_norm=None`` (the official code), r = ||z||_p of the same forward pass, detached: the value is
    unchanged and only the gradient changes. It is orthogonal to z, so a gradient step moves the logits' direction
    but not their scale (to first order), and the loss cannot lower the uncertainty mass by inflating the logits.
    With ``reference_norm`` (e.g. ||z_0||_p of the frozen source model at the same positions) the scale is pinned
    exactly to the source model's, whatever the adapted model does, so u >= sigmoid(-r) (``uncertainty_lower_bound``)
    holds with r from the source model.

    Args:
        logits: (..., K).
        reference_norm: optional (...) norms r; detached.
        p: the norm's order (official code: 2).

    Returns:
        (..., K) float32 rescaled logits with the graph of ``logits``.
    """
    z = _upcast(logits)
    norm = torch.linalg.vector_norm(z, ord=p, dim=-1, keepdim=True)
    target = norm.detach() if reference_norm is None else _upcast(reference_norm.detach()).to(z.device).unsqueeze(-1)
    return z * (target / norm.clamp(min=torch.finfo(z.dtype).tiny))


def _log_opinion(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log b (..., K), log u (...)) with evidence e = exp(z), S = sum_k e_k + K, in log space.

    The logits are shifted by their (detached) maximum first: log b = (z - m) - log S' with
    log S' = logaddexp(logsumexp(z - m), log K - m). The value and the gradient do not depend on m, but adding m back
    (as logsumexp does) would cost log b its precision when the logits are ~1e3.
    """
    z = _upcast(logits)
    log_k = math.log(z.size(-1))
    shift = z.detach().amax(dim=-1, keepdim=True)
    shifted = z - shift
    log_s = torch.logaddexp(torch.logsumexp(shifted, dim=-1, keepdim=True), log_k - shift)
    return shifted - log_s, (log_k - shift - log_s).squeeze(-1)


def come_opinion(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """COME's subjective-logic opinion of a Dirichlet with evidence e_k = exp(z_k) (Zhang et al., ICLR 2025).

    alpha_k = e_k + 1, S = sum_k alpha_k = sum_k e_k + K, belief b_k = e_k / S, uncertainty u = K / S, so
    sum_k b_k + u = 1. Computed in log space (log S = logaddexp(logsumexp(z), log K)): no overflow for any logits.

    Args:
        logits: (..., K) with K the number of classes (for an LLM the vocabulary, padded rows included).

    Returns:
        ``(belief, uncertainty)``: (..., K) and (...), float32, with the graph of ``logits``.
    """
    log_belief, log_u = _log_opinion(logits)
    return log_belief.exp(), log_u.exp()


def uncertainty_lower_bound(logit_norm: torch.Tensor) -> torch.Tensor:
    """u >= 1 / (1 + exp(||z||_p)) = sigmoid(-||z||_p) for any p >= 1, since sum_k exp(z_k) <= K exp(||z||_inf).

    This is how bounding the logit norm (``conservative_logits``) keeps the opinion's uncertainty mass away from 0.
    """
    return torch.sigmoid(-_upcast(logit_norm))


def come_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of the opinion as a (K+1)-way distribution, H = -sum_k b_k log b_k - u log u (Zhang et al., ICLR 2025).

    Computed from log b and log u (no epsilon; the official code adds 1e-7 to each of the K+1 masses, which shifts H
    noticeably when K is a 100k-token vocabulary). Every term is >= 0, so H >= 0 even for logits ~1e3.

    Args:
        logits: (B, T, V) (the rescaled ones from ``conservative_logits`` for COME proper); mask: (B, T).

    Returns:
        (B, T) float32 opinion entropies, 0 at masked-out positions.
    """
    log_belief, log_u = _log_opinion(logits)
    entropy = -(log_belief.exp() * log_belief).sum(dim=-1) - log_u.exp() * log_u
    return torch.where(mask.bool(), entropy, torch.zeros_like(entropy))


def come_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    reference_norm: torch.Tensor | None = None,
    p: float = 2.0,
    conservative: bool = True,
) -> torch.Tensor:
    """COME as a drop-in replacement of Tent's entropy (Zhang et al., ICLR 2025; official ``Tent_COME``):
    mean over samples of the mean opinion entropy of the conservatively rescaled logits over the masked positions.

    Args:
        logits: (B, T, V); mask: (B, T).
        reference_norm: optional (B, T) source-model logit norms (see ``conservative_logits``).
        p: norm order of the constraint.
        conservative: ``False`` drops the norm constraint (plain opinion-entropy minimisation, an ablation).

    Returns:
        Scalar loss; samples without any masked position are left out of the mean.
    """
    if conservative:
        logits = conservative_logits(logits, reference_norm, p)
    per_sample, count = _masked_mean(come_entropy(logits, mask), mask)
    return _mean_over_samples(per_sample, count)
