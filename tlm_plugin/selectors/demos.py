"""``tlm_selector: demos``: learn the demonstrations a few-shot prompt already carries (Akyürek et al., 2024).

The test-time training of "The Surprising Effectiveness of Test-Time Training for Few-Shot Learning", as its BIG-Bench
Hard code builds it for text and its ARC code for grids: the demonstrations (x_k, y_k) come from the row's
conversation history (the turns before the last user turn) or, for a single-turn prompt, from ``tlm_demo_pattern``
(a regular expression with named groups ``input`` and ``output``; by default "Q: ... / A: ..." blocks). With two or
more, the training data are ``tlm_demo_orders`` sequences, each holding all demonstrations in a fresh seeded random
order as a conversation through the recipe's template, the loss on every demonstration answer and nothing else
(``all``, the paper's choice); or ``loo``: each sequence is one leave-one-out task, the other demonstrations as
context, the loss on the held-out answer only.

``tlm_demo_augment`` multiplies them: every order is written once as given and once under each invertible
augmentation (:mod:`tlm_plugin.augment`: the symmetries of the square and colour permutations on grids, or
a user's own pair of functions), up to ``tlm_demo_max_sequences``; an augmentation that does not apply to every
demonstration of a prompt is left out for that prompt and counted (``augments_skipped``).

Prompts that share their training data (a task: the same demonstrations, hence the same seeded orders and
augmentations) share one adapter: it is trained once, kept in ``output_dir/tlm_task_adapters/`` with the losses
measured around its training, and reused. With ``tlm_demo_votes: P`` a prompt is answered P times, its demonstrations
in P seeded orders (the first: as given), and the majority answer is kept; with ``tlm_demo_vote_augment`` it is also
answered under each augmentation, every answer mapped back by the inverse, and the hierarchical vote picks the answer
and the runner-up (``top2``, ARC's second attempt).
"""

import hashlib
import json
import random
import re
from dataclasses import asdict
from typing import Any

from tlm_plugin import augment
from tlm_plugin.selectors.base import PromptDataSource
from tlm_plugin.settings.demos import compile_pattern
from tlm_plugin.train.outputs import DEMOS_FILE
from tlm_plugin.train.token_scope import spans_mask


DEFAULT_PATTERN = r"(?ms)^Q:[ \t]*(?P<input>.+?)\s*^A:[ \t]*(?P<output>\S.*?)\s*(?=^Q:|\Z)"
Demos = list[tuple[str, str]]


def demos_from_history(messages: list[dict]) -> tuple[Demos, list[dict]]:
    """(demonstrations, the messages left): the user/assistant pairs before the last user turn."""
    history, last = messages[:-1], messages[-1:]
    pairs = []
    for i in range(0, len(history) - 1, 2):
        if history[i]["role"] == "user" and history[i + 1]["role"] == "assistant":
            pairs.append((history[i]["content"], history[i + 1]["content"]))
    return pairs, last


def demos_from_pattern(text: str, pattern: re.Pattern) -> tuple[Demos, str, str]:
    """(demonstrations, the instruction before the first one, the query after the last one) of a single-turn
    prompt; no demonstration: ([], text, "")."""
    matches = list(pattern.finditer(text))
    if not matches:
        return [], text, ""
    demos = [(m.group("input").strip(), m.group("output").strip()) for m in matches]
    return demos, text[: matches[0].start()].strip(), text[matches[-1].end() :].strip()


def task_key(system: str | None, instruction: str, demos: Demos) -> str:
    """The identity of a task: its system prompt, instruction and demonstrations."""
    blob = json.dumps([system or "", instruction, demos], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def task_seed(run_seed: int, key: str) -> int:
    """The seed of a task's orders and colour permutations: the same for every prompt of the task."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{key}".encode()).digest()[:6], "big")


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
    return ranked(answers)[0]


def ranked(answers: list[str]) -> list[str]:
    """The distinct answers (compared after collapsing whitespace), most frequent first, ties to the earliest; each
    as it was first written."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = " ".join(answer.split())
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    return [answers[first[k]] for k in sorted(counts, key=lambda k: (-counts[k], first[k]))]


def augmented(demos: Demos, aug: augment.Augmentation, seed: int) -> Demos | None:
    """Every demonstration pair under ``aug`` (inputs and outputs alike), or None if it does not apply to one."""
    out = []
    for x, y in demos:
        fx, fy = aug.forward(x, seed), aug.forward(y, seed)
        if fx is None or fy is None:
            return None
        out.append((fx, fy))
    return out


class DemoSource(PromptDataSource):
    """The prompt's own demonstrations as training sequences (all answers, or leave-one-out), augmented."""

    record_file = DEMOS_FILE
    measure_data_loss = True

    def prepare(self, ctx) -> None:
        a = ctx.settings
        self.ctx = ctx
        self.settings = a
        self.pattern = compile_pattern(a.tlm_demo_pattern)
        self.n_orders, self.format, self.votes = a.tlm_demo_orders, a.tlm_demo_format, a.tlm_demo_votes
        self.augments = augment.resolve(a.tlm_demo_augment)
        self.max_sequences, self.vote_augment = a.tlm_demo_max_sequences, a.tlm_demo_vote_augment

    def split(self, index: int) -> dict[str, Any]:
        """The prompt's demonstrations, where they came from, how to rebuild the prompt around them, and the task's
        key and seed."""
        row = self.ctx.aligned[index]
        messages = list(row["_prompt"])
        demos, rest = demos_from_history(messages)
        if demos:
            split = {"demos": demos, "source": "history", "instruction": "", "query": rest[0]["content"], "row": row}
        else:
            demos, instruction, query = demos_from_pattern(messages[-1]["content"], self.pattern)
            source = "pattern" if demos else None
            split = {"demos": demos, "source": source, "instruction": instruction, "query": query, "row": row}
        split["task"] = task_key(row["_system"], split["instruction"], split["demos"])
        split["seed"] = task_seed(self.ctx.seed, split["task"])
        return split

    def conversation(self, split: dict, order: list[int], query: str | None = None, demos: Demos | None = None):
        """The demonstrations (``demos``, by default the prompt's own) in ``order`` as chat turns (the instruction
        in front of the first user turn), then ``query`` as the last user turn if given."""
        demos = split["demos"] if demos is None else demos
        messages = []
        for position, k in enumerate(order):
            x, y = demos[k]
            if position == 0 and split["instruction"]:
                x = f"{split['instruction']}\n\n{x}"
            messages += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
        if query is not None:
            if not order and split["instruction"]:
                query = f"{split['instruction']}\n\n{query}"
            messages.append({"role": "user", "content": query})
        return messages

    # -- training data ------------------------------------------------------------------------------------------

    def plan(self, split: dict) -> tuple[list[tuple[str, Demos, list[int], int]], dict[str, Any]]:
        """What the training sequences hold, before any tokenisation: (augmentation, its demonstrations, order,
        order number) for each, order by order with every augmentation of an order together, at most
        ``tlm_demo_max_sequences``; and the record fields saying which augmentations were used or left out."""
        demos, seed = split["demos"], split["seed"]
        versions: list[tuple[str, Demos]] = [(augment.IDENTITY, demos)]
        skipped: dict[str, str] = {}
        for aug in self.augments:
            changed = augmented(demos, aug, seed)
            if changed is None:
                skipped[aug.name] = "does not apply to every demonstration"
            else:
                versions.append((aug.name, changed))
        specs = [
            (name, version, order, i)
            for i, order in enumerate(orders(len(demos), self.n_orders, seed))
            for name, version in versions
        ]
        fields: dict[str, Any] = {}
        if self.augments:
            fields.update(augments=[name for name, _ in versions[1:]], augments_skipped=skipped)
        if len(specs) > self.max_sequences:
            fields["sequences_capped"] = len(specs)
        return specs[: self.max_sequences], fields

    def cache_key(self, index: int) -> str | None:
        """The hash of the task's training data as planned (system prompt, tools, instruction, every augmented
        demonstration in every order, the format) and of the settings that shape it: prompts whose training data
        are the same share the adapter."""
        split = self.split(index)
        if len(split["demos"]) < 2:
            return None
        specs, _ = self.plan(split)
        row = split["row"]
        blob = json.dumps(
            [
                row["_system"] or "",
                row["_tools"] or "",
                split["instruction"],
                split["source"],
                self.format,
                [[name, version, order, i] for name, version, order, i in specs],
                self.ctx.encoder.cutoff_len,
                asdict(self.settings) if hasattr(self.settings, "__dataclass_fields__") else repr(self.settings),
            ],
            ensure_ascii=False,
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]

    def fields(self, index: int) -> dict[str, Any]:
        split = self.split(index)
        fields: dict[str, Any] = {"n_demos": len(split["demos"]), "demo_source": split["source"]}
        if len(split["demos"]) < 2:
            fields["status"] = "fewer than 2 demonstrations"
            return fields
        fields["status"] = "ok"
        fields.update(self.plan(split)[1])
        fields.update(self._vote_forms(split))
        return fields

    def rows(self, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        fields = self.fields(index)
        if fields["status"] != "ok":
            return [], fields
        split = self.split(index)
        row = split["row"]
        system, tools = row["_system"] or None, row["_tools"] or None
        specs, _ = self.plan(split)
        sequences = []
        for _, demos, order, i in specs:
            if split["source"] == "pattern":  # the prompt's own single-turn form, blocks reordered
                targets = order if self.format == "all" else [order[i % len(order)]]
                context = order if self.format == "all" else [k for k in order if k != targets[0]] + targets
                sequences.append(self._pattern_sequence(split, context, targets, demos))
                continue
            if self.format == "all":  # every demonstration answer is a target
                ids, mask = self.ctx.encoder.conversation(self.conversation(split, order, demos=demos), system, tools)
            else:  # leave one out: the others as context, the loss on the held-out answer only
                held = order[i % len(order)]
                context = [k for k in order if k != held]
                encoded = self.ctx.encoder.exchange(
                    self.conversation(split, context, demos[held][0], demos), demos[held][1], system, tools
                )
                if encoded is None:
                    continue
                ids, mask = encoded
            sequences.append({"input_ids": ids, "loss_mask": mask})
        return sequences, fields

    def _blocks(self, split: dict, demos: Demos | None) -> list[tuple[str, tuple[int, int]]]:
        """Each Q/A block of the single-turn prompt as text, with its demonstration replaced by ``demos``' (an
        augmented version) where given, and the span of its answer inside the block."""
        text = split["row"]["_prompt"][-1]["content"]
        out = []
        for k, m in enumerate(self.pattern.finditer(text)):
            start = m.start()
            pieces = {"input": (m.start("input") - start, m.end("input") - start, m.group("input"))}
            pieces["output"] = (m.start("output") - start, m.end("output") - start, m.group("output"))
            block = text[m.start() : m.end()]
            if demos is not None:
                pieces["input"] = (*pieces["input"][:2], demos[k][0])
                pieces["output"] = (*pieces["output"][:2], demos[k][1])
            rebuilt, cursor, answer = "", 0, (0, 0)
            for name in sorted(pieces, key=lambda n: pieces[n][0]):
                begin, end, value = pieces[name]
                rebuilt += block[cursor:begin]
                if name == "output":
                    answer = (len(rebuilt), len(rebuilt) + len(value))
                rebuilt += value
                cursor = end
            rebuilt += block[cursor:]
            out.append((rebuilt, answer))
        return out

    def _pattern_sequence(
        self, split: dict, order: list[int], targets: list[int], demos: Demos | None = None
    ) -> dict[str, list[int]]:
        """The instruction and the Q/A blocks in ``order`` as one user turn (their demonstrations replaced by
        ``demos`` where given), the loss on the answers of ``targets`` only (token positions from the template's own
        encoding of the turn)."""
        row = split["row"]
        text = row["_prompt"][-1]["content"]
        blocks = self._blocks(split, demos)
        body, spans = text[: next(self.pattern.finditer(text)).start()], []
        for k in order:
            block, (begin, end) = blocks[k]
            if k in targets:
                spans.append((len(body) + begin, len(body) + end))
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

    # -- answering: votes over orders and augmentations ---------------------------------------------------------

    def _vote_forms(self, split: dict) -> dict[str, Any]:
        """The other forms the prompt is answered in (``vote_forms``: messages and augmentation; the prompt itself,
        as given, is the first answer), and the augmentations that do not apply to its query or demonstrations."""
        augs = self.augments if self.vote_augment else []
        if self.votes < 2 and not augs:
            return {}
        n, seed = len(split["demos"]), split["seed"]
        vote_orders = [list(range(n)), *orders(n, self.votes - 1, seed + 1)]
        forms, skipped = [], {}
        for aug in [None, *augs]:
            demos, query = split["demos"], split["query"]
            if aug is not None:
                demos, query = augmented(demos, aug, seed), aug.forward(query, seed)
                if demos is None or query is None:
                    skipped[aug.name] = "does not apply to the query" if demos else "does not apply to a demonstration"
                    continue
            for j, order in enumerate(vote_orders):
                if aug is None and j == 0:
                    continue  # the prompt itself
                if split["source"] == "pattern":
                    messages = self._single_turn(split, order, demos if aug is not None else None, query)
                else:
                    messages = self.conversation(split, order, query, demos)
                forms.append({"messages": messages, "augment": aug.name if aug is not None else augment.IDENTITY})
        out: dict[str, Any] = {"vote_forms": forms}
        if augs:
            out["vote_augments_skipped"] = skipped
        return out

    def vote(self, index: int, augments: list[str], answers: list[str]) -> dict[str, Any]:
        """The answer kept among ``answers`` (``augments[i]`` produced ``answers[i]``; the first is the prompt's own)
        and what the record keeps: every answer (``votes``), and with augmented voting the candidates with their
        votes, the abstentions and ``top2``. ``winner`` is the kept answer's text and ``winner_position`` the
        answer that wrote it as given (None when the winner is an answer mapped back by an inverse)."""
        if not self.vote_augment:
            order = ranked(answers)
            return {
                "winner": order[0],
                "winner_position": answers.index(order[0]),
                "votes": answers,
                "top2": order[:2],
            }
        split = self.split(index)
        by_name = {aug.name: aug for aug in self.augments}
        mapped = []
        for name, answer in zip(augments, answers, strict=True):
            if name == augment.IDENTITY:
                mapped.append((name, answer.strip()))
            else:
                back = by_name[name].inverse(answer.strip(), split["seed"])
                mapped.append((name, back.strip() if back is not None else None))
        candidates, abstained = augment.hierarchical_vote(mapped)
        if not candidates:  # every answer abstained: the prompt's own answer stands
            return {"winner": answers[0], "winner_position": 0, "vote_answers": [], "candidates": [], "top2": []}
        winner = candidates[0]["answer"]
        position = next((i for i, (n, a) in enumerate(mapped) if n == augment.IDENTITY and a == winner), None)
        return {
            "winner": answers[position] if position is not None else winner,
            "winner_position": position,
            "vote_answers": [{"augment": n, "answer": a, "raw": r} for (n, a), r in zip(mapped, answers, strict=True)],
            "candidates": candidates,
            "abstentions": abstained,
            "top2": [c["answer"] for c in candidates[:2]],
        }

    def _single_turn(
        self, split: dict, order: list[int], demos: Demos | None = None, query: str | None = None
    ) -> list[dict]:
        """The original single-turn prompt with its Q/A blocks reordered (the text between them kept), their
        demonstrations and the query replaced by an augmented version where given."""
        text = split["row"]["_prompt"][-1]["content"]
        matches = list(self.pattern.finditer(text))
        blocks = [block for block, _ in self._blocks(split, demos)]
        body = "".join(blocks[k] if blocks[k].endswith("\n") else blocks[k] + "\n" for k in order)
        tail = text[matches[-1].end() :]
        if query is not None and query != split["query"]:
            tail = tail.replace(split["query"], query, 1)
        rebuilt = text[: matches[0].start()] + body + tail
        return list(split["row"]["_prompt"][:-1]) + [{"role": "user", "content": rebuilt}]
