"""TLM's objective as pure functions (Hu et al., "Test-Time Learning for Large Language Models", ICML 2025).

The paper's Eq. 5 writes the loss as S(x) * P(x); the reference code optimises S(x) * log P(x) with S detached,
which is what we implement: log-perplexity is the stable choice (P(x) explodes for unfamiliar prompts).
"""

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every predicted token.

    Args:
        logits: (B, T, V) next-token logits of the model for ``input_ids``.
        input_ids: (B, T) token ids.
        loss_mask: (B, T) 1 for tokens that count (the prompt), 0 for padding / tokens outside the scope.

    Returns:
        (B, T-1) NLL of token t+1 given tokens <= t, zero where ``loss_mask[:, 1:]`` is 0. Computed in float32
        whatever the logits' dtype (bf16 logits lose too much precision in log-softmax).
    """
    # Row by row: a (T, V) slice of one row is contiguous, so no (B, T, V) copy or log-softmax of the whole batch is
    # ever materialised next to the logits (with a 128k vocabulary that copy would dwarf the model's activations).
    shift_ids = input_ids[:, 1:]
    nll = torch.stack(
        [F.cross_entropy(logits[b, :-1, :].float(), shift_ids[b], reduction="none") for b in range(logits.size(0))]
    )
    return masked_nll(nll, loss_mask)


def masked_nll(nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``nll`` (B, T-1) with the positions outside ``loss_mask[:, 1:]`` set to exactly 0 (even where nll is NaN)."""
    keep = loss_mask[:, 1:].bool()
    return torch.where(keep, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))


def masked_log_perplexity(nll: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`log_perplexity` from per-position NLLs (B, T-1) already computed (e.g. with a shared prefix)."""
    nll = masked_nll(nll, loss_mask)
    n_predicted = loss_mask[:, 1:].sum(dim=-1).to(nll.dtype)
    return nll.sum(dim=-1) / n_predicted.clamp(min=1), n_predicted


def log_perplexity(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample log-perplexity log P(x) = mean token NLL over the counted, predicted tokens.

    Returns:
        ``(log_ppl, n_predicted)``: both (B,); ``log_ppl`` keeps the graph of ``logits``. A sample with no
        predicted token (a prompt of one token) gets log_ppl 0 and n_predicted 0.
    """
    return masked_log_perplexity(token_nll(logits, input_ids, loss_mask), loss_mask)


def selection_score(log_ppl: torch.Tensor, lam: float, log_p0: float) -> torch.Tensor:
    """S(x) = lambda * exp(log P(x) - log P0) * 1[log P(x) > log P0] (paper Eq. 6), detached.

    Args:
        log_ppl: (B,) log-perplexities.

    Returns:
        (B,) float32 weights; 0 for prompts at or below the threshold.
    """
    log_ppl = log_ppl.detach().float()
    score = lam * torch.exp(log_ppl - log_p0)
    return torch.where(log_ppl > log_p0, score, torch.zeros_like(score))


def tlm_loss(log_ppl: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch loss = sum_i S(x_i) * log P(x_i) / (number of selected samples in the batch).

    Args:
        log_ppl: (B,) log-perplexities with gradient.
        weights: (B,) detached selection weights (0 = not selected).

    Returns:
        Scalar loss; exactly 0 (still attached to the graph) when nothing in the batch is selected.
    """
    weights = weights.detach().to(log_ppl.dtype)
    selected = (weights > 0).sum().clamp(min=1)
    return (weights * log_ppl).sum() / selected
