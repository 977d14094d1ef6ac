"""Settings of the per-prompt gate: which prompts learn at all (TT-SI's margin, TLM's perplexity)."""

from dataclasses import dataclass
from typing import Literal

from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class GateArguments(SettingsGroup):
    purpose = "the per-prompt gate (tlm_mode: per_prompt)"

    tlm_gate: Literal["none", "perplexity", "margin"] = setting(
        "none",
        "Per prompt: which prompts learn at all. none: every prompt. perplexity: TLM's S(x) > 0 (log-perplexity above tlm_log_p0). margin: TT-SI's uncertainty, u = p(1) - p(2) of the softmax over the candidate answers' length-normalised log-probabilities; uncertain when u < tlm_gate_tau. Prompts not flagged are answered by the starting adapter.",
    )
    tlm_gate_tau: float = setting(
        0.95,
        "margin gate: uncertain when u < tau (TT-SI: 0.95).",
        low=0,
        high=1,
    )
    tlm_gate_fraction: float | None = setting(
        None,
        "Calibrated gate: flag this fraction of the prompts, the most uncertain (lowest margins / highest log-perplexities): over all prompts, or (tlm_gate_stream) over the prompts seen so far.",
        low=0,
        low_open=True,
        high=1,
    )
    tlm_gate_candidates: int = setting(
        5,
        "margin gate: answers sampled per prompt (one batched call) when the row has no options.",
        low=2,
    )
    tlm_gate_options: str | None = setting(
        None,
        "margin gate: a dataset column holding each row's answer options (a list of strings). Without it, a multiple-choice prompt's lettered options (A., B., ...) are the candidates, else sampled answers.",
    )
    tlm_gate_temperature: float = setting(
        1.0,
        "margin gate: sampling temperature of the candidate answers.",
        low=0,
        low_open=True,
    )
    tlm_gate_max_tokens: int = setting(
        64,
        "margin gate: tokens per sampled candidate.",
        low=1,
    )
    tlm_gate_stream: bool = setting(
        False,
        "With tlm_gate_fraction: calibrate over the prompts seen so far, in dataset order (a running threshold, as "
        "a stream in deployment would), instead of over all prompts.",
    )

    def inert_fields(self) -> dict[str, str]:
        inert = {}
        if self.tlm_gate != "margin":
            for key in (
                "tlm_gate_tau",
                "tlm_gate_candidates",
                "tlm_gate_options",
                "tlm_gate_temperature",
                "tlm_gate_max_tokens",
            ):
                inert[key] = "it configures tlm_gate: margin"
        if self.tlm_gate == "none":
            inert["tlm_gate_fraction"] = "it calibrates tlm_gate perplexity / margin"
        if self.tlm_gate_fraction is None:
            inert["tlm_gate_stream"] = "it sets how tlm_gate_fraction calibrates"
        elif self.tlm_gate_fraction is not None:
            inert["tlm_gate_tau"] = "tlm_gate_fraction calibrates the gate and replaces tau"
        return inert
