"""``tlm_selector: demos``: learn the demonstrations a few-shot prompt already carries (Akyürek et al., 2024).

The test-time training of "The Surprising Effectiveness of Test-Time Training for Few-Shot Learning", as its BIG-Bench
Hard code builds it for text: the demonstrations (x_k, y_k) come from the row's conversation history (the turns
before the last user turn) or, for a single-turn prompt, from ``tlm_demo_pattern`` (a regular expression with named
groups ``input`` and ``output``; by default "Q: ... / A: ..." blocks). With two or more, the training data are
``tlm_demo_orders`` sequences, each holding all demonstrations in a fresh seeded random order as a conversation
through the recipe's template, the loss on every demonstration answer and nothing else (``all``, the paper's choice);
or ``loo``: each sequence is one leave-one-out task, the other demonstrations as context, the loss on the held-out
answer only. Prompts that share their demonstrations (a task) share one adapter: it is trained once, kept in
``output_dir/tlm_task_adapters/`` and reused. With ``tlm_demo_votes: P`` a prompt is answered P times, its
demonstrations in P seeded orders (the first: as given), and the majority answer is kept.
"""

import hashlib
import json
import random
import re
from typing import Any

from tlm_plugin.selectors.base import PromptDataSource
from tlm_plugin.settings.demos import compile_pattern
from tlm_plugin.train.outputs import DEMOS_FILE
from tlm_plugin.train.token_scope import spans_mask


DEFAULT_PATTERN = r"(?ms)^Q:[ \t]*(?P<input>.+?)\s*^A:[ \t]*(?P<output>\S.*?)\s*(?=^Q:|\Z)"


def demos_from_history(messages: list[dict]) -> tuple[list[tuple[str, str]], list[dict]]:
    """(demonstrations, the messages left): the user/assistant pairs before the last user turn."""
    history, last = messages[:-1], messages[-1:]
    pairs = []
    for i in range(0, len(history) - 1, 2):
        if history[i]["role"] == "user" and history[i + 1]["role"] == "assistant":
            pairs.append((history[i]["content"], history[i + 1]["content"]))
    return pairs, last


def demos_from_pattern(text: str, pattern: re.Pattern) -> tuple[list[tuple[str, str]], str, str]:
    """(demonstrations, the instruction before the first one, the query after the last one) of a single-turn
    prompt; no demonstration: ([], text, "")."""
    matches = list(pattern.finditer(text))
    if not matches:
        return [], text, ""
    demos = [(m.group("input").strip(), m.group("output").strip()) for m in matches]
    return demos, text[: matches[0].start()].strip(), text[matches[-1].end() :].strip()


def task_key(system: str | None, instruction: str, demos: list[tuple[str, str]]) -> str:
    """The identity of a task: its system prompt, instruction and demonstrations."""
    blob = json.dumps([system or "", instruction, demos], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def orders(n_demos: int, n_orders: int, seed: int) -> list[list[int]]:
    """``n_orders`` seeded permutations of the demonstrations (each drawn afresh, repeats possible)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_orders):
        order = list(range(n_demos))
        rng.shuffle(order)
        out.append(order)
    return out


def majority(answers: list[str]) -> str:
    """The most frequent answer (compared after collapsing whitespace); ties go to the earliest."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = " ".join(answer.split())
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return answers[first[best]]


class DemoSource(PromptDataSource):
    """The prompt's own demonstrations as training sequences (all answers, or leave-one-out)."""

    record_file = DEMOS_FILE
    measure_data_loss = True

    def prepare(self, ctx) -> None:
        a = ctx.settings
        self.ctx = ctx
        self.pattern = compile_pattern(a.tlm_demo_pattern)
        self.n_orders, self.format, self.votes = a.tlm_demo_orders, a.tlm_demo_format, a.tlm_demo_votes

    def split(self, index: int) -> dict[str, Any]:
        """The prompt's demonstrations, where they came from, and how to rebuild the prompt around them."""
        row = self.ctx.aligned[index]
        messages = list(row["_prompt"])
        demos, rest = demos_from_history(messages)
        if demos:
            return {"demos": demos, "source": "history", "instruction": "", "query": rest[0]["content"], "row": row}
        demos, instruction, query = demos_from_pattern(messages[-1]["content"], self.pattern)
        return {
            "demos": demos,
            "source": "pattern" if demos else None,
            "instruction": instruction,
            "query": query,
            "row": row,
        }

    def conversation(self, split: dict, order: list[int], query: str | None = None) -> list[dict]:
        """The demonstrations in ``order`` as chat turns (the instruction in front of the first user turn), then
        ``query`` as the last user turn if given."""
        messages = []
        for position, k in enumerate(order):
            x, y = split["demos"][k]
            if position == 0 and split["instruction"]:
                x = f"{split['instruction']}\n\n{x}"
            messages += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
        if query is not None:
            if not order and split["instruction"]:
                query = f"{split['instruction']}\n\n{query}"
            messages.append({"role": "user", "content": query})
        return messages

    def cache_key(self, index: int) -> str | None:
        split = self.split(index)
        if len(split["demos"]) < 2:
            return None
        return task_key(split["row"]["_system"], split["instruction"], split["demos"])

    def rows(self, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        ctx, split = self.ctx, self.split(index)
        demos, row = split["demos"], split["row"]
        system, tools = row["_system"] or None, row["_tools"] or None
        fields: dict[str, Any] = {"n_demos": len(demos), "demo_source": split["source"]}
        if self.votes > 1 and len(demos) >= 2:
            seed = ctx.prompt_seed(index) + 1
            others = orders(len(demos), self.votes - 1, seed)
            fields["vote_messages"] = [self.conversation(split, order, split["query"]) for order in others]
            if split["source"] == "pattern":  # rebuild single-turn prompts as the demonstrations were given
                fields["vote_messages"] = [self._single_turn(split, order) for order in others]
        if len(demos) < 2:
            fields["status"] = "fewer than 2 demonstrations"
            return [], fields
        fields["status"] = "ok"
        sequences = []
        for i, order in enumerate(orders(len(demos), self.n_orders, ctx.prompt_seed(index))):
            if split["source"] == "pattern":  # the prompt's own single-turn form, blocks reordered
                targets = order if self.format == "all" else [order[i % len(order)]]
                context = order if self.format == "all" else [k for k in order if k != targets[0]] + targets
                sequences.append(self._pattern_sequence(split, context, targets))
                continue
            if self.format == "all":  # every demonstration answer is a target
                ids, mask = ctx.encoder.conversation(self.conversation(split, order), system, tools)
            else:  # leave one out: the others as context, the loss on the held-out answer only
                held = order[i % len(order)]
                context = [k for k in order if k != held]
                encoded = ctx.encoder.exchange(
                    self.conversation(split, context, demos[held][0]), demos[held][1], system, tools
                )
                if encoded is None:
                    continue
                ids, mask = encoded
            sequences.append({"input_ids": ids, "loss_mask": mask})
        return sequences, fields

    def _pattern_sequence(self, split: dict, order: list[int], targets: list[int]) -> dict[str, list[int]]:
        """The instruction and the Q/A blocks in ``order`` as one user turn, the loss on the answers of
        ``targets`` only (token positions from the template's own encoding of the turn)."""
        row = split["row"]
        text = row["_prompt"][-1]["content"]
        matches = list(self.pattern.finditer(text))
        body, spans = text[: matches[0].start()], []
        for k in order:
            m = matches[k]
            block = text[m.start() : m.end()]
            if k in targets:
                spans.append((len(body) + m.start("output") - m.start(), len(body) + m.end("output") - m.start()))
            body += block if block.endswith("\n") else block + "\n"
        messages = list(row["_prompt"][:-1]) + [{"role": "user", "content": body.rstrip()}]
        ids, mask = spans_mask(
            self.ctx.encoder.template,
            self.ctx.encoder.tokenizer,
            messages,
            spans,
            row["_system"] or None,
            row["_tools"] or None,
        )
        cutoff = self.ctx.encoder.cutoff_len
        return {"input_ids": ids[:cutoff], "loss_mask": mask[:cutoff]}

    def loss_rows(self, index: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The demonstrations in their given order, every answer a target: the loss before / after training."""
        split = self.split(index)
        if len(split["demos"]) < 2:
            return []
        given = list(range(len(split["demos"])))
        if split["source"] == "pattern":
            return [self._pattern_sequence(split, given, given)]
        row = split["row"]
        ids, mask = self.ctx.encoder.conversation(
            self.conversation(split, given), row["_system"] or None, row["_tools"] or None
        )
        return [{"input_ids": ids, "loss_mask": mask}]

    def _single_turn(self, split: dict, order: list[int]) -> list[dict]:
        """The original single-turn prompt with its Q/A blocks reordered (the text between them kept)."""
        text = split["row"]["_prompt"][-1]["content"]
        matches = list(self.pattern.finditer(text))
        blocks = [text[m.start() : m.end()] for m in matches]
        body = "".join(blocks[k] if blocks[k].endswith("\n") else blocks[k] + "\n" for k in order)
        rebuilt = text[: matches[0].start()] + body + text[matches[-1].end() :]
        return list(split["row"]["_prompt"][:-1]) + [{"role": "user", "content": rebuilt}]
