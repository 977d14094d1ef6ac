"""``tlm_loss_tokens: user``: a ``loss_mask`` column marking the user's own tokens of each test prompt."""

from typing import TYPE_CHECKING

from tlm_plugin.hparams import TLMConfigError
from tlm_plugin.train.token_scope import TemplateScopeError, truncated_user_content_mask


if TYPE_CHECKING:
    from datasets import Dataset


def with_user_scope(prompts: "Dataset", template, tokenizer, model_args, data_args, training_args) -> "Dataset":
    """Add ``loss_mask`` (1 = a token of the user's content) to the prompts, aligned with their ``input_ids``.

    The rows come from LLaMA-Factory's aligned dataset (its private ``_get_merged_dataset``: the same
    ``_prompt``/``_response``/``_system``/``_tools`` columns its processors read); each mask is built from the
    template's own encoding and checked against the processed ``input_ids`` token for token.
    """
    from llamafactory.data.loader import _get_merged_dataset

    aligned = _get_merged_dataset(data_args.dataset, model_args, data_args, training_args, stage="tlm")
    if len(aligned) != len(prompts):
        raise TLMConfigError(
            f"tlm_loss_tokens: user: {len(aligned)} dataset rows but {len(prompts)} processed prompts "
            "(LLaMA-Factory dropped invalid rows); fix the dataset or use tlm_loss_tokens: prompt."
        )
    masks = []
    for i, row in enumerate(aligned):
        messages = row["_prompt"] + (row["_response"] if len(row["_response"]) == 1 else [])
        try:
            ids, mask = truncated_user_content_mask(
                template, tokenizer, messages, data_args.cutoff_len, row["_system"] or None, row["_tools"] or None
            )
        except TemplateScopeError as err:
            raise TLMConfigError(f"tlm_loss_tokens: user is not available for this template: {err}") from err
        if ids != list(prompts[i]["input_ids"]):
            raise TLMConfigError(f"tlm_loss_tokens: user: row {i}'s encoding differs from LLaMA-Factory's.")
        if sum(mask) < 2:  # a log-perplexity needs at least one predicted user token after the first
            mask = [1] * len(ids)
        masks.append(mask)
    return prompts.add_column("loss_mask", masks)
