"""Invertible augmentations of demonstrations and answers (``tlm_demo_augment``), and the vote over augmented answers.

An augmentation maps a text to a text (``forward(text, seed)``) and back (``inverse(text, seed)``); either returns
None where it does not apply (a text that is not a grid, an answer that does not parse). ``seed`` comes from the
task, so every demonstration, the test input and the answers of one task see the same colour permutation.

Registered names (compose with ``+``, applied left to right; ``rot90+colors`` rotates, then recolours):

- ``rot90``, ``rot180``, ``rot270``, ``flip_h``, ``flip_v``, ``transpose``, ``transpose_anti``: the seven symmetries
  of the square besides the identity, on grids (see :mod:`tlm_plugin.grids`); ``dihedral`` names all seven;
- ``colors``: a permutation of the colours 1-9 seeded by the task, 0 (the background) kept;
- ``module.path:forward:inverse``: a user's own pair of functions ``(text, seed) -> str | None`` (text tasks).

:func:`register_augmentation` adds a name. :func:`hierarchical_vote` is the vote of augmented inference: within each
augmentation, then across them.
"""

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tlm_plugin import grids
from tlm_plugin.errors import TLMConfigError


TextMap = Callable[[str, int], "str | None"]
IDENTITY = "identity"
ALIASES = {"dihedral": tuple(grids.DIHEDRAL)}
TOP_PER_AUGMENTATION = 3  # candidates each augmentation nominates (marc's hierarchical vote keeps three)


@dataclass(frozen=True)
class Augmentation:
    """An invertible text transformation: ``inverse(forward(x, s), s) == x`` wherever ``forward`` applies."""

    name: str
    forward: TextMap
    inverse: TextMap


AUGMENTATIONS: dict[str, Augmentation] = {}


def register_augmentation(name: str, forward: TextMap, inverse: TextMap, replace: bool = False) -> Augmentation:
    """Register ``name`` for ``tlm_demo_augment``."""
    if not name or any(c in name for c in "+,: "):
        raise ValueError(f"an augmentation name must be non-empty without '+', ',', ':' or spaces, got {name!r}")
    if name in AUGMENTATIONS and not replace:
        raise ValueError(f"augmentation {name!r} is already registered (pass replace=True)")
    AUGMENTATIONS[name] = Augmentation(name, forward, inverse)
    return AUGMENTATIONS[name]


def _on_grids(transform: Callable[[grids.Grid], grids.Grid]) -> TextMap:
    def apply(text: str, seed: int) -> str | None:
        grid = grids.parse_grid(text)
        return None if grid is None else grids.format_grid(transform(grid), grids.separator_of(text))

    return apply


def _recolour(invert: bool) -> TextMap:
    def apply(text: str, seed: int) -> str | None:
        grid = grids.parse_grid(text)
        if grid is None:
            return None
        mapping = grids.colour_permutation(seed)
        if invert:
            mapping = grids.inverse_permutation(mapping)
        return grids.format_grid(grids.recolour(grid, mapping), grids.separator_of(text))

    return apply


for _name, (_forward, _inverse) in grids.DIHEDRAL.items():
    register_augmentation(_name, _on_grids(_forward), _on_grids(_inverse))
register_augmentation("colors", _recolour(False), _recolour(True))


def _compose(parts: list[Augmentation]) -> Augmentation:
    if len(parts) == 1:
        return parts[0]

    def forward(text: str, seed: int) -> str | None:
        for part in parts:
            text = part.forward(text, seed)
            if text is None:
                return None
        return text

    def inverse(text: str, seed: int) -> str | None:
        for part in reversed(parts):
            text = part.inverse(text, seed)
            if text is None:
                return None
        return text

    return Augmentation("+".join(p.name for p in parts), forward, inverse)


def _user_pair(entry: str) -> Augmentation:
    module_name, forward_name, inverse_name = entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TLMConfigError(f"tlm_demo_augment {entry!r}: cannot import {module_name!r}: {err}") from None
    found = []
    for attribute in (forward_name, inverse_name):
        function = getattr(module, attribute, None)
        if not callable(function):
            raise TLMConfigError(f"tlm_demo_augment {entry!r}: {module_name} has no function {attribute!r}")
        found.append(function)
    return Augmentation(entry, found[0], found[1])


def _one(part: str, entry: str) -> list[Augmentation]:
    if part in AUGMENTATIONS:
        return [AUGMENTATIONS[part]]
    if part.count(":") == 2:
        return [_user_pair(part)]
    valid = ", ".join([*AUGMENTATIONS, *ALIASES])
    raise TLMConfigError(
        f"tlm_demo_augment: unknown augmentation {part!r} in {entry!r}; registered: {valid}, "
        "or module.path:forward:inverse for your own pair of functions"
    )


def names(spec: str | Iterable[str] | None) -> list[str]:
    """The entries of ``tlm_demo_augment`` (a comma-separated string or a list), aliases expanded, no repeats."""
    if spec is None:
        return []
    entries = spec.split(",") if isinstance(spec, str) else [str(e) for e in spec]
    out: list[str] = []
    for entry in (e.strip() for e in entries):
        if not entry or entry in (IDENTITY, "none"):
            continue
        expanded = list(ALIASES[entry]) if entry in ALIASES else [entry]
        out.extend(e for e in expanded if e not in out)
    return out


def resolve(spec: str | Iterable[str] | None) -> list[Augmentation]:
    """The augmentations ``tlm_demo_augment`` names, in order (the identity is not among them: it is always used);
    a TLMConfigError naming an unknown entry, or a user function that cannot be imported."""
    out = []
    for entry in names(spec):
        parts = [p.strip() for p in entry.split("+")]
        if any(p in ALIASES for p in parts):
            raise TLMConfigError(f"tlm_demo_augment {entry!r}: an alias ({', '.join(ALIASES)}) cannot be composed")
        out.append(_compose([a for p in parts for a in _one(p, entry)]))
    return out


def hierarchical_vote(
    answers: list[tuple[str, str | None]], top: int = TOP_PER_AUGMENTATION
) -> tuple[list[dict], dict[str, int]]:
    """The vote of augmented inference over ``answers``: (augmentation name, answer mapped back by its inverse, or
    None for an abstention), in the order they were generated, the identity's first.

    Within each augmentation, its answers are counted and the ``top`` most frequent (ties: the earliest) are its
    nominations. Across augmentations, candidates rank by the number of augmentations that nominate them, then by
    their votes in all, then by their votes under the identity (ties favour it), then by first appearance. Returns the
    ranked candidates (``answer``, ``nominations``, ``votes``, ``identity_votes``; the winner first) and the
    abstentions per augmentation.
    """
    by_augmentation: dict[str, list[str]] = {}
    abstained: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for position, (name, answer) in enumerate(answers):
        by_augmentation.setdefault(name, [])
        if answer is None:
            abstained[name] = abstained.get(name, 0) + 1
            continue
        by_augmentation[name].append(answer)
        first_seen.setdefault(answer, position)
    nominations: dict[str, int] = {}
    votes: dict[str, int] = {}
    for given in by_augmentation.values():
        counts: dict[str, int] = {}
        for answer in given:
            counts[answer] = counts.get(answer, 0) + 1
            votes[answer] = votes.get(answer, 0) + 1
        ranked = sorted(counts, key=lambda a: (-counts[a], first_seen[a]))
        for answer in ranked[:top]:
            nominations[answer] = nominations.get(answer, 0) + 1
    identity = by_augmentation.get(IDENTITY, [])
    candidates = [
        {
            "answer": answer,
            "nominations": nominations.get(answer, 0),
            "votes": votes[answer],
            "identity_votes": identity.count(answer),
        }
        for answer in votes
    ]
    candidates.sort(key=lambda c: (-c["nominations"], -c["votes"], -c["identity_votes"], first_seen[c["answer"]]))
    return candidates, abstained
