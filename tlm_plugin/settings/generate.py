"""Settings of the generate source (TT-SI / TT-D / TT-ICL, Acikgoz et al., 2025): who writes the examples, how."""

import os
from dataclasses import dataclass
from typing import Literal

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class GenerateArguments(SettingsGroup):
    purpose = "tlm_selector: generate"

    tlm_generator: str = setting(
        "self",
        "tlm_selector: generate: who writes the examples. self (TT-SI: the model being adapted, in its starting state), a local model folder or hub id (TT-D: loaded once), or an OpenAI-compatible endpoint URL http://host:port/v1 (llamafactory-cli api, vLLM, a hosted API; key from tlm_generate_api_key_env).",
    )
    tlm_generate_k: int = setting(
        1,
        "Examples written per flagged prompt (TT-SI: 1).",
        low=1,
    )
    tlm_generate_temperature: float = setting(
        0.7,
        "Sampling temperature of the generator.",
        low=0,
    )
    tlm_generate_top_p: float = setting(
        0.95,
        "Nucleus sampling top-p of the generator.",
        low=0,
        low_open=True,
        high=1,
    )
    tlm_generate_max_tokens: int = setting(
        512,
        "Tokens the generator may write per prompt.",
        low=1,
    )
    tlm_generate_prompt: str | None = setting(
        None,
        "A text file with the generation prompt ({prompt}: the test prompt, {k}: tlm_generate_k). The reply is parsed as '### Example N / Input: ... / Output: ...' blocks. Default: a prompt of ours.",
    )
    tlm_generate_model: str | None = setting(
        None,
        "Endpoint generators: the model name (default: the first one it lists).",
    )
    tlm_generate_api_key_env: str = setting(
        "OPENAI_API_KEY",
        "Endpoint generators: environment variable holding the key.",
    )
    tlm_generate_use: Literal["train", "icl"] = setting(
        "train",
        "train (TT-SI / TT-D): SFT on the examples' answers for tlm_prompt_epochs, then answer. icl (TT-ICL): no training; the examples become demonstrations in the prompt.",
    )

    def check_group(self) -> None:
        if self.tlm_generate_prompt is not None:
            if not os.path.isfile(self.tlm_generate_prompt):
                raise TLMConfigError(f"tlm_generate_prompt: {self.tlm_generate_prompt!r} is not a file.")
            with open(self.tlm_generate_prompt, encoding="utf-8") as f:
                if "{prompt}" not in f.read():
                    raise TLMConfigError(f"tlm_generate_prompt {self.tlm_generate_prompt!r} has no {{prompt}} slot.")
        generator = self.tlm_generator
        if generator != "self" and not generator.startswith(("http://", "https://")):
            hub_id = generator.count("/") == 1 and not generator.startswith((".", "/", "~"))
            if not hub_id and not os.path.isdir(os.path.expanduser(generator)):
                raise TLMConfigError(
                    f"tlm_generator: {generator!r} is neither self, an endpoint URL (http://host:port/v1), an "
                    "existing model folder nor a hub id (org/name)."
                )
