"""What every group of ``tlm_*`` settings shares: value checks declared beside each field, and a group's purpose.

A group is a dataclass mixin (LLaMA-Factory's style: ``FinetuningArguments(LoraArguments, FreezeArguments, ...)``);
:class:`tlm_plugin.hparams.TLMArguments` composes them. Each field's ``metadata`` holds its help text and, where a
range applies, ``low`` / ``high`` / ``low_open``; choices come from the ``Literal`` annotation. A group says what it
configures (``purpose``: the reason given when its settings would do nothing in a run) and which of its fields do
nothing although the group is in use (:meth:`SettingsGroup.inert_fields`).
"""

import math
import typing
from dataclasses import Field, field, fields
from typing import Any, ClassVar, Literal

from tlm_plugin.errors import TLMConfigError


class SettingsGroup:
    """Mixin base of a group of ``tlm_*`` fields."""

    purpose: ClassVar[str] = ""

    @classmethod
    def own_fields(cls) -> list[Field]:
        """The fields this group declares itself (not those of other groups)."""
        own = cls.__dict__.get("__annotations__", {})
        return [f for f in fields(cls) if f.name in own]

    def check_group(self) -> None:
        """Checks beyond ranges and choices (files that must exist, patterns that must compile)."""

    def inert_fields(self) -> dict[str, str]:
        """{field: why it does nothing} among this group's fields, when the run uses the group."""
        return {}


def check_field(f: Field, value: Any) -> None:
    """The range and choices declared for field ``f`` (None passes: optional settings)."""
    if value is None:
        return
    choices = literal_choices(f.type)
    if choices is not None and value not in choices:
        raise TLMConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}.")
    low, high, low_open = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("low_open", False)
    if low is None and high is None and not f.metadata.get("finite"):
        return
    if not math.isfinite(value):
        raise TLMConfigError(f"{f.name} must be a finite number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise TLMConfigError(f"{f.name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise TLMConfigError(f"{f.name} must be <= {high}, got {value!r}.")


def literal_choices(annotation: Any) -> tuple | None:
    """The values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def setting(default: Any, help: str, **checks: Any) -> Any:  # noqa: A002 (the metadata key is "help")
    """A dataclass field with its help text and checks (``low``, ``high``, ``low_open``, ``finite``)."""

    return field(default=default, metadata={"help": help, **checks})
