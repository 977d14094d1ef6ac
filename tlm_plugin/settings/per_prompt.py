"""Settings of per-prompt learning: how many passes and what schedule each prompt's own update takes."""

from dataclasses import dataclass

from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class PerPromptArguments(SettingsGroup):
    purpose = "per-prompt learning (tlm_mode: per_prompt)"

    tlm_prompt_epochs: int = setting(
        1,
        "Passes over each prompt's training rows (SIFT: 1, one step per pick; TT-SI: 5). Batches of per_device_train_batch_size, one optimizer step per gradient_accumulation_steps.",
        low=1,
    )
    tlm_prompt_warmup_steps: int = setting(
        0,
        "Warm-up steps of each prompt's own LR schedule (the recipe's warmup_ratio / warmup_steps are for whole "
        "runs: over a prompt's few steps they would start it at a learning rate of 0). Default 0: no warm-up.",
        low=0,
    )

    def inert_fields(self) -> dict[str, str]:
        if getattr(self, "tlm_selector", None) == "generate" and getattr(self, "tlm_generate_use", "") == "icl":
            return {
                "tlm_prompt_epochs": "tlm_generate_use: icl does not train",
                "tlm_prompt_warmup_steps": "tlm_generate_use: icl does not train",
            }
        return {}
