"""Which prompt tokens are the user's own words: a 0/1 mask over the ids LLaMA-Factory's unsupervised processor builds.

TLM (Hu et al., "Test-Time Learning for Large Language Models", ICML 2025) minimises the perplexity of the test
prompt as the model sees it at generation time. The chat template wraps the user's text in a system prompt, role
headers and footers; this module tells those apart from the user's content so that an objective can be scoped to it.

Positions come from the template's own encoding, never from searching decoded text: we rebuild the "elements" that
``Template._encode`` gives ``_convert_elements_to_ids`` (strings and special-token dicts/sets), remember where the
user's content sits inside the string element that carries it, and tokenize that element with character offsets.
The rebuilt ids are checked against ``template.encode_oneturn`` and a mismatch raises instead of returning a mask.

Boundary rule: a template slot such as ``"<|im_start|>user\\n{{content}}<|im_end|>\\n"`` is ONE string, so BPE may
merge characters of the header or footer with the content into one token. A token is content when strictly more
than half of its characters lie inside the content (a tie is not content); a zero-width token is content when it
starts inside the content. Hence decoding the masked tokens gives the user's text up to whitespace merged into a
header or footer token: ``"\\n Hello"`` after a header may lose its leading ``"\\n "`` token, or keep a ``" "``.
"""

from collections.abc import Sequence
from copy import deepcopy
from typing import TYPE_CHECKING, Any

from tlm_plugin import seam


_LF = seam.template_classes()  # LLaMA-Factory's template internals, reached through the seam
Role, StringFormatter, infer_seqlen = _LF["Role"], _LF["StringFormatter"], _LF["infer_seqlen"]
TEMPLATES, Template = _LF["TEMPLATES"], _LF["Template"]
Llama2Template, ReasoningTemplate = _LF["Llama2Template"], _LF["ReasoningTemplate"]


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizer

PLACEHOLDER = "{{content}}"
# Roles that end a prompt; anything else in last place is the response (UnsupervisedDatasetProcessor's `response`).
PROMPT_END_ROLES = (Role.USER.value, Role.OBSERVATION.value)

Span = tuple[int, int]  # [start, end) characters of the user's content inside one string element
Element = tuple[Any, Span | None]  # (str | dict | set element, span of user content or None)


class TemplateScopeError(ValueError):
    """The template's encoding cannot be reproduced element by element, so no trustworthy mask exists."""


def user_content_mask(
    template: Template,
    tokenizer: "PreTrainedTokenizer",
    messages: list[dict[str, str]],
    system: str | None = None,
    tools: str | None = None,
) -> tuple[list[int], list[int]]:
    """Prompt ids exactly as ``template.encode_oneturn`` gives them, and a 0/1 mask of the user's content.

    Args:
        messages: the prompt turns (user first, odd count), optionally followed by one response turn; without a
            response an empty assistant turn is appended, as ``UnsupervisedDatasetProcessor`` does.

    Returns:
        ``(input_ids, mask)`` of equal length (untruncated); ``mask[t]`` is 1 for tokens of every user turn's
        content and 0 for BOS, the system prompt, tools, role headers/footers, assistant and observation turns.
    """
    input_ids, mask, _ = _encode_with_mask(template, tokenizer, messages, system, tools)
    return input_ids, mask


def truncated_user_content_mask(
    template: Template,
    tokenizer: "PreTrainedTokenizer",
    messages: list[dict[str, str]],
    cutoff_len: int,
    system: str | None = None,
    tools: str | None = None,
) -> tuple[list[int], list[int]]:
    """``user_content_mask`` truncated to ``cutoff_len`` as the unsupervised processor truncates its input_ids."""
    input_ids, mask, labels = _encode_with_mask(template, tokenizer, messages, system, tools)
    return truncate_with_mask(input_ids, mask, len(labels), cutoff_len)


def truncate_with_mask(
    input_ids: Sequence[int], mask: Sequence[int], target_len: int, cutoff_len: int
) -> tuple[list[int], list[int]]:
    """Keep the first ``source_len`` ids and mask entries, ``source_len`` from LLaMA-Factory's ``infer_seqlen``.

    ``target_len`` is the length of the processor's labels (response ids, plus EOS for ``efficient_eos``).
    """
    assert len(input_ids) == len(mask), "input_ids and mask must be aligned"
    source_len, _ = infer_seqlen(len(input_ids), target_len, cutoff_len)
    return list(input_ids[:source_len]), list(mask[:source_len])


def _encode_with_mask(
    template: Template,
    tokenizer: "PreTrainedTokenizer",
    messages: list[dict[str, str]],
    system: str | None,
    tools: str | None,
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, mask, labels) with prompt ids verified against ``template.encode_oneturn``."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("user_content_mask needs a fast tokenizer (character offsets); got a slow one.")
    if not messages:
        raise ValueError("messages is empty.")
    if messages[-1]["role"] in PROMPT_END_ROLES:
        messages = list(messages) + [{"role": Role.ASSISTANT.value, "content": ""}]

    expected_ids, labels = template.encode_oneturn(tokenizer, messages, system, tools)
    if template.efficient_eos:
        labels = labels + [tokenizer.eos_token_id]

    if isinstance(template, ReasoningTemplate) and not template.preserve_thinking:
        messages = deepcopy(messages)  # history thoughts are dropped before encoding; user turns are untouched
        for i in range(1, len(messages) - 2, 2):
            messages[i]["content"] = template.remove_thought(messages[i]["content"])

    input_ids, mask = [], []
    for i, message in enumerate(messages[:-1]):
        for element, span in _message_elements(template, i, message, system, tools):
            ids, element_mask = _element_ids_and_mask(template, tokenizer, element, span)
            input_ids += ids
            mask += element_mask

    tail = expected_ids[len(input_ids) :]
    if tail and isinstance(template, ReasoningTemplate) and tail == template.get_thought_word_ids(tokenizer):
        input_ids, mask = input_ids + tail, mask + [0] * len(tail)  # the empty thought of a no-thinking prompt
    if input_ids != expected_ids:
        raise TemplateScopeError(
            f"Template {_template_name(template)!r}: rebuilding its encoding element by element gave ids that differ "
            "from template.encode_oneturn, so the user-content mask is not supported for it."
        )
    return input_ids, mask, labels


def answer_content_mask(
    template: Template,
    tokenizer: "PreTrainedTokenizer",
    messages: list[dict[str, str]],
    system: str | None = None,
    tools: str | None = None,
) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation (the last message an assistant answer) and a 0/1 mask of that answer's content.

    The ids are the concatenation of ``template.encode_multiturn`` (what LLaMA-Factory's supervised processor
    joins, before truncation and without the ``efficient_eos`` token); the mask leaves out the template's tokens
    around the answer (e.g. a closing ``<|im_end|>``), by the same boundary rule as :func:`user_content_mask`.
    Raises :class:`TemplateScopeError` when the encoding cannot be rebuilt element by element.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("answer_content_mask needs a fast tokenizer (character offsets); got a slow one.")
    if not messages or messages[-1]["role"] != Role.ASSISTANT.value:
        raise ValueError("the last message must be the assistant's answer")
    pairs = template.encode_multiturn(tokenizer, messages, system, tools)
    expected = [t for source, target in pairs for t in source + target]
    input_ids, mask = [], []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        for element, span in _message_elements(template, i, message, system, tools, "answer" if i == last else None):
            ids, element_mask = _element_ids_and_mask(template, tokenizer, element, span)
            input_ids += ids
            mask += element_mask
    if input_ids != expected:
        raise TemplateScopeError(
            f"Template {_template_name(template)!r}: rebuilding its encoding element by element gave ids that differ "
            "from template.encode_multiturn, so the answer-content mask is not supported for it."
        )
    return input_ids, mask


def _message_elements(
    template: Template,
    i: int,
    message: dict[str, str],
    system: str | None,
    tools: str | None,
    mark: str | None = "user",
) -> list[Element]:
    """The elements ``Template._encode`` (or ``Llama2Template._encode``) builds for message ``i``, with spans."""
    kind = seam.encode_kind(template)
    if kind is None:
        raise TemplateScopeError(f"Template {_template_name(template)!r} overrides _encode; not supported.")
    fuses_system = kind == "llama2"  # the system text is glued in front of the first user turn
    system = system or template.default_system
    role, content = message["role"], message["content"]

    elements: list[Element] = []
    system_text = ""
    if i == 0:
        elements += [(e, None) for e in template.format_prefix.apply()]
        if system or tools:
            tool_text = template.format_tools.apply(content=tools)[0] if tools else ""
            system_elements = template.format_system.apply(content=(system + tool_text))
            if fuses_system:
                system_text = system_elements[0]
            else:
                elements += [(e, None) for e in system_elements]

    if role == Role.USER.value:
        kwargs = {} if fuses_system else {"idx": str(i // 2)}
        marked = _format_user(template, system_text, content, kwargs)
        elements += [(e, span if mark == "user" else None) for e, span in marked]
    elif role == Role.ASSISTANT.value and mark == "answer":
        elements += _format_with_span(template, template.format_assistant, "assistant", "", content, {})
    elif role == Role.ASSISTANT.value:
        elements += [(e, None) for e in template.format_assistant.apply(content=content)]
    elif role == Role.OBSERVATION.value:
        elements += [(e, None) for e in template.format_observation.apply(content=content)]
    elif role == Role.FUNCTION.value:
        words = {"thought_words": template.thought_words, "tool_call_words": template.tool_call_words}
        extra = {} if fuses_system else words
        elements += [(e, None) for e in template.format_function.apply(content=content, **extra)]
    else:
        raise ValueError(f"Unexpected role {role!r} in message {i}.")
    return elements


def _format_user(template: Template, system_text: str, content: str, kwargs: dict[str, str]) -> list[Element]:
    """``format_user.apply`` with the character span of ``content`` inside the one element that carries it."""
    return _format_with_span(template, template.format_user, "user", system_text, content, kwargs)


def _format_with_span(
    template: Template, formatter, what: str, system_text: str, content: str, kwargs: dict[str, str]
) -> list[Element]:
    """``formatter.apply`` with the character span of ``content`` inside the one element that carries it.

    The span is where ``StringFormatter`` put the placeholder: the length of the slot's text before
    ``{{content}}`` once the other placeholders are filled, after any fused system text.
    """
    if type(formatter) is not StringFormatter:
        raise TemplateScopeError(
            f"Template {_template_name(template)!r}: the {what} formatter is not a StringFormatter."
        )
    text = system_text + content
    slots_with_content = [k for k, slot in enumerate(formatter.slots) if isinstance(slot, str) and PLACEHOLDER in slot]
    if len(slots_with_content) != 1 or formatter.slots[slots_with_content[0]].count(PLACEHOLDER) != 1:
        raise TemplateScopeError(f"Template {_template_name(template)!r}: {what} slot must hold {PLACEHOLDER} once.")

    k = slots_with_content[0]
    elements = formatter.apply(content=text, **kwargs)
    before = formatter.slots[k].split(PLACEHOLDER, 1)[0]
    for name, value in kwargs.items():
        before = before.replace("{{" + name + "}}", value, 1)
    text_start = len(before)
    if elements[k][text_start : text_start + len(text)] != text:  # e.g. {{idx}} was filled inside the user's text
        raise TemplateScopeError(f"Template {_template_name(template)!r}: cannot locate the {what} content.")
    span = (text_start + len(system_text), text_start + len(text))
    return [(e, span if j == k else None) for j, e in enumerate(elements)]


def spans_mask(
    template: Template,
    tokenizer: "PreTrainedTokenizer",
    messages: list[dict[str, str]],
    spans: list[Span],
    system: str | None = None,
    tools: str | None = None,
) -> tuple[list[int], list[int]]:
    """Prompt ids (``encode_oneturn`` of ``messages`` and an empty assistant turn) and a 0/1 mask of the tokens that
    lie inside ``spans``: [start, end) character ranges of the LAST user message's content, by the boundary rule of
    :func:`user_content_mask` (e.g. the answers of the Q/A demonstrations written inside a single-turn prompt)."""
    content = messages[-1]["content"]
    ids, content_mask, _ = _encode_with_mask(template, tokenizer, messages, system, tools)
    # rebuild the last user element with offsets, to map its content's characters to tokens
    last = len(messages) - 1
    input_ids, mask = [], []
    for i, message in enumerate(messages + [{"role": Role.ASSISTANT.value, "content": ""}]):
        if i == len(messages):
            break
        for element, span in _message_elements(template, i, message, system, tools, "user" if i == last else None):
            element_ids, element_mask = _element_ids_and_mask(
                template, tokenizer, element, span, [(span[0] + a, span[0] + b) for a, b in spans] if span else None
            )
            input_ids += element_ids
            mask += element_mask
    tail = ids[len(input_ids) :]
    if input_ids != ids[: len(input_ids)] or (tail and not isinstance(template, ReasoningTemplate)):
        raise TemplateScopeError(f"Template {_template_name(template)!r}: cannot rebuild the prompt with spans.")
    assert len(content_mask) == len(ids) and content  # the user content exists and was encoded
    return ids, mask + [0] * len(tail)


def _element_ids_and_mask(
    template: Template, tokenizer: "PreTrainedTokenizer", element: Any, span: Span | None, inner=None
) -> tuple[list[int], list[int]]:
    """Ids of one element exactly as ``_convert_elements_to_ids`` gives them, and the content mask over them
    (with ``inner``: the mask of the tokens inside any of those character ranges instead)."""
    ids = seam.elements_to_ids(template, tokenizer, [element])
    if span is None or not ids:
        return ids, [0] * len(ids)
    if inner is not None:
        encoding = tokenizer(element, add_special_tokens=False, return_offsets_mapping=True)
        if encoding["input_ids"] != ids:
            raise TemplateScopeError(f"Template {_template_name(template)!r}: offsets changed the ids of {element!r}.")
        return ids, [int(any(is_content_token(o, r) for r in inner)) for o in encoding["offset_mapping"]]

    encoding = tokenizer(element, add_special_tokens=False, return_offsets_mapping=True)
    if encoding["input_ids"] != ids:
        raise TemplateScopeError(
            f"Template {_template_name(template)!r}: tokenizing with offsets changed the ids of {element!r}."
        )
    return ids, [int(is_content_token(offsets, span)) for offsets in encoding["offset_mapping"]]


def is_content_token(offsets: Span, span: Span) -> bool:
    """The boundary rule: strictly more than half of the token's characters are content.

    A zero-width token (some tokenizers give special or byte-fallback pieces empty offsets) is content when it
    starts inside the content, so an empty content never has content tokens.
    """
    (start, end), (content_start, content_end) = offsets, span
    if end == start:
        return content_start <= start < content_end
    overlap = max(0, min(end, content_end) - max(start, content_start))
    return 2 * overlap > end - start


def _template_name(template: Template) -> str:
    return next((name for name, t in TEMPLATES.items() if t is template), type(template).__name__)
