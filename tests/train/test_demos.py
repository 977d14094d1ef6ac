"""Few-shot test-time training (``tlm_selector: demos``): extraction, masks, task cache, restore, votes, sharding."""

import json
import re

import pytest
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, run_cli, write_dataset

from tlm_plugin import patch
from tlm_plugin.hparams import TLMConfigError
from tlm_plugin.selectors.demos import (
    DEFAULT_PATTERN,
    compile_pattern,
    demos_from_history,
    demos_from_pattern,
    majority,
    orders,
    task_key,
)


HISTORY_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}


def test_demonstrations_from_the_history():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "test"},
    ]
    demos, rest = demos_from_history(messages)
    assert demos == [("q1", "a1"), ("q2", "a2")] and rest == [{"role": "user", "content": "test"}]
    assert demos_from_history([{"role": "user", "content": "alone"}])[0] == []


def test_demonstrations_from_the_default_pattern_and_a_custom_one():
    pattern = compile_pattern(DEFAULT_PATTERN)
    text = "Solve.\nQ: 2+2?\nA: 4\nQ: spell cat\nbackwards\nA: tac\nQ: 3+4?\nA:"
    demos, instruction, query = demos_from_pattern(text, pattern)
    assert demos == [("2+2?", "4"), ("spell cat\nbackwards", "tac")]
    assert instruction == "Solve." and query == "Q: 3+4?\nA:"
    assert demos_from_pattern("no demonstrations here", pattern) == ([], "no demonstrations here", "")
    assert len(demos_from_pattern("Q: only one\nA: yes\nQ: test\nA:", pattern)[0]) == 1
    custom = compile_pattern(r"Input: (?P<input>.+)\nOutput: (?P<output>.+)")
    assert demos_from_pattern("Input: a\nOutput: b\nInput: c\nOutput: d\nInput: e\nOutput:", custom)[0] == [
        ("a", "b"),
        ("c", "d"),
    ]


@pytest.mark.parametrize(
    "pattern,match",
    [("(?P<input>Q.*", "not a valid regular expression"), ("Q: (.*) A: (.*)", "named groups")],
)
def test_a_malformed_pattern_is_a_clear_error_naming_tlm_demo_pattern(pattern, match):
    with pytest.raises(TLMConfigError, match=f"tlm_demo_pattern.*{match}"):
        patch.split_args(
            {"stage": "tlm", "tlm_mode": "per_prompt", "tlm_selector": "demos", "tlm_demo_pattern": pattern}
        )


def test_orders_votes_and_task_keys():
    first = orders(5, 40, seed=3)
    assert len(first) == 40 and all(sorted(o) == list(range(5)) for o in first)
    assert first == orders(5, 40, seed=3) and first != orders(5, 40, seed=4)
    assert len({tuple(o) for o in first}) > 10
    assert majority(["B", "A", "A ", "B", "C", "A"]) == "A"  # 3 x A (whitespace collapsed) against 2 x B
    assert majority(["x", "y"]) == "x"  # a tie goes to the first answer (the demonstrations as given)
    assert task_key(None, "i", [("q", "a")]) == task_key("", "i", [("q", "a")]) != task_key(None, "i", [("q", "b")])


def _history_rows():
    demos = [[q, a] for q, a in QUESTIONS[:3]]
    rows = [
        {"instruction": q, "input": "", "output": a, "history": demos if i < 4 else demos[:1]}
        for i, (q, a) in enumerate(QUESTIONS[3:9])
    ]
    return rows, demos


@pytest.mark.slow
def test_the_loss_covers_exactly_the_demonstration_answers(tiny_model, tmp_path):
    """Token for token, against the chatml text built here: every assistant turn's answer and its closing tokens
    for history demonstrations; the answers' own characters inside a single-turn Q/A prompt."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    from tlm_plugin.selectors.demos import DemoSource
    from tlm_plugin.train.data import Encoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data_args = DataArguments(template="chatml", cutoff_len=1024)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    encoder = Encoder(template, tokenizer, data_args)
    demos = QUESTIONS[:3]

    messages = []
    for q, a in demos:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ids, mask = encoder.conversation(messages)
    expected = []
    for q, a in demos:
        expected += [0] * len(tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"))
        expected += [1] * len(tokenizer.encode(f"{a}<|im_end|>\n"))
    assert mask == expected and len(ids) == len(expected)

    text = "Answer.\n" + "".join(f"Q: {q}\nA: {a}\n" for q, a in demos) + "Q: next?\nA:"
    source = DemoSource()
    source.pattern = compile_pattern(DEFAULT_PATTERN)
    source.ctx = type("Context", (), {"encoder": encoder})()
    row = {"_prompt": [{"role": "user", "content": text}], "_system": "", "_tools": ""}
    split = {
        "demos": demos_from_pattern(text, source.pattern)[0],
        "source": "pattern",
        "instruction": "Answer.",
        "query": "Q: next?\nA:",
        "row": row,
    }
    sequence = source._pattern_sequence(split, [2, 0, 1], [2, 0, 1])
    kept = tokenizer.decode([t for t, m in zip(sequence["input_ids"], sequence["loss_mask"]) if m])
    assert kept == "".join(a for _, a in (demos[2], demos[0], demos[1]))
    body = tokenizer.decode(sequence["input_ids"])
    assert re.search(rf"Q: {re.escape(demos[2][0])}\nA: {re.escape(demos[2][1])}\nQ: {re.escape(demos[0][0])}", body)
    loo = source._pattern_sequence(split, [1, 2, 0], [0])  # leave-one-out: only the held-out answer counts
    assert tokenizer.decode([t for t, m in zip(loo["input_ids"], loo["loss_mask"]) if m]) == demos[0][1]


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


@pytest.mark.slow
def test_tasks_train_once_and_prompts_without_demonstrations_do_not_train(tiny_model, tmp_path):
    rows, _ = _history_rows()
    data = write_dataset(tmp_path / "data", rows, columns=HISTORY_COLUMNS)
    out = tmp_path / "out"
    run_in_process(
        base_recipe(
            tiny_model,
            data,
            out,
            tlm_selector="demos",
            tlm_mode="per_prompt",
            tlm_demo_orders=4,
            do_predict=True,
            learning_rate=1e-2,
            tlm_eval_answers=True,
        )
    )
    records = read_jsonl(out / "tlm_demos.jsonl")
    assert [r["index"] for r in records] == list(range(len(rows)))
    assert [r["n_demos"] for r in records] == [3, 3, 3, 3, 1, 1]
    assert [r.get("cache_hit") for r in records] == [False, True, True, True, None, None]
    assert [r["steps"] for r in records] == [4, 0, 0, 0, 0, 0]
    assert records[4]["status"] == "fewer than 2 demonstrations"
    # prompts of the task are answered with the task's adapter: the same loss on the demonstrations after training
    assert len({round(r["data_loss_after"], 9) for r in records[:4]}) == 1
    assert records[0]["data_loss_after"] < records[0]["data_loss_before"]
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["per_prompt"]["n_cache_hits"] == 3 and summary["per_prompt"]["n_without_demos"] == 2
    assert len(list((out / "tlm_task_adapters").glob("*.pt"))) == 1


@pytest.mark.slow
def test_per_prompt_demos_restore_exactly_and_vote(tiny_model, tmp_path):
    """Without the cache every prompt trains from the same start: the reversed run gives the same records; with
    votes each prompt is answered in 3 demonstration orders and the answer is their majority."""
    rows, _ = _history_rows()
    rows = rows[:4]
    data = write_dataset(tmp_path / "data", rows, columns=HISTORY_COLUMNS)
    write_dataset(data, rows[::-1], name="reversed", columns=HISTORY_COLUMNS)
    common = dict(
        tlm_selector="demos",
        tlm_mode="per_prompt",
        tlm_demo_orders=3,
        tlm_demo_cache=False,
        tlm_demo_votes=3,
        do_predict=True,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
    )
    run_in_process(base_recipe(tiny_model, data, tmp_path / "fwd", **common))
    run_in_process(base_recipe(tiny_model, data, tmp_path / "rev", dataset="reversed", **common))
    fwd = read_jsonl(tmp_path / "fwd" / "tlm_demos.jsonl")
    rev = read_jsonl(tmp_path / "rev" / "tlm_demos.jsonl")
    # a prompt's randomness comes from its own tokens, so its record is the same whichever prompts came before
    assert [r["steps"] for r in fwd] == [3, 3, 3, 3]
    for r in fwd:
        assert len(r["votes"]) == 3
    preds = read_jsonl(tmp_path / "fwd" / "generated_predictions.jsonl")
    for r, p in zip(fwd, preds):
        assert p["predict"] == majority(r["votes"])
    assert [r["step_losses"] for r in fwd] == [r["step_losses"] for r in rev[::-1]]
    assert [r["votes"] for r in fwd] == [r["votes"] for r in rev[::-1]]


@pytest.mark.slow
def test_demos_under_torchrun_answer_every_prompt_once(tiny_model, tmp_path):
    rows, _ = _history_rows()
    data = write_dataset(tmp_path / "data", rows, columns=HISTORY_COLUMNS)
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model, data, out, tlm_selector="demos", tlm_mode="per_prompt", tlm_demo_orders=2, do_predict=True
    )
    proc = run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["index"] for r in read_jsonl(out / "tlm_demos.jsonl")] == list(range(len(rows)))
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(rows)
