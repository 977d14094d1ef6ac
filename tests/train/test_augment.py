"""Augmentations of few-shot test-time training (``tlm_demo_augment``) and the vote of augmented inference.

Expected values come from numpy's own array operations and from hand-worked cases, never from the code under test.
"""

import json
import random
import sys
import textwrap

import numpy as np
import pytest

from tlm_plugin import augment, grids, patch
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.selectors.demos import DemoSource, orders
from tlm_plugin.settings.demos import DemoArguments


# Each symmetry as numpy writes it (independent of tlm_plugin.grids).
NUMPY = {
    "rot90": lambda a: np.rot90(a, -1),  # clockwise
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 1),
    "flip_h": np.fliplr,
    "flip_v": np.flipud,
    "transpose": lambda a: a.T,
    "transpose_anti": lambda a: np.rot90(a, 2).T,
}


def random_grid(rng: random.Random, high: int = 10) -> list[list[int]]:
    rows, cols = rng.randint(1, 9), rng.randint(1, 9)
    return [[rng.randrange(high) for _ in range(cols)] for _ in range(rows)]


def as_text(a) -> str:
    return "\n".join(" ".join(str(int(v)) for v in row) for row in np.asarray(a))


def test_every_symmetry_matches_numpy_and_round_trips_on_random_grids():
    rng = random.Random(0)
    for _ in range(200):
        grid = random_grid(rng)
        text = as_text(grid)
        for name, expected in NUMPY.items():
            aug = augment.AUGMENTATIONS[name]
            out = aug.forward(text, seed=5)
            assert out == as_text(expected(np.array(grid))), name
            assert aug.inverse(out, seed=5) == text, name
    assert augment.names("dihedral") == list(NUMPY)


def test_colour_permutations_keep_the_background_round_trip_and_follow_the_seed():
    rng = random.Random(1)
    for seed in range(50):
        grid = random_grid(rng)
        text = as_text(grid)
        aug = augment.AUGMENTATIONS["colors"]
        out = grids.parse_grid(aug.forward(text, seed))
        a, b = np.array(grid), np.array(out)
        assert ((a == 0) == (b == 0)).all()  # 0 stays 0, and nothing else becomes 0
        pairs = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
        assert len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})  # one colour -> one colour
        assert aug.inverse(aug.forward(text, seed), seed) == text
    every = as_text([list(range(10))])
    mapped = [augment.AUGMENTATIONS["colors"].forward(every, s) for s in range(20)]
    assert len(set(mapped)) > 15 and mapped[3] == augment.AUGMENTATIONS["colors"].forward(every, 3)


def test_compositions_apply_left_to_right_and_invert_in_reverse():
    grid = [[1, 2, 3], [4, 5, 0]]
    (composed,) = augment.resolve("rot90+colors")
    mapping = grids.colour_permutation(9)
    expected = np.vectorize(lambda v: mapping[v])(np.rot90(np.array(grid), -1))
    assert composed.forward(as_text(grid), 9) == as_text(expected)
    assert composed.inverse(composed.forward(as_text(grid), 9), 9) == as_text(grid)
    for name in augment.names("dihedral"):
        (both,) = augment.resolve(f"{name}+colors+transpose")
        rng = random.Random(name)
        for _ in range(20):
            text = as_text(random_grid(rng))
            assert both.inverse(both.forward(text, 4), 4) == text


@pytest.mark.parametrize(
    "text",
    ["Q: what is 2+2?", "1 2\n3", "1 2\n\n3 4", "1 a", "", "12 3", "1  2"],
    ids=["words", "ragged", "blank-line", "letter", "empty", "mixed-separators", "double-space"],
)
def test_a_text_that_is_not_a_grid_is_not_transformed(text):
    assert grids.parse_grid(text) is None
    for aug in augment.resolve("dihedral,colors"):
        assert aug.forward(text, 0) is None and aug.inverse(text, 0) is None


def test_grids_without_separators_keep_their_style_and_answers_are_found_in_text():
    assert augment.AUGMENTATIONS["transpose"].forward("12\n34", 0) == "13\n24"
    assert grids.extract_grid("Here it is:\n1 2\n3 4\nDone.") == [[1, 2], [3, 4]]
    assert grids.extract_grid("no grid") is None


def test_unknown_names_and_user_pairs(tmp_path, monkeypatch):
    (tmp_path / "my_augs.py").write_text(
        textwrap.dedent(
            """
            def reverse(text, seed):
                return text[::-1]

            def unreverse(text, seed):
                return text[::-1]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (user,) = augment.resolve("my_augs:reverse:unreverse")
    assert user.forward("abc", 0) == "cba" and user.inverse("cba", 0) == "abc"
    base = {"stage": "tlm", "tlm_mode": "per_prompt", "tlm_selector": "demos"}
    with pytest.raises(TLMConfigError, match="tlm_demo_augment.*unknown augmentation 'rot45'"):
        patch.split_args({**base, "tlm_demo_augment": "rot90,rot45"})
    with pytest.raises(TLMConfigError, match="tlm_demo_augment.*no function 'missing'"):
        patch.split_args({**base, "tlm_demo_augment": "my_augs:reverse:missing"})
    with pytest.raises(TLMConfigError, match="tlm_demo_vote_augment"):
        patch.split_args({**base, "tlm_demo_vote_augment": True})
    sys.modules.pop("my_augs", None)


def test_the_hierarchical_vote_by_hand():
    """Three augmentations. identity answers A, A, B; rot90 answers B, B and abstains once; flip_h answers C, A, D, E
    (top 3 nominations: C, A, D; E is fourth). Nominations: A by identity and flip_h (2), B by identity and rot90
    (2), C 1, D 1, E 0. A and B tie on nominations and on votes (3 each): identity's votes break the tie (A 2, B 1)."""
    answers = [
        ("identity", "A"),
        ("identity", "A"),
        ("identity", "B"),
        ("rot90", "B"),
        ("rot90", None),
        ("rot90", "B"),
        ("flip_h", "C"),
        ("flip_h", "A"),
        ("flip_h", "D"),
        ("flip_h", "E"),
    ]
    ranked, abstained = augment.hierarchical_vote(answers)
    assert [(c["answer"], c["nominations"], c["votes"], c["identity_votes"]) for c in ranked] == [
        ("A", 2, 3, 2),
        ("B", 2, 3, 1),
        ("C", 1, 1, 0),
        ("D", 1, 1, 0),
        ("E", 0, 1, 0),
    ]
    assert abstained == {"rot90": 1}
    # a full tie goes to the answer seen first; every answer abstaining leaves no candidate
    tie, _ = augment.hierarchical_vote([("identity", "X"), ("rot90", "Y")])
    assert [c["answer"] for c in tie] == ["X", "Y"]
    assert augment.hierarchical_vote([("identity", None), ("rot90", None)]) == ([], {"identity": 1, "rot90": 1})


class _Encoder:
    """Records what would be encoded: the messages of each training sequence (no tokenizer needed)."""

    cutoff_len = 4096

    def conversation(self, messages, system=None, tools=None):
        return messages, None

    def exchange(self, messages, answer, system=None, tools=None):
        return messages + [{"role": "assistant", "content": answer}], "loo"


def _source(rows, **settings):
    source = DemoSource()
    ctx = type("Ctx", (), {})()
    ctx.settings = DemoArguments(**settings)
    ctx.aligned = rows
    ctx.encoder = _Encoder()
    ctx.seed = 42
    source.prepare(ctx)
    return source


def _grid_row(rng, n_demos=3, test_output=None):
    demos = [(as_text(random_grid(rng)), as_text(random_grid(rng))) for _ in range(n_demos)]
    prompt = []
    for x, y in demos:
        prompt += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    query = as_text(random_grid(rng))
    prompt.append({"role": "user", "content": query})
    response = [{"role": "assistant", "content": test_output or as_text(random_grid(rng))}]
    return {"_prompt": prompt, "_response": response, "_system": "Grids.", "_tools": ""}, demos, query


def test_training_sequences_hold_exactly_the_augmented_demonstrations_never_the_test_output():
    rng = random.Random(3)
    row, demos, _ = _grid_row(rng, test_output="7 7 7\n7 7 7\n7 7 7")
    source = _source([row], tlm_demo_orders=4, tlm_demo_augment="rot90,flip_h")
    sequences, fields = source.rows(0)
    assert len(sequences) == 4 * 3 and fields["augments"] == ["rot90", "flip_h"] and fields["augments_skipped"] == {}
    seed = source.split(0)["seed"]
    expected_orders = orders(len(demos), 4, seed)
    transforms = {"identity": lambda a: a, "rot90": NUMPY["rot90"], "flip_h": NUMPY["flip_h"]}
    for n, sequence in enumerate(sequences):
        messages = sequence["input_ids"]  # the recording encoder keeps the messages
        name = list(transforms)[n % 3]
        order = expected_orders[n // 3]
        want = []
        for k in order:
            x, y = (as_text(transforms[name](np.array(grids.parse_grid(t)))) for t in demos[k])
            want += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
        assert messages == want, (n, name)
        assert all("7 7 7" not in m["content"] for m in messages)


def test_an_augmentation_that_does_not_apply_to_a_row_is_left_out_and_counted():
    rng = random.Random(4)
    grid_row, _, _ = _grid_row(rng)
    text_row = {
        "_prompt": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
            {"role": "user", "content": "1+1?"},
        ],
        "_response": [{"role": "assistant", "content": "2"}],
        "_system": "",
        "_tools": "",
    }
    source = _source([grid_row, text_row], tlm_demo_orders=2, tlm_demo_augment="transpose,colors")
    grid_sequences, grid_fields = source.rows(0)
    text_sequences, text_fields = source.rows(1)
    assert len(grid_sequences) == 6 and grid_fields["augments_skipped"] == {}
    assert len(text_sequences) == 2 and text_fields["augments"] == []
    assert set(text_fields["augments_skipped"]) == {"transpose", "colors"}


def test_the_cap_keeps_every_augmentation_of_the_first_orders():
    rng = random.Random(5)
    row, _, _ = _grid_row(rng)
    source = _source([row], tlm_demo_orders=40, tlm_demo_augment="dihedral", tlm_demo_max_sequences=20)
    sequences, fields = source.rows(0)
    assert len(sequences) == 20 and fields["sequences_capped"] == 40 * 8


def test_augmented_inference_forms_and_the_vote_mapped_back():
    rng = random.Random(6)
    row, demos, query = _grid_row(rng)
    source = _source(
        [row], tlm_demo_orders=2, tlm_demo_augment="rot90,colors", tlm_demo_vote_augment=True, tlm_demo_votes=2
    )
    fields = source.fields(0)
    forms = fields["vote_forms"]
    # 3 versions (identity, rot90, colors) x 2 orders, less the prompt itself
    assert [f["augment"] for f in forms] == ["identity", "rot90", "rot90", "colors", "colors"]
    seed = source.split(0)["seed"]
    rot_query = forms[1]["messages"][-1]["content"]
    assert rot_query == as_text(NUMPY["rot90"](np.array(grids.parse_grid(query))))
    assert forms[1]["messages"][:-1][1]["content"] == as_text(NUMPY["rot90"](np.array(grids.parse_grid(demos[0][1]))))
    # answers: identity says T; rot90 says rot90(T) twice (maps back to T); colors says garbage once, T once
    truth = "1 2\n3 4"
    rotated = as_text(NUMPY["rot90"](np.array(grids.parse_grid(truth))))
    coloured = augment.AUGMENTATIONS["colors"].forward(truth, seed)
    other = "5 5\n5 5"
    answers = [other, truth, rotated, rotated, "not a grid", coloured]
    voted = source.vote(0, ["identity"] + [f["augment"] for f in forms], answers)
    assert voted["winner"] == truth and voted["winner_position"] == 1
    assert voted["top2"] == [truth, other] and voted["abstentions"] == {"colors": 1}
    assert voted["candidates"][0] == {"answer": truth, "nominations": 3, "votes": 4, "identity_votes": 1}


HISTORY_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}


@pytest.mark.slow
def test_llamafactory_cli_train_with_augmentations_and_augmented_voting(tiny_model, tmp_path):
    """End to end as a user runs it: two test inputs of one grid task (the second reuses the task's adapter and its
    stored losses), and a text task that no grid augmentation applies to (left out, counted)."""
    from tlm_testing import base_recipe, read_jsonl, run_cli, write_dataset

    rng = random.Random(7)
    demos = [[as_text(random_grid(rng, 4)), as_text(random_grid(rng, 4))] for _ in range(3)]
    tests = [(as_text(random_grid(rng, 4)), "9 9\n9 9"), (as_text(random_grid(rng, 4)), "8 8\n8 8")]
    rows = [{"instruction": x, "input": "", "output": y, "history": demos} for x, y in tests]
    rows.append({"instruction": "1+1?", "input": "", "output": "2", "history": [["2+2?", "4"], ["3+3?", "6"]]})
    data = write_dataset(tmp_path / "data", rows, columns=HISTORY_COLUMNS)
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        data,
        out,
        tlm_selector="demos",
        tlm_mode="per_prompt",
        tlm_demo_orders=2,
        tlm_demo_augment="rot90,colors",
        tlm_demo_vote_augment=True,
        tlm_demo_votes=2,
        tlm_eval_answers=True,
        do_predict=True,
        max_new_tokens=12,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=8,
    )
    proc = run_cli(recipe, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "tlm_demos.jsonl")
    first, second, text = records
    assert first["augments"] == ["rot90", "colors"] and first["augments_skipped"] == {}
    assert first["steps"] == 3 and first["cache_hit"] is False  # 2 orders x 3 versions = 6 sequences, batches of 2
    assert second["cache_hit"] is True and second["steps"] == 0 and second["task"] == first["task"]
    assert (second["data_loss_before"], second["data_loss_after"]) == (
        first["data_loss_before"],
        first["data_loss_after"],
    )
    assert set(text["augments_skipped"]) == {"rot90", "colors"} and text["steps"] == 1  # 2 orders, one batch
    for record in (first, second):
        assert len(record["vote_answers"]) == 3 * 2  # (identity, rot90, colors) x 2 orders, one generate each
        assert [v["augment"] for v in record["vote_answers"]] == ["identity"] * 2 + ["rot90"] * 2 + ["colors"] * 2
        for vote in record["vote_answers"]:  # what was mapped back is the numpy inverse of what was written
            grid = grids.parse_grid(vote["raw"].strip())
            if vote["augment"] == "rot90" and grid is not None:
                assert vote["answer"] == as_text(np.rot90(np.array(grid), 1))
            if vote["augment"] != "identity" and grid is None:
                assert vote["answer"] is None
        assert len(record["top2"]) == min(2, len(record["candidates"]))
    assert set(text["vote_augments_skipped"]) == {"rot90", "colors"}
    predictions = read_jsonl(out / "generated_predictions.jsonl")
    for record, prediction in zip(records, predictions, strict=True):
        winner = record["candidates"][0]["answer"] if record.get("candidates") else None
        assert winner is None or prediction["predict"].strip() == winner
    log = read_jsonl(out / "trainer_log.jsonl")  # LlamaBoard's progress bar and loss curve
    assert [x["current_steps"] for x in log] == [1, 2, 3] and {x["total_steps"] for x in log} == {3}
    assert log[0]["loss"] == round(sum(first["step_losses"]) / 3, 4) and log[1]["loss"] is None  # cached: no steps
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["per_prompt"]["n_augments_skipped"] == {"rot90": 1, "colors": 1}
    assert summary["per_prompt"]["n_cache_hits"] == 1


def test_single_turn_prompts_take_a_users_own_augmentation(tmp_path, monkeypatch):
    """A text task family brings its own pair of functions: the Q/A blocks of a single-turn prompt are rewritten with
    the augmented demonstrations (the answer spans follow them), and the query with the augmented query."""
    (tmp_path / "upper_augs.py").write_text(
        "def up(text, seed):\n    return text.upper()\n\ndef down(text, seed):\n    return text.lower()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    text = "Copy the word.\nQ: cat\nA: cat\nQ: dog\nA: dog\nQ: owl\nA:"
    row = {"_prompt": [{"role": "user", "content": text}], "_response": [], "_system": "", "_tools": ""}
    source = _source(
        [row], tlm_demo_augment="upper_augs:up:down", tlm_demo_vote_augment=True, tlm_demo_orders=1, tlm_demo_votes=1
    )
    split = source.split(0)
    assert split["source"] == "pattern" and split["demos"] == [("cat", "cat"), ("dog", "dog")]
    blocks = source._blocks(split, [("CAT", "CAT"), ("DOG", "DOG")])
    assert [b for b, _ in blocks] == ["Q: CAT\nA: CAT\n", "Q: DOG\nA: DOG\n"]
    assert [b[s:e] for b, (s, e) in blocks] == ["CAT", "DOG"]
    (form,) = source.fields(0)["vote_forms"]
    assert form["augment"] == "upper_augs:up:down"
    assert form["messages"][-1]["content"] == "Copy the word.\nQ: CAT\nA: CAT\nQ: DOG\nA: DOG\nQ: OWL\nA:"
    voted = source.vote(0, ["identity", form["augment"]], ["owl", "OWL"])
    assert voted["candidates"][0] == {"answer": "owl", "nominations": 2, "votes": 2, "identity_votes": 1}
    sys.modules.pop("upper_augs", None)
