"""The ``tlm_*`` settings of ``stage: tlm``: one class composed of the groups beside their methods, and its parser.

Keys stay flat in a recipe (``tlm_selector: sift``, ``tlm_sift_budget: 50``); each group lives in
:mod:`tlm_plugin.settings` and checks its own values (ranges in each field's metadata, choices from its ``Literal``).
Which settings do nothing in a run follows from :mod:`tlm_plugin.registry`: the groups neither the mode nor the method
reads, and the fields each group says it does not use. A setting the recipe gives that does nothing is refused
(``check_given``), or dropped with one warning when a command-line override switched the run (see
:func:`tlm_plugin.patch.split_args`).
"""

import difflib
import types
import typing
import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

from tlm_plugin import registry
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.settings.base import check_field, literal_choices
from tlm_plugin.settings.core import CoreArguments
from tlm_plugin.settings.demos import DemoArguments
from tlm_plugin.settings.gate import GateArguments
from tlm_plugin.settings.generate import GenerateArguments
from tlm_plugin.settings.objectives import ObjectiveArguments
from tlm_plugin.settings.per_prompt import PerPromptArguments
from tlm_plugin.settings.pool import PoolArguments
from tlm_plugin.settings.selection import SelectionArguments
from tlm_plugin.settings.serve import ServeArguments


__all__ = ["TLM_PREFIX", "TLMArguments", "TLMConfigError", "inert_keys", "parse_tlm_args", "tlm_field_names"]

TLM_PREFIX = "tlm_"
# Every settings group, by the name the registry's modes and methods use for it (a new group: one entry here).
GROUPS = {
    "core": CoreArguments,
    "selection": SelectionArguments,
    "per_prompt": PerPromptArguments,
    "gate": GateArguments,
    "pool": PoolArguments,
    "generate": GenerateArguments,
    "demos": DemoArguments,
    "objectives": ObjectiveArguments,
    "serve": ServeArguments,
}


@dataclass
class TLMArguments(*reversed(GROUPS.values())):  # fields in GROUPS order: core first
    r"""Arguments of test-time learning (Hu et al., "Test-Time Learning for Large Language Models", ICML 2025)."""

    # Set by the recipe parser (not settings): the prediction keys taken from the sft part, and the output_dir of
    # a finished run this command would repeat.
    predict = (False, None)
    finished_in = None

    def __post_init__(self) -> None:
        if self.tlm_reset == "prompt":  # the former spelling of the per-prompt mode
            warnings.warn(
                "tlm_reset: prompt is the former spelling of tlm_mode: per_prompt; use tlm_mode: per_prompt.",
                FutureWarning,
                stacklevel=2,
            )
            if self.tlm_mode == "online":  # the former spelling of a gate calibrated over the prompts seen so far
                self.tlm_gate_stream = True
            self.tlm_mode, self.tlm_reset = "per_prompt", "never"
        for f in fields(self):
            check_field(f, getattr(self, f.name))
        if self.tlm_mode not in registry.MODES:
            raise TLMConfigError(f"tlm_mode must be one of {', '.join(registry.MODES)}; got {self.tlm_mode!r}.")
        if self.tlm_selector not in registry.METHODS:
            raise TLMConfigError(
                f"tlm_selector must be one of {', '.join(registry.METHODS)}; got {self.tlm_selector!r}."
            )
        for group in GROUPS.values():
            group.check_group(self)
        self._check_combination()

    def _check_combination(self) -> None:
        """Settings that contradict each other (refused even when each value is valid)."""
        mode, selector = self.tlm_mode, self.tlm_selector
        if registry.impl(selector, mode) is None:
            works_in = " or ".join(f"tlm_mode: {m}" for m in registry.modes_of(selector))
            raise TLMConfigError(f"tlm_selector: {selector} works in {works_in}, not in tlm_mode: {mode}.")
        if self.tlm_reset == "chunk" and mode != "online":
            raise TLMConfigError("tlm_reset: chunk only applies to tlm_mode: online.")
        if mode != "per_prompt" and self.tlm_gate != "none":
            raise TLMConfigError(
                f"tlm_gate: {self.tlm_gate} decides which prompts learn in tlm_mode: per_prompt; set tlm_mode: "
                "per_prompt."
            )
        if self.tlm_objective != "perplexity":
            if mode == "per_prompt":
                raise TLMConfigError(
                    "tlm_mode: per_prompt trains on each prompt's own rows; use tlm_objective: perplexity."
                )
            if self.kind == "pool":
                raise TLMConfigError(
                    f"tlm_objective: {self.tlm_objective} learns from the test prompts themselves; tlm_selector: "
                    f"{selector} picks pool rows. Use tlm_selector perplexity, all or random."
                )
        if self.tlm_eata_fisher_coeff > 0 and self.tlm_objective != "eata":
            raise TLMConfigError("tlm_eata_fisher_coeff only applies to tlm_objective: eata.")

    # ------------------------------------------------------------------ what the run uses
    @property
    def kind(self) -> str:
        """The chosen method's kind in the chosen mode: ``weights``, ``pool`` or ``source``."""
        return registry.method_kind(self.tlm_selector, self.tlm_mode)

    @property
    def per_prompt(self) -> bool:
        return self.tlm_mode == "per_prompt"

    @property
    def pool_based(self) -> bool:
        """Whether the run learns from pool rows picked by embedding (for all prompts, or per prompt)."""
        return self.kind == "pool"

    def used_groups(self) -> set[str]:
        mode = registry.MODES[self.tlm_mode]
        return {*mode.settings, *registry.impl(self.tlm_selector, self.tlm_mode).settings}

    def inert_settings(self) -> dict[str, str]:
        """The ``tlm_*`` settings that do nothing in this run, with the reason."""
        used = self.used_groups()
        inert: dict[str, str] = {}
        for name, group in GROUPS.items():
            if name not in used:
                for f in group.own_fields():
                    inert[f.name] = f"it configures {group.purpose}"
            else:
                inert.update(group.inert_fields(self))
        return inert

    def check_given(self, given: set[str]) -> None:
        """Refuse settings the user gave that would do nothing in the chosen mode / selector / objective.

        A default left alone is fine; a value written in the recipe that the run would ignore is a mistake the
        user should hear about before the model loads.
        """
        inert = self.inert_settings()
        for key in sorted(given):
            if key in inert:
                raise TLMConfigError(
                    f"{key} has no effect in this run ({inert[key]}; this run has {self.describe()}). Remove it "
                    "from the recipe."
                )

    def describe(self) -> str:
        return f"tlm_mode: {self.tlm_mode}, tlm_selector: {self.tlm_selector}, tlm_objective: {self.tlm_objective}" + (
            f", tlm_reset: {self.tlm_reset}" if self.tlm_reset != "never" else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def method_settings(self) -> types.SimpleNamespace:
        """The settings of the chosen method's own groups only (what a per-prompt data source receives)."""
        found = registry.impl(self.tlm_selector, self.tlm_mode)
        names = [f.name for group in found.settings for f in GROUPS[group].own_fields()]
        return types.SimpleNamespace(**{name: getattr(self, name) for name in names})


_FIELDS = {f.name: f for f in fields(TLMArguments)}


def tlm_field_names() -> list[str]:
    return list(_FIELDS)


def unknown_key_error(key: str) -> TLMConfigError:
    hint = difflib.get_close_matches(key, tlm_field_names(), n=1)
    suggestion = f" Did you mean {hint[0]}?" if hint else ""
    return TLMConfigError(
        f"Unknown stage-tlm setting {key!r}.{suggestion} Valid tlm_* keys: {', '.join(tlm_field_names())}."
    )


def nullable(key: str) -> bool:
    """Whether ``key`` takes null as a value (else a command-line null removes the setting)."""
    annotation = _FIELDS[key].type
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _convert(key: str, raw: Any) -> Any:
    """A value of the field's type from a YAML value or a command-line string; a clear error naming ``key``."""
    f = _FIELDS[key]
    annotation = f.type
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )
    if optional:
        annotation = args[0]
    if isinstance(raw, str) and raw.strip().lower() in ("none", "null", "") and optional:
        return None
    if raw is None:
        if optional:
            return None
        raise TLMConfigError(
            f"{key} cannot be null: {_describe(annotation, key)} is required (default: {f.default!r})."
        )
    if typing.get_origin(annotation) is Literal or annotation is str:
        if not isinstance(raw, str):
            raise TLMConfigError(f"{key} must be {_describe(annotation, key)}, got {raw!r}.")
        return raw
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise TLMConfigError(f"{key} must be true or false, got {raw!r}.")
    if annotation is int:
        value = raw
        if isinstance(raw, str):
            try:
                value = float(raw.strip()) if any(c in raw for c in ".eE") else int(raw.strip())
            except ValueError:
                raise TLMConfigError(f"{key} must be an integer, got {raw!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise TLMConfigError(f"{key} must be an integer, got {raw!r}.")
        return int(value)
    if annotation is float:
        if isinstance(raw, bool):
            raise TLMConfigError(f"{key} must be a number, got {raw!r}.")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise TLMConfigError(f"{key} must be a number, got {raw!r}.") from None
    raise AssertionError(f"unhandled annotation {annotation!r} of {key}")


REGISTERED = {"tlm_mode": registry.MODES, "tlm_selector": registry.METHODS}  # choices kept by the registry


def _describe(annotation: Any, key: str = "") -> str:
    choices = tuple(REGISTERED[key]) if key in REGISTERED else literal_choices(annotation)
    if choices is not None:
        return "one of " + ", ".join(map(str, choices))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "a value")


def _build(values: dict[str, Any]) -> TLMArguments:
    for key in values:
        if key not in _FIELDS:
            raise unknown_key_error(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation is warned once, by parse_tlm_args
        return TLMArguments(**{key: _convert(key, value) for key, value in values.items()})


def parse_tlm_args(values: dict[str, Any], switched: set[str] | None = None) -> TLMArguments:
    """Build :class:`TLMArguments` from ``tlm_*`` values; strings (command-line flags) are converted by type.

    ``switched``: keys of ``values`` that only do nothing because a command-line override changed the mode,
    selector or objective (:func:`switch_inert_keys`); they are dropped, every other inert key is refused.
    """
    if values.get("tlm_reset") == "prompt":
        warnings.warn(
            "tlm_reset: prompt is the former spelling of tlm_mode: per_prompt; use tlm_mode: per_prompt.",
            FutureWarning,
            stacklevel=2,
        )
    values = {k: v for k, v in values.items() if k not in (switched or set())}
    args = _build(values)
    given = set(values) - ({"tlm_reset"} if values.get("tlm_reset") == "prompt" else set())
    args.check_given(given)
    return args


def inert_keys(values: dict[str, Any]) -> set[str]:
    """The keys of a recipe's ``tlm_*`` values that would have no effect (to drop settings a layered recipe
    inherited from a base recipe written for another method)."""
    tlm_values = {k: v for k, v in values.items() if k.startswith(TLM_PREFIX) and k in _FIELDS}
    return set(_build(tlm_values).inert_settings()) & set(tlm_values)


SWITCH_KEYS = ("tlm_mode", "tlm_selector", "tlm_objective", "tlm_reset", "tlm_gate", "tlm_generate_use")


def switch_inert_keys(recipe: dict[str, Any], overrides: dict[str, Any]) -> set[str]:
    """The recipe's own keys that an override of :data:`SWITCH_KEYS` made inert (they did something without the
    override). Keys inert under the recipe's own settings are not among them: those stay refused."""
    if not any(key in SWITCH_KEYS for key in overrides):
        return set()
    try:
        before = inert_keys(recipe)
    except TLMConfigError:
        before = set()
    merged = {**recipe, **overrides}
    after = inert_keys(merged)
    return {key for key in after - before if key in recipe and key not in overrides}
