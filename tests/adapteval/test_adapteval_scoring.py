"""``adapteval.scoring``: what a cell reads from a finished run's output_dir (through ``tlm_plugin.train.outputs``)."""

import json

import pytest

from adapteval.errors import RunnerError
from adapteval.scoring import answer_fields, read_predictions, vote_on_extracted_answers
from tlm_plugin.train.outputs import DEMOS_FILE, PREDICTIONS_FILE, SCORES_FILE


def write_lines(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def test_predictions_are_read_one_per_row(tmp_path):
    rows = [{"prompt": "p", "predict": "a", "label": "l"}, {"prompt": "p", "predict": None, "label": "l"}]
    path = write_lines(tmp_path / PREDICTIONS_FILE, rows)
    assert read_predictions(path, 2, "d/m") == ["a", ""]
    with pytest.raises(RunnerError, match=r"cell d/m: generated_predictions.jsonl has 2 predictions for 3 input rows"):
        read_predictions(path, 3, "d/m")
    with pytest.raises(RunnerError, match="the run wrote no"):
        read_predictions(tmp_path / "none.jsonl", 2, "d/m")


@pytest.mark.parametrize("bad", ["not json\n", "[1, 2]\n", '{"predict": "torn'])
def test_a_broken_prediction_line_is_named(tmp_path, bad):
    path = write_lines(tmp_path / PREDICTIONS_FILE, [{"predict": "a"}], tail=bad)
    with pytest.raises(RunnerError, match="generated_predictions.jsonl line 2 is not a complete JSON object"):
        read_predictions(path, 2, "d/m")


def test_answer_fields_skip_unmeasured_truncated_and_torn_rows(tmp_path):
    rows = [
        {
            "index": 0,
            "answer_bpb": 1.0,
            "answer_bpb_base": 2.0,
            "answer_content_bpb": 0.5,
            "answer_content_bpb_base": 1,
        },
        {"index": 1, "answer_bpb": None},
        {"index": 2, "answer_bpb": 9.0, "answer_truncated": True},
        {
            "index": 3,
            "answer_bpb": 3.0,
            "answer_bpb_base": 4.0,
            "answer_content_bpb": 1.5,
            "answer_content_bpb_base": 2,
        },
    ]
    write_lines(tmp_path / SCORES_FILE, rows, tail='{"index": 4, "answer_bpb": 10')  # a run killed mid-line
    fields = answer_fields(tmp_path)
    assert fields["answer_rows"] == [0, 3]
    assert (fields["answer_bpb"], fields["answer_bpb_base"]) == (2.0, 3.0)
    assert fields["answer_content_bpb_per_row"] == [0.5, 1.5] and fields["answer_content_bpb_base"] == 1.5
    assert answer_fields(tmp_path / "no-run") == {
        "answer_rows": None,
        **{f"{k}{s}": None for k in ("answer_bpb", "answer_bpb_base") for s in ("_per_row", "")},
        **{f"{k}{s}": None for k in ("answer_content_bpb", "answer_content_bpb_base") for s in ("_per_row", "")},
    }


def test_demo_votes_are_taken_again_on_the_extracted_answers(tmp_path):
    votes = ["So the answer is 12.", "The answer is 7", "7 apples"]  # two say 7 in different words
    write_lines(tmp_path / DEMOS_FILE, [{"index": 1, "votes": votes}, {"index": 0, "votes": ["5"]}])
    predictions = ["5", "So the answer is 12."]
    assert vote_on_extracted_answers("gsm8k", tmp_path, predictions) == ["5", "The answer is 7"]
    assert vote_on_extracted_answers("chatterbot", tmp_path, predictions) == predictions  # not exact match
    assert vote_on_extracted_answers("gsm8k", tmp_path / "no-run", predictions) == predictions
