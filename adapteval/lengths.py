"""How long an alpaca row is as one training sequence, for ``adapteval build --cutoff-len``: a row whose whole
sequence (system prompt, history, prompt and answer) does not fit ``cutoff_len`` would be cut by LLaMA-Factory, so
the build drops it and counts it.

Two counters:

- with ``--tokenizer`` and ``--template``: the tokens of LLaMA-Factory's own encoding of the conversation
  (``get_template_and_fix_tokenizer``, then ``Template.encode_multiturn``, as its sft preprocessing does, plus the
  one token an ``efficient_eos`` template adds);
- without: the UTF-8 bytes of the conversation's texts, plus :data:`MESSAGE_ALLOWANCE` per message and
  :data:`SEQUENCE_ALLOWANCE` per row for the template's own tokens. Every token of a byte-level or byte-fallback
  tokenizer covers at least one byte, so for templates within those allowances this is an upper bound: it never
  keeps a row that would not fit (and drops some that would: a grid cell and its space are often one token).
"""

from collections.abc import Callable, Mapping


MESSAGE_ALLOWANCE = 16  # tokens a template may add around one message (role headers, end-of-turn tokens)
SEQUENCE_ALLOWANCE = 64  # tokens a template may add once (BOS, a default system prompt)
Counter = Callable[[Mapping], int]
TOGETHER = "--tokenizer and --template go together: the tokens are counted in the template's encoding"


def conversation(row: Mapping) -> tuple[list[dict[str, str]], str | None]:
    """(messages, system) of an alpaca row as LLaMA-Factory reads it: the history's turns, then the instruction with
    the input on a new line as the last user turn, then the output as the assistant's."""
    messages = []
    for user, assistant in row.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return messages, row.get("system") or None


def count_bytes(row: Mapping) -> int:
    """The upper bound of the row's length in tokens without a tokenizer (see the module's description)."""
    messages, system = conversation(row)
    texts = [m["content"] for m in messages] + ([system] if system else [])
    size = sum(len(text.encode("utf-8")) for text in texts)
    return size + MESSAGE_ALLOWANCE * (len(messages) + (1 if system else 0)) + SEQUENCE_ALLOWANCE


def token_counter(tokenizer: str, template: str) -> Counter:
    """A counter of the row's tokens in LLaMA-Factory's encoding with ``tokenizer`` (a folder or hub id) and chat
    template ``template``."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    chat = get_template_and_fix_tokenizer(tok, DataArguments(template=template))
    extra = 1 if chat.efficient_eos else 0

    def count(row: Mapping) -> int:
        messages, system = conversation(row)
        pairs = chat.encode_multiturn(tok, messages, system)
        return sum(len(source) + len(target) for source, target in pairs) + extra

    return count


class Lengths:
    """The row-length counter of a build: tokens with ``tokenizer`` and ``template`` (both or neither; a
    ValueError otherwise), else the byte bound. The tokenizer is loaded on first use, so a build that drops nothing
    by length never loads it."""

    def __init__(self, tokenizer: str | None = None, template: str | None = None):
        if (tokenizer is None) != (template is None):
            raise ValueError(TOGETHER)
        self.tokenizer, self.template = tokenizer, template
        self._count: Counter | None = None

    @property
    def counted_with(self) -> str:
        """How rows are counted (the manifest's ``counted_with``)."""
        if self.tokenizer is None:
            return (
                f"utf-8 bytes + {MESSAGE_ALLOWANCE} per message + {SEQUENCE_ALLOWANCE} (no tokenizer: an upper bound)"
            )
        return f"tokens: {self.tokenizer}, template {self.template} (LLaMA-Factory encoding)"

    def count(self, row: Mapping) -> int:
        if self._count is None:
            self._count = count_bytes if self.tokenizer is None else token_counter(self.tokenizer, self.template)
        return self._count(row)


def drop_over_cutoff(rows: list[dict], cutoff_len: int, count: Counter) -> tuple[list[dict], list[dict]]:
    """(the rows that fit ``cutoff_len``, the rows that do not), each in the order given."""
    kept, dropped = [], []
    for row in rows:
        (kept if count(row) <= cutoff_len else dropped).append(row)
    return kept, dropped
