import torch

from tlm_plugin import registry
from tlm_plugin.hparams import TLMArguments
from tlm_plugin.selectors import Selector
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


class Top1(Selector):
    """A method of the tests' own: weight 1 on the most perplexing prompt."""

    def weights(self, log_ppl):
        out = torch.zeros_like(log_ppl)
        out[log_ppl.argmax()] = 1.0
        return out


def test_a_new_method_is_one_class_and_one_registration():
    registry.register_method("test-top1", "the top prompt", offline=registry.Impl("weights", f"{__name__}:Top1"))
    try:
        args = TLMArguments(tlm_selector="test-top1")
        w = build_selector(args).weights(LOG_PPL)
        assert w.tolist().index(1.0) == 4
        # its settings follow from the registration: the pool settings do nothing, lambda too (not perplexity)
        assert "tlm_sift_budget" in args.inert_settings() and "tlm_lambda" in args.inert_settings()
    finally:
        registry.METHODS.pop("test-top1")


def test_selectors_are_built_from_plain_values_only():
    """Weighting and pool selectors take numbers; no constructor takes the run's settings object."""
    import inspect

    for method in registry.METHODS.values():
        for found in method.impls.values():
            if found.kind == "source":
                continue
            cls = registry.load(found.cls)
            init = next(c.__init__ for c in cls.__mro__ if "__init__" in c.__dict__ and not _forwards(c.__init__))
            named = [p.name for p in inspect.signature(init).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
            assert not set(named) & {"run", "tlm_args", "settings", "args", "trainer"}, found.cls
            assert len(named) > 1, found.cls  # self and the plain values


def test_data_sources_receive_only_their_own_settings():
    """A per-prompt source gets the fields of its method's group and nothing else (no P0, no lambda, no run)."""
    args = TLMArguments(tlm_mode="per_prompt", tlm_selector="generate", tlm_generate_k=3)
    view = args.method_settings()
    assert view.tlm_generate_k == 3
    assert all(name.startswith(("tlm_generate", "tlm_generator")) for name in vars(view))
    for foreign in ("tlm_lambda", "tlm_log_p0", "tlm_demo_orders", "tlm_prompt_epochs"):
        assert not hasattr(view, foreign)
    demos = TLMArguments(tlm_mode="per_prompt", tlm_selector="demos").method_settings()
    assert all(name.startswith("tlm_demo_") for name in vars(demos))


def _forwards(init) -> bool:
    """An ``__init__(self, *args, **kwargs)`` that only passes its arguments on to the base class."""
    import inspect

    kinds = {p.kind for p in inspect.signature(init).parameters.values()}
    return inspect.Parameter.VAR_POSITIONAL in kinds
