import torch

from tlm_plugin.hparams import TLMArguments
from tlm_plugin.selectors import SELECTORS, Selector, get_selector, register_selector


LOG_PPL = torch.tensor([1.0, 4.0, 2.5, 3.5, 5.0, 0.5, 3.2, 2.9])


def test_perplexity_selects_above_threshold_with_eq6_weights():
    w = get_selector(TLMArguments(tlm_log_p0=3.0)).weights(LOG_PPL)
    assert torch.equal(w > 0, LOG_PPL > 3.0)
    assert torch.allclose(w[1], 0.1 * torch.exp(torch.tensor(1.0)))


def test_all_selects_everything_with_weight_one():
    w = get_selector(TLMArguments(tlm_selector="all")).weights(LOG_PPL)
    assert torch.equal(w, torch.ones(8))


def test_random_offline_matches_the_perplexity_count_but_not_the_rows():
    picks = set()
    for seed in range(20):
        w = get_selector(TLMArguments(tlm_selector="random"), seed=seed).weights(LOG_PPL)
        assert int((w > 0).sum()) == int((LOG_PPL > 3.0).sum())
        assert set(w.unique().tolist()) <= {0.0, 1.0}
        picks.add(tuple((w > 0).tolist()))
    assert len(picks) > 1  # really random, not the perplexity rule


def test_random_online_follows_the_running_rate():
    selector = get_selector(TLMArguments(tlm_selector="random", tlm_mode="online"), seed=0)
    kept = sum(int(selector.weights(LOG_PPL[i % 8 : i % 8 + 1]).sum()) for i in range(800))
    assert 0.35 < kept / 800 < 0.65  # the rule picks 4 of 8


def test_registry_accepts_a_new_selector():
    @register_selector("test-top1")
    class Top1(Selector):
        def weights(self, log_ppl):
            out = torch.zeros_like(log_ppl)
            out[log_ppl.argmax()] = 1.0
            return out

    try:
        w = get_selector(TLMArguments(tlm_selector="test-top1")).weights(LOG_PPL)
        assert w.tolist().index(1.0) == 4
    finally:
        SELECTORS.pop("test-top1")
