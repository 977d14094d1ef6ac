import torch

from tlm_plugin.hparams import TLMArguments
from tlm_plugin.selectors import SELECTORS, Selector, register_selector
from tlm_plugin.selectors.perplexity import PerplexitySelector, RandomSelector
from tlm_plugin.train.setup import build_selector


LOG_PPL = torch.tensor([1.0, 4.0, 2.5, 3.5, 5.0, 0.5, 3.2, 2.9])


def test_perplexity_selects_above_threshold_with_eq6_weights():
    w = build_selector(TLMArguments(tlm_log_p0=3.0)).weights(LOG_PPL)
    assert torch.equal(w > 0, LOG_PPL > 3.0)
    assert torch.allclose(w[1], 0.1 * torch.exp(torch.tensor(1.0)))


def test_selectors_are_built_from_plain_values():
    w = PerplexitySelector(lam=0.2, log_p0=2.0).weights(LOG_PPL)
    assert torch.allclose(w[4], 0.2 * torch.exp(torch.tensor(3.0)))
    assert int((w > 0).sum()) == int((LOG_PPL > 2.0).sum())


def test_all_selects_everything_with_weight_one():
    w = build_selector(TLMArguments(tlm_selector="all")).weights(LOG_PPL)
    assert torch.equal(w, torch.ones(8))


def test_random_offline_matches_the_perplexity_count_but_not_the_rows():
    picks = set()
    for seed in range(20):
        w = build_selector(TLMArguments(tlm_selector="random"), seed=seed).weights(LOG_PPL)
        assert int((w > 0).sum()) == int((LOG_PPL > 3.0).sum())
        assert set(w.unique().tolist()) <= {0.0, 1.0}
        picks.add(tuple((w > 0).tolist()))
    assert len(picks) > 1  # really random, not the perplexity rule


def test_random_follows_the_calibrated_fraction_too():
    """The control picks as many rows as perplexity would with the same settings, fraction included."""
    for fraction, expected in [(0.25, 2), (0.75, 6)]:
        w = RandomSelector(log_p0=100.0, fraction=fraction, seed=1).weights(LOG_PPL)
        assert int((w > 0).sum()) == expected


def test_random_online_follows_the_running_rate():
    selector = build_selector(TLMArguments(tlm_selector="random", tlm_mode="online"), seed=0)
    kept = sum(int(selector.weights(LOG_PPL[i % 8 : i % 8 + 1]).sum()) for i in range(800))
    assert 0.35 < kept / 800 < 0.65  # the rule picks 4 of 8


def test_selector_state_round_trips_for_resumed_streams():
    a = RandomSelector(fraction=0.5, streaming=True, seed=3)
    for i in range(5):
        a.weights(LOG_PPL[i : i + 2])
    b = RandomSelector(fraction=0.5, streaming=True, seed=99)
    b.load_state_dict(a.state_dict())
    for i in range(5, 7):
        assert torch.equal(a.weights(LOG_PPL[i : i + 2]), b.weights(LOG_PPL[i : i + 2]))
    assert a.log_p0_used == b.log_p0_used


def test_registry_accepts_a_new_selector():
    @register_selector("test-top1")
    class Top1(Selector):
        def weights(self, log_ppl):
            out = torch.zeros_like(log_ppl)
            out[log_ppl.argmax()] = 1.0
            return out

    try:
        w = build_selector(TLMArguments(tlm_selector="test-top1")).weights(LOG_PPL)
        assert w.tolist().index(1.0) == 4
    finally:
        SELECTORS.pop("test-top1")


def test_selectors_package_does_not_import_the_settings():
    import ast
    from pathlib import Path

    import tlm_plugin.selectors as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(name.startswith("tlm_plugin.hparams") for name in names), path.name
