"""``docs/options.md``, generated from the settings themselves: each group's fields with type, default, range and help.

    python -m tlm_plugin.settings.reference > docs/options.md

``tests/test_docs.py`` fails when the page and the fields disagree, so the page is never older than the code.
"""

import dataclasses
import sys
import typing

from tlm_plugin import registry
from tlm_plugin.hparams import GROUPS, REGISTERED
from tlm_plugin.settings.base import literal_choices


HEADER = """# Options of `stage: tlm`

Every `tlm_*` key, by the group that reads it. Keys are flat in a recipe (`tlm_selector: sift`) and on the command
line (`tlm_selector=sift`). A wrong key or value is refused before the model loads, with the key named (and the
nearest valid key suggested); a key the recipe sets that does nothing in the chosen mode and method is refused too,
except when a command-line override switched the mode or method, where it is dropped with one warning. An override
of `null` removes a key that cannot be null (its default applies).

This page is generated from the fields' help texts (`python -m tlm_plugin.settings.reference > docs/options.md`).
"""


def _type(field: dataclasses.Field) -> str:
    if field.name in REGISTERED:
        return " \\| ".join(f"`{name}`" for name in REGISTERED[field.name])
    choices = literal_choices(field.type)
    annotation = field.type
    optional = type(None) in typing.get_args(annotation)
    if choices is not None:
        text = " \\| ".join(f"`{c}`" for c in choices)
    else:
        base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        text = getattr(base[0], "__name__", str(base[0]))
    return text + (" or null" if optional else "")


def _range(field: dataclasses.Field) -> str:
    low, high = field.metadata.get("low"), field.metadata.get("high")
    parts = []
    if low is not None:
        parts.append(f"{'>' if field.metadata.get('low_open') else '>='} {low}")
    if high is not None:
        parts.append(f"<= {high}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_markdown() -> str:
    lines = [HEADER]
    lines.append("## Modes (`tlm_mode`)\n")
    for mode in registry.MODES.values():
        command = f" (`llamafactory-cli {mode.command}`)" if mode.command != "train" else ""
        lines.append(f"- `{mode.name}`{command}: {mode.help}")
    lines.append("\n## Methods (`tlm_selector`)\n")
    lines.append("| method | modes | what it does |")
    lines.append("|---|---|---|")
    for method in registry.METHODS.values():
        lines.append(f"| `{method.name}` | {', '.join(method.impls)} | {_cell(method.help)} |")
    for name, group in GROUPS.items():
        doc = (group.__doc__ or "").strip().splitlines()[0] if group.__doc__ else ""
        module_doc = (sys.modules[group.__module__].__doc__ or "").strip().splitlines()[0]
        lines.append(f"\n## {name.replace('_', ' ').capitalize()}: {group.purpose}\n")
        lines.append(module_doc if module_doc else doc)
        lines.append("")
        lines.append("| key | type | default | range | what it does |")
        lines.append("|---|---|---|---|---|")
        for field in group.own_fields():
            default = field.default
            shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
            lines.append(
                f"| `{field.name}` | {_type(field)} | `{shown}` | {_range(field)} | "
                f"{_cell(field.metadata.get('help', ''))} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(options_markdown())
