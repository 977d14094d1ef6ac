"""Which prompts learn and with which weight: TLM's S(x) (Hu et al., ICML 2025, Eq. 6) and its controls."""

from dataclasses import dataclass

from tlm_plugin.registry import method_kind
from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class SelectionArguments(SettingsGroup):
    """``tlm_selector`` names one entry of :data:`tlm_plugin.registry.METHODS`; lambda and P0 are TLM's."""

    purpose = "the selection of prompts"

    tlm_selector: str = setting(
        "perplexity",
        "Which prompts to learn from and with which weight. perplexity: TLM's S(x). all: every prompt with weight 1. random: as many prompts as `perplexity` would pick, chosen at random, weight 1 (the two controls of the paper's ablation; in tlm_mode: per_prompt, `tlm_sift_budget` random pool rows). sift / nearest: pick `tlm_sift_budget` rows of a pool (the test set, or `tlm_pool_dataset`) by embedding: SIFT (Hübotter et al., ICLR 2025) or nearest-neighbour retrieval.",
    )
    tlm_lambda: float = setting(
        0.1,
        "lambda of the selection score S(x) = lambda * exp(log P(x) - log P0) (paper Eq. 6).",
        low=0,
        low_open=True,
    )
    tlm_log_p0: float = setting(
        3.0,
        "Perplexity threshold in log space: prompts with log-perplexity <= tlm_log_p0 are skipped (3.0 means P0 = e^3, the paper's value).",
        finite=True,
    )
    tlm_select_fraction: float | None = setting(
        None,
        "Calibrated threshold: set P0 so that this fraction of prompts is selected (offline: the (1 - fraction) quantile of the scored log-perplexities; online: the same quantile over the prompts seen so far). Overrides tlm_log_p0.",
        low=0,
        low_open=True,
        high=1,
    )

    def inert_fields(self) -> dict[str, str]:
        kind = method_kind(self.tlm_selector, self.tlm_mode)
        weights = kind == "weights"  # perplexity / all / random over the test prompts themselves
        pool_subset = kind == "pool" and self.tlm_mode == "offline"  # picked rows weighted lambda * exp(...)
        gate_p0 = getattr(self, "tlm_gate", None) == "perplexity" and getattr(self, "tlm_gate_fraction", 0) is None
        gate_p0 = gate_p0 and self.tlm_mode == "per_prompt"
        inert = {}
        if not (weights and self.tlm_selector in ("perplexity", "random")):
            inert["tlm_select_fraction"] = "it calibrates P0 of tlm_selector perplexity / random"
        if not (weights and self.tlm_selector in ("perplexity", "random")) and not pool_subset and not gate_p0:
            inert["tlm_log_p0"] = (
                "it sets the threshold P0 of tlm_selector perplexity / random (and the weights of pool rows picked "
                "for all prompts, and the perplexity gate)"
            )
        if self.tlm_select_fraction is not None and not pool_subset and not gate_p0:
            inert["tlm_log_p0"] = "tlm_select_fraction calibrates P0 and replaces it"
        if self.tlm_selector != "perplexity" and not pool_subset:
            inert["tlm_lambda"] = "it scales S(x) of tlm_selector: perplexity (all and random weigh every row 1)"
        return inert
