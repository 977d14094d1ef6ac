"""Every way of learning at test time, registered once: the modes (``tlm_mode``) and the methods (``tlm_selector``).

A mode is one module with one entry function (``run(run) -> (rows, stats)``) and the settings groups it reads. A
method names, for each mode it works in, its kind and its class, and the settings group it reads:

- ``weights``: weighs the test prompts themselves by their log-perplexity (TLM's S(x), and the ablation's controls);
- ``pool``: picks rows of a pool by embedding (SIFT, nearest neighbours, random), for all prompts at once (offline)
  or for each prompt (per_prompt);
- ``source``: turns one prompt into its own training rows (generated examples, its demonstrations), per prompt.

Which settings do nothing in a run follows from here: the groups neither the mode nor the method reads (plus what each
group says of its own fields). Entries name their code as ``"module:attribute"``, imported when a run uses them, so
that reading a recipe never imports a training loop. Adding a method: its file, and one :func:`register_method`.
"""

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


Kind = Literal["weights", "pool", "source"]


@dataclass(frozen=True)
class Mode:
    name: str
    entry: str  # "module:function", the mode's run(run) -> (rows, stats)
    settings: tuple[str, ...]  # the settings groups the mode itself reads
    help: str = ""
    stream: bool = False  # prompts arrive in order and weights come from the current model (running P0)
    command: str = "train"  # the llamafactory-cli command that runs it


@dataclass(frozen=True)
class Impl:
    """A method in one mode: its kind, its class (``"module:Class"``) and the settings groups it reads."""

    kind: Kind
    cls: str
    settings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    impls: Mapping[str, Impl] = field(default_factory=dict)  # mode -> Impl

    def __post_init__(self) -> None:
        object.__setattr__(self, "impls", MappingProxyType(dict(self.impls)))


MODES: dict[str, Mode] = {}
METHODS: dict[str, Method] = {}


def register_mode(mode: Mode) -> Mode:
    if mode.name in MODES:
        raise ValueError(f"A mode named {mode.name!r} is already registered.")
    MODES[mode.name] = mode
    return mode


def register_method(name: str, help: str, **impls: Impl) -> Method:  # noqa: A002
    """Register ``tlm_selector: name``: ``offline=Impl(...)``, ``online=...``, ``per_prompt=...``."""
    if name in METHODS:
        raise ValueError(f"A method named {name!r} is already registered.")
    unknown = set(impls) - set(MODES)
    if unknown:
        raise ValueError(f"method {name!r}: unknown modes {sorted(unknown)}")
    METHODS[name] = Method(name, help, impls)
    return METHODS[name]


def impl(selector: str, mode: str) -> Impl | None:
    method = METHODS.get(selector)
    return method.impls.get(mode) if method is not None else None


def method_kind(selector: str, mode: str) -> Kind | None:
    found = impl(selector, mode)
    return found.kind if found is not None else None


def modes_of(selector: str) -> list[str]:
    return list(METHODS[selector].impls) if selector in METHODS else []


def load(path: str) -> Any:
    """The object ``"module:attribute"`` names."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ---------------------------------------------------------------------------------------------------------------
# The modes

register_mode(
    Mode(
        "offline",
        "tlm_plugin.modes.offline:run",
        ("core", "selection", "objectives"),
        "score every prompt, learn from the selected ones (or from pool rows picked for all), answer",
    )
)
register_mode(
    Mode(
        "online",
        "tlm_plugin.modes.online:run",
        ("core", "selection", "objectives"),
        "answer a chunk of the stream, then learn from it (Algorithm 1 of the TLM paper)",
        stream=True,
    )
)
register_mode(
    Mode(
        "per_prompt",
        "tlm_plugin.modes.per_prompt:run",
        ("core", "selection", "per_prompt", "gate"),
        "per prompt: gate, its own training rows, steps, answer, restore",
    )
)
register_mode(
    Mode(
        "serve",
        "tlm_plugin.modes.serve:run",
        ("core", "selection", "serve"),
        "an OpenAI-compatible server that answers with the current adapter version and learns online from its own "
        "traffic ([serving.md](serving.md))",
        stream=True,
        command="api",
    )
)

# ---------------------------------------------------------------------------------------------------------------
# The methods

_WEIGHTS = "tlm_plugin.selectors.perplexity"
_POOL = "tlm_plugin.selectors.pool"
register_method(
    "perplexity",
    "TLM's S(x) = lambda * exp(log P(x) - log P0) above P0 (Hu et al., ICML 2025)",
    offline=Impl("weights", f"{_WEIGHTS}:PerplexitySelector"),
    online=Impl("weights", f"{_WEIGHTS}:PerplexitySelector"),
    serve=Impl("weights", f"{_WEIGHTS}:PerplexitySelector"),
)
register_method(
    "all",
    "every prompt with weight 1 (the ablation's first control)",
    offline=Impl("weights", f"{_WEIGHTS}:AllSelector"),
    online=Impl("weights", f"{_WEIGHTS}:AllSelector"),
    serve=Impl("weights", f"{_WEIGHTS}:AllSelector"),
)
register_method(
    "random",
    "as many prompts as perplexity would pick, at random, weight 1; per prompt: random pool rows",
    offline=Impl("weights", f"{_WEIGHTS}:RandomSelector"),
    online=Impl("weights", f"{_WEIGHTS}:RandomSelector"),
    serve=Impl("weights", f"{_WEIGHTS}:RandomSelector"),
    per_prompt=Impl("pool", f"{_POOL}:RandomPoolSelector", ("pool",)),
)
register_method(
    "sift",
    "pool rows that most reduce the uncertainty about the prompts (Hübotter et al., ICLR 2025)",
    offline=Impl("pool", f"{_POOL}:SiftSelector", ("pool",)),
    per_prompt=Impl("pool", f"{_POOL}:SiftSelector", ("pool",)),
)
register_method(
    "nearest",
    "the pool rows nearest to the prompts by embedding",
    offline=Impl("pool", f"{_POOL}:NearestSelector", ("pool",)),
    per_prompt=Impl("pool", f"{_POOL}:NearestSelector", ("pool",)),
)
register_method(
    "generate",
    "examples written by the model itself or a teacher (TT-SI / TT-D / TT-ICL, Acikgoz et al., 2025)",
    per_prompt=Impl("source", "tlm_plugin.selectors.generate:GenerateSource", ("generate",)),
)
register_method(
    "demos",
    "the demonstrations the prompt carries (few-shot test-time training, Akyürek et al.)",
    per_prompt=Impl("source", "tlm_plugin.selectors.demos:DemoSource", ("demos",)),
)
