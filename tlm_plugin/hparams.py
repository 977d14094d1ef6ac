"""The ``tlm_*`` settings of ``stage: tlm`` (one dataclass, parsed apart from LLaMA-Factory's own arguments)."""

import difflib
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
            "(the two controls of the paper's ablation)."
        },
    )
    tlm_chunk_size: int = field(
        default=100,
        metadata={"help": "Online mode: number of test prompts answered before the model learns from them."},
    )
    tlm_reset: Literal["never", "chunk"] = field(
        default="never",
        metadata={
            "help": "What is reset between chunks in online mode. never: one adapter, optimizer and LR schedule "
            "across the whole stream. chunk: adapter weights and optimizer state return to their initial values "
            "after every chunk."
        },
    )
    tlm_score_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the no-grad scoring passes (before and after adaptation). "
            "Defaults to per_device_eval_batch_size."
        },
    )

    def __post_init__(self) -> None:
        from tlm_plugin.selectors import SELECTORS

        _check_choice("tlm_mode", self.tlm_mode, ("offline", "online"))
        _check_choice("tlm_reset", self.tlm_reset, ("never", "chunk"))
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
    if typing.get_origin(annotation) is typing.Union and args:
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
