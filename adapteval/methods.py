"""The AdaptEval methods: what each column of the results table runs.

A method is a name, a one-line description and the recipe keys it sets on top of the base recipe (the model,
LoRA, learning rate and generation settings of a run). Every method runs through ``llamafactory-cli train``
with ``stage: tlm``; a later method (``tlm-sift``, ``tent``, ``eata``, ``come``, token-scope variants) plugs in
by registering one more entry::

    register_method(Method("tlm-sift", "TLM on the prompts SIFT selects", {**TLM_OFFLINE, "tlm_selector": "sift"}))

Layering of a cell's recipe (later wins): base recipe, the method's overrides, ``--set`` values, then the keys the
runner owns (dataset, dataset_dir, output_dir). So ``--set tlm_chunk_size=50`` changes a method's own default,
and ``--set tlm-online:tlm_chunk_size=50`` changes it for that method only.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adapteval.errors import UnknownNameError


@dataclass(frozen=True)
class Method:
    """One column of the AdaptEval table."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "," in self.name or ":" in self.name:
            raise ValueError(f"a method name must be non-empty and contain no ',' or ':', got {self.name!r}")
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def __reduce__(self):  # the read-only overrides travel as a dict (Ray tasks, processes)
        return (Method, (self.name, self.description, dict(self.overrides)))

    def apply(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """``recipe`` with this method's keys set (a new dict)."""
        return {**recipe, **self.overrides}

    @property
    def trains(self) -> bool:
        """Whether the method updates the model (see ``trains``); a key it leaves to the base recipe counts as
        training."""
        return trains(self.overrides)


def trains(recipe: Mapping[str, Any]) -> bool:
    """Whether a recipe updates the model: not with ``do_train: false`` (``base``, ``icl``: scores only), nor with
    examples that only go into the prompt (``tlm_selector: generate`` with ``tlm_generate_use: icl``)."""
    icl_only = recipe.get("tlm_selector") == "generate" and recipe.get("tlm_generate_use") == "icl"
    return bool(recipe.get("do_train", True)) and not icl_only


# Shared by the adapting methods; the paper's selection (Eq. 6, lambda 0.10, P0 = e^3) where the method uses it
# (every recipe holds only the keys that act in its mode: stage tlm refuses the others).
TLM_ADAPT = {"stage": "tlm", "do_train": True, "do_predict": True, "tlm_eval_answers": True}
PAPER_SELECTION = {"tlm_selector": "perplexity", "tlm_lambda": 0.10, "tlm_log_p0": 3.0}
TLM_OFFLINE = {
    **TLM_ADAPT,
    **PAPER_SELECTION,
    "tlm_mode": "offline",
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
}
TLM_ONLINE = {
    **TLM_ADAPT,
    **PAPER_SELECTION,
    "tlm_mode": "online",
    "tlm_chunk_size": 100,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "num_train_epochs": 1.0,
}


def _without(recipe: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in keys}


METHODS: dict[str, Method] = {}
BASE = "base"


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace`` to redefine a registered name). Returns it."""
    if method.name in METHODS and not replace:
        raise ValueError(f"AdaptEval method {method.name!r} is already registered (pass replace=True)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownNameError(f"unknown AdaptEval method {name!r}; valid methods: {', '.join(METHODS)}") from None


def resolve_methods(names: str | Iterable[str]) -> list[Method]:
    """Methods from "base,tlm" or ["base", "tlm"], in the order named, without repeats."""
    if isinstance(names, str):
        names = [names]
    requested = [part.strip() for name in names for part in name.split(",") if part.strip()]
    if not requested:
        raise UnknownNameError(f"no method named; valid methods: {', '.join(METHODS)}")
    return [get_method(name) for name in dict.fromkeys(requested)]


register_method(
    Method(
        BASE,
        "the unadapted model answers the test prompts (stage tlm with do_train false: scores, no update)",
        {"stage": "tlm", "do_train": False, "do_predict": True, "tlm_eval_answers": True},
    )
)
register_method(
    Method(
        "tlm",
        "TLM offline: learn from all test prompts (perplexity-selected, paper Eq. 6), then answer them",
        TLM_OFFLINE,
    )
)
register_method(
    Method(
        "tlm-online",
        "TLM online (Algorithm 1): answer each chunk of tlm_chunk_size prompts, then learn from it; constant LR",
        TLM_ONLINE,
    )
)

# The paper's entropy baselines (Table 2/3): every prompt, greedy answers of 80 tokens, offline like TLM.
_ENTROPY = {
    **TLM_ADAPT,
    "tlm_mode": "offline",
    "tlm_selector": "all",
    "tlm_entropy_tokens": 80,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
}
register_method(
    Method(
        "tent", "Tent: minimise the entropy of the model's own 80-token answers", {**_ENTROPY, "tlm_objective": "tent"}
    )
)
register_method(
    Method(
        "eata",
        "EATA: Tent on reliable answers only (H < 0.4 ln V), weighted by exp(E0 - H)",
        {**_ENTROPY, "tlm_objective": "eata"},
    )
)
register_method(
    Method(
        "come",
        "COME: entropy of a Dirichlet opinion with uncertainty mass, norm-conserved",
        {**_ENTROPY, "tlm_objective": "come"},
    )
)
# SIFT (Hübotter et al., ICLR 2025) as TLM's selector, and per-prompt test-time fine-tuning.
register_method(
    Method(
        "tlm-sift",
        "TLM on the test prompts SIFT picks for all of them (tlm_sift_budget picks, repeats allowed)",
        {**TLM_OFFLINE, "tlm_selector": "sift"},
    )
)
register_method(
    Method(
        "sift-ttft",
        "SIFT test-time fine-tuning: per prompt, 4 picks from the test set, one step each, answer, restore",
        {
            **TLM_ADAPT,
            "tlm_selector": "sift",
            "tlm_mode": "per_prompt",
            "tlm_sift_budget": 4,
            "lr_scheduler_type": "constant",
        },
    )
)
# Token scope and calibrated threshold (docs/results-cpu.md compares them with the paper's defaults).
register_method(
    Method(
        "tlm-user",
        "TLM with score and loss on the user's tokens only (tlm_loss_tokens: user)",
        {**TLM_OFFLINE, "tlm_loss_tokens": "user"},
    )
)
register_method(
    Method(
        "tlm-frac",
        "TLM with P0 calibrated to select half of the prompts (tlm_select_fraction)",
        {**_without(TLM_OFFLINE, "tlm_log_p0"), "tlm_select_fraction": 0.5},
    )
)
register_method(
    Method(
        "tlm-user-frac",
        "tlm-user and tlm-frac together",
        {**_without(TLM_OFFLINE, "tlm_log_p0"), "tlm_loss_tokens": "user", "tlm_select_fraction": 0.5},
    )
)

# Test-time self-improvement (Acikgoz et al., 2025): per prompt, when the model is unsure (margin of its candidate
# answers below 0.95), a generator writes one example of the same task with its answer; the adapter learns it for
# 5 epochs, answers and is restored. TT-D takes a stronger teacher (``adapteval run --teacher MODEL_OR_URL``).
_TTSI = {
    **TLM_ADAPT,
    "tlm_mode": "per_prompt",
    "tlm_selector": "generate",
    "tlm_gate": "margin",
    "tlm_gate_tau": 0.95,
    "tlm_generate_k": 1,
    "tlm_prompt_epochs": 5,
    "lr_scheduler_type": "cosine",  # over the prompt's own steps, without warm-up (tlm_prompt_warmup_steps: 0)
    "learning_rate": 1.0e-4,  # the paper's LoRA: r 8, alpha 16, every linear layer
    "lora_target": "all",
}
register_method(
    Method(
        "tt-si",
        "TT-SI: the model writes one example per uncertain prompt, learns it (5 epochs), answers, restores",
        {**_TTSI, "tlm_generator": "self"},
    )
)
register_method(
    Method("tt-d", "TT-D: as tt-si, the example written by a teacher (adapteval run --teacher)", {**_TTSI})
)
register_method(
    Method(
        "tt-icl",
        "TT-ICL: the model's own example is put in the prompt as a demonstration; no training",
        {
            **{
                k: v
                for k, v in _TTSI.items()
                if k not in ("tlm_prompt_epochs", "lr_scheduler_type", "learning_rate", "lora_target")
            },
            "tlm_generator": "self",
            "tlm_generate_use": "icl",
        },
    )
)
TEACHER_METHODS = ("tt-d",)  # methods whose tlm_generator comes from --teacher

# Few-shot test-time training (Akyürek et al., 2024), for prompts that carry demonstrations (the fewshot bench):
# icl answers them as they are (the paper's baseline); fewshot-ttt first learns the demonstrations: 40 orders, the
# loss on every answer, batch 5, one epoch, one adapter per task (prompts sharing demonstrations), then answers.
register_method(
    Method(
        "icl",
        "in-context learning: the few-shot prompts answered as they are, no training (the paper's baseline)",
        {"stage": "tlm", "do_train": False, "do_predict": True, "tlm_eval_answers": True},
    )
)
_FEWSHOT_TTT = {
    **TLM_ADAPT,
    "tlm_mode": "per_prompt",
    "tlm_selector": "demos",
    "tlm_demo_orders": 40,
    "tlm_demo_format": "all",
    "tlm_prompt_epochs": 1,
    "per_device_train_batch_size": 5,
    "lr_scheduler_type": "cosine",
    "learning_rate": 1.0e-4,
}
register_method(
    Method(
        "fewshot-ttt",
        "few-shot TTT: learn the prompt's demonstrations (40 orders, loss on every answer), answer, restore",
        _FEWSHOT_TTT,
    )
)
# The ARC recipe's augmentations (grids): every order also under the 7 symmetries of the square and a colour
# permutation, at most 250 sequences per task, 2 epochs in batches of 2 (the paper's ARC settings); then the test
# input is answered under every augmentation, each answer mapped back, and the hierarchical vote gives the answer
# and the second attempt (pass@2).
register_method(
    Method(
        "fewshot-ttt-aug",
        "few-shot TTT with ARC's augmentations: dihedral + colour versions of every order, augmented voting, top-2",
        {
            **_FEWSHOT_TTT,
            "tlm_demo_augment": "dihedral,colors",
            "tlm_demo_max_sequences": 250,
            "tlm_demo_vote_augment": True,
            "tlm_prompt_epochs": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 5.0e-5,
        },
    )
)
