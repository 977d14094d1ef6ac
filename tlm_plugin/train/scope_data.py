"""The user's own tokens of each test prompt: a ``user_mask`` column (and ``loss_mask`` for ``tlm_loss_tokens: user``).

Every run records the user-token log-perplexity next to the scope's (``log_ppl_user`` in ``tlm_scores.jsonl``), so
a ``prompt``-scope run shows how much of its learning reached the user's text rather than the template.
"""

from typing import TYPE_CHECKING

from llamafactory.extras import logging

from tlm_plugin.hparams import TLMConfigError
from tlm_plugin.train.token_scope import TemplateScopeError, truncated_user_content_mask


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.get_logger(__name__)


def with_user_scope(
    prompts: "Dataset", template, tokenizer, model_args, data_args, training_args, required: bool = True
) -> "Dataset":
    """Add ``user_mask`` (1 = a token of the user's content) to the prompts, aligned with their ``input_ids``.

    With ``required`` (``tlm_loss_tokens: user``) the mask also becomes the ``loss_mask`` and a template without a
    user slot is an error; otherwise such a template just leaves the prompts without ``user_mask``.

    The rows come from LLaMA-Factory's aligned dataset (its private ``_get_merged_dataset``: the same
    ``_prompt``/``_response``/``_system``/``_tools`` columns its processors read); each mask is built from the
    template's own encoding and checked against the processed ``input_ids`` token for token.
    """
    from llamafactory.data.loader import _get_merged_dataset

    aligned = _get_merged_dataset(data_args.dataset, model_args, data_args, training_args, stage="tlm")

    def unavailable(reason: str) -> "Dataset":
        if required:
            raise TLMConfigError(f"tlm_loss_tokens: user: {reason}")
        logger.warning_rank0(f"No user-token log-perplexity (log_ppl_user) is recorded: {reason}")
        return prompts

    if len(aligned) != len(prompts):
        return unavailable(
            f"{len(aligned)} dataset rows but {len(prompts)} processed prompts (LLaMA-Factory dropped invalid "
            "rows); fix the dataset or use tlm_loss_tokens: prompt."
        )
    masks = []
    for i, row in enumerate(aligned):
        messages = row["_prompt"] + (row["_response"] if len(row["_response"]) == 1 else [])
        try:
            ids, mask = truncated_user_content_mask(
                template, tokenizer, messages, data_args.cutoff_len, row["_system"] or None, row["_tools"] or None
            )
        except TemplateScopeError as err:
            return unavailable(f"not available for this template: {err}")
        if ids != list(prompts[i]["input_ids"]):
            return unavailable(f"row {i}'s encoding differs from LLaMA-Factory's.")
        if sum(mask) < 2:  # a log-perplexity needs at least one predicted user token after the first
            mask = [1] * len(ids)
        masks.append(mask)
    prompts = prompts.add_column("user_mask", masks)
    return prompts.add_column("loss_mask", masks) if required else prompts
