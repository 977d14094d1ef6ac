"""Settings of every stage-tlm run: the mode, what the loss and score count, how the no-grad passes run."""

from dataclasses import dataclass
from typing import Literal

from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class CoreArguments(SettingsGroup):
    """The mode (one entry of :data:`tlm_plugin.registry.MODES`) and what every mode shares."""

    purpose = "every run"

    tlm_mode: str = setting(
        "offline",
        "offline: adapt on all test prompts, then answer them. online: answer a chunk of `tlm_chunk_size` prompts, "
        "then learn from it (Algorithm 1 of the paper). per_prompt: for each prompt, learn from the data its "
        "`tlm_selector` gives it (pool rows, generated examples, its demonstrations), answer, then restore adapter, "
        "optimizer and LR schedule exactly (test-time fine-tuning: SIFT, TT-SI / TT-D, few-shot TTT). serve: under "
        "`llamafactory-cli api recipe.yaml`, an OpenAI-compatible server that answers with the current adapter "
        "version and learns online from windows of `tlm_chunk_size` received prompts in the background.",
    )
    tlm_reset: Literal["never", "chunk", "prompt"] = setting(
        "never",
        "never: one adapter, optimizer and LR schedule across all prompts. chunk (tlm_mode: online): adapter weights "
        "and optimizer state return to their initial values before learning from each chunk. prompt: the former "
        "spelling of tlm_mode: per_prompt (still accepted, with a warning).",
    )
    tlm_chunk_size: int = setting(
        100,
        "Online mode: number of test prompts answered before the model learns from them. Serve mode: received "
        "prompts per learning window (one new adapter version each).",
        low=1,
    )
    tlm_loss_tokens: Literal["prompt", "user"] = setting(
        "prompt",
        "Which tokens the score S(x) and the loss count. prompt (the paper's): every token of the chat-templated prompt. user: only the user's content (instruction and input), without system prompt, role headers and the assistant header.",
    )
    tlm_eval_answers: bool = setting(
        False,
        "Record how likely the reference answers are: answer_bpb_base (unadapted model) and answer_bpb (the model that produced each row's prediction) in bits per byte, over the tokens stage sft would train on, in tlm_scores.jsonl. Reference answers are used for this measurement only.",
    )
    tlm_score_batch_size: int | None = setting(
        None,
        "Rows per batch of the no-grad passes (scores, embeddings, answer likelihoods). Default: batches of length-sorted rows holding at most per_device_train_batch_size x the longest prompt's tokens, so a scoring batch never holds more tokens (or logits) than the largest training batch, and short prompts are batched many at a time.",
        low=1,
    )
    tlm_score_prefix_cache: bool = setting(
        True,
        "In the scoring passes, run the tokens that every prompt starts with (chat template, system prompt, role header, a fixed instruction) through the model once and reuse their key/value cache for every batch. Exact up to float rounding (checked against a full forward on the first batch); false scores every prompt with a full forward.",
    )

    def inert_fields(self) -> dict[str, str]:
        if self.tlm_mode not in ("online", "serve"):
            return {
                "tlm_chunk_size": f"it sets the chunk (window) length of tlm_mode online / serve (this run is "
                f"{self.tlm_mode})"
            }
        return {}
