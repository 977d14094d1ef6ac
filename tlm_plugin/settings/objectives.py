"""Settings of what a test-time update minimises: TLM's perplexity, or the entropy baselines (Tent, EATA, COME)."""

from dataclasses import dataclass
from typing import Literal

from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class ObjectiveArguments(SettingsGroup):
    purpose = "the objective of the updates"

    tlm_objective: Literal["perplexity", "tent", "eata", "come"] = setting(
        "perplexity",
        "What a test-time update minimises. perplexity: TLM (weighted input log-perplexity). tent: entropy of the model's next-token distributions over `tlm_entropy_tokens` greedily generated tokens (Wang et al., ICLR 2021). eata: the same entropy on reliable samples only (H < E0), weighted by exp(E0 - H) (Niu et al., ICML 2022). come: entropy of a Dirichlet opinion with an uncertainty mass, with logit-norm conservation (Zhang et al., ICLR 2025). See docs/objectives.md.",
    )
    tlm_entropy_tokens: int = setting(
        80,
        "tent / eata / come: number of tokens generated per prompt whose entropy is minimised.",
        low=1,
    )
    tlm_eata_e0: float = setting(
        0.4,
        "EATA's entropy margin E0, in the unit of `tlm_eata_e0_scale` (EATA: 0.4 * ln C).",
        low=0,
        low_open=True,
    )
    tlm_eata_e0_scale: Literal["ln_vocab", "nats"] = setting(
        "ln_vocab",
        "ln_vocab (EATA's own definition): E0 = tlm_eata_e0 * ln(vocabulary size). nats: E0 = tlm_eata_e0 as an absolute entropy (the TLM paper's literal 'E0 = 0.4').",
    )
    tlm_eata_fisher_coeff: float = setting(
        0.0,
        "EATA's anti-forgetting term beta * sum F (theta - theta0)^2 over the trainable weights (0: off; EATA uses 2000). F is the diagonal Fisher of the model's own greedy answers (pseudo-label cross-entropy) on the first `tlm_eata_fisher_samples` prompts, before any update.",
        low=0,
    )
    tlm_eata_fisher_samples: int = setting(
        32,
        "Prompts used to estimate EATA's Fisher (with tlm_eata_fisher_coeff > 0).",
        low=1,
    )

    def inert_fields(self) -> dict[str, str]:
        if self.tlm_objective == "perplexity":
            keys = ("tlm_entropy_tokens", "tlm_eata_e0", "tlm_eata_e0_scale", "tlm_eata_fisher_samples")
            return {key: "it configures the entropy objectives (tlm_objective tent / eata / come)" for key in keys}
        if self.tlm_objective != "eata":
            keys = ("tlm_eata_e0", "tlm_eata_e0_scale", "tlm_eata_fisher_samples")
            return {key: "it configures tlm_objective: eata" for key in keys}
        return {}
