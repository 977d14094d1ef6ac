"""The TLM loss and score against a direct computation on a tiny random Llama."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tlm_plugin.train.loss import log_perplexity, selection_score, tlm_loss


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def direct_log_ppl(model, ids: list[int]) -> float:
    """Mean NLL of tokens 2..T given their prefix, one token at a time from log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    return sum(nll) / len(nll)


def test_log_perplexity_matches_direct_computation_with_right_padding(model):
    seqs = [[5, 17, 42, 99, 7, 3], [11, 12, 13], [200, 201, 202, 203, 204, 205, 206, 207]]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    log_ppl, n_predicted = log_perplexity(logits, ids, mask)
    for i, s in enumerate(seqs):
        assert n_predicted[i].item() == len(s) - 1
        assert log_ppl[i].item() == pytest.approx(direct_log_ppl(model, s), abs=1e-4)


def test_selection_score_is_eq6_and_zero_at_or_below_threshold():
    log_ppl = torch.tensor([2.0, 3.0, 3.5, 5.0])
    s = selection_score(log_ppl, lam=0.1, log_p0=3.0)
    assert s[0] == 0 and s[1] == 0  # P(x) <= P0 is skipped
    assert s[2].item() == pytest.approx(0.1 * math.exp(0.5))
    assert s[3].item() == pytest.approx(0.1 * math.exp(2.0))


def test_selection_score_is_detached():
    log_ppl = torch.tensor([4.0, 5.0], requires_grad=True)
    assert not selection_score(log_ppl, 0.1, 3.0).requires_grad


def test_tlm_loss_divides_by_number_selected_and_unselected_get_no_gradient():
    log_ppl = torch.tensor([4.0, 2.0, 6.0], requires_grad=True)
    weights = selection_score(log_ppl, 0.1, 3.0)
    loss = tlm_loss(log_ppl, weights)
    expected = (0.1 * math.exp(1.0) * 4.0 + 0.1 * math.exp(3.0) * 6.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert log_ppl.grad[1].item() == 0.0
    assert log_ppl.grad[0].item() == pytest.approx(0.1 * math.exp(1.0) / 2)


def test_tlm_loss_with_nothing_selected_is_zero():
    log_ppl = torch.tensor([1.0, 2.0], requires_grad=True)
    assert tlm_loss(log_ppl, torch.zeros(2)).item() == 0.0


def test_training_gradient_equals_direct_weighted_log_ppl_gradient(model):
    """The loss on a batch equals sum_i S(x_i) log P(x_i) / n_selected with S from the same model, detached."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask).logits
    log_ppl, _ = log_perplexity(logits, ids, mask)
    weights = selection_score(log_ppl, 0.1, 0.0)
    loss = tlm_loss(log_ppl, weights)
    direct = [direct_log_ppl(model, row.tolist()) for row in ids]
    expected = sum(0.1 * math.exp(lp) * lp for lp in direct) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
