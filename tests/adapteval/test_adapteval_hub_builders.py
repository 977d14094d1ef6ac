"""The ten paper datasets, built against in-memory stand-ins of their hub datasets (upstream column layouts), so
the real loading calls and formatting code run without network."""

import json

import pytest

from adapteval import build
from adapteval.datasets._hub import load_split
from adapteval.datasets._prompts import ALPACA_INTRO
from adapteval.errors import DataUnavailableError


COT_END = "\n\n### Response: Let's think step by step."
LOGIQA_OPTIONS = ["Zhao chose car.", "Zhao did not choose car.", "Li chose ship.", "Zhang chose plane."]

UPSTREAM = {
    ("daven3/geosignal", None, "train"): [
        {
            "instruction": "What is basalt?",
            "input": "",
            "output": "A volcanic rock.",
            "category": "geo",
            "type": "geo",
        },
        {"instruction": "Define strata.", "input": "", "output": None, "category": "geo", "type": "geo"},
    ],
    ("KisanVaani/agriculture-qa-english-only", None, "train"): [
        {"question": "Why do cassava cuttings mature faster?", "answers": "They have a head start."},
    ],
    ("wangrongsheng/GenMedGPT-5k-en", None, "train"): [
        {
            "instruction": "If you are a doctor, please answer the medical questions based on the patient's description.",
            "input": "Doctor, I have a cough.",
            "output": "You may have a cold.",
        },
    ],
    ("gbharti/wealth-alpaca_lora", None, "train"): [
        {"instruction": "What is an IRA?", "input": "", "output": "A retirement account.", "text": "rendered"},
        {"instruction": "Classify the sentiment.", "input": "Stocks fell.", "output": "negative", "text": "rendered"},
    ],
    ("databricks/databricks-dolly-15k", None, "train"): [
        {
            "instruction": "Who created the beast quake?",
            "context": "",
            "response": "Marshawn Lynch",
            "category": "open_qa",
        },
        {
            "instruction": "When was the tower built?",
            "context": "The tower was built in 1889.",
            "response": "In 1889.",
            "category": "closed_qa",
        },
    ],
    ("llamafactory/alpaca_gpt4_en", None, "train"): [
        {"instruction": "Explain DNA to a child.", "input": "", "output": "DNA is a recipe for you."},
    ],
    ("json", None, "train"): [
        {"instruction": "List three travel spots.", "input": "", "output": "Meghalaya, Atacama, Georgia.", "id": "1"},
    ],
    ("openai/gsm8k", "main", "train"): [
        {"question": "How many donated items?", "answer": "45 + 90 = 135\n#### 375"},
        {"question": "How many dollars?", "answer": "no final answer line"},
    ],
    ("openai/gsm8k", "main", "test"): [
        {"question": "How many grains?", "answer": "10 * 10,000 = 100,000\n#### 100,000"},
    ],
    ("meta-math/MetaMathQA", None, "train"): [
        {
            "type": "MATH_AnsAug",
            "query": "What is $\\lceil\\sqrt{49/4}\\rceil$?",
            "original_question": "What is $\\lceil\\sqrt{49/4}\\rceil$?",
            "response": "The square root is 7/2 = 3.5, so the ceiling is 4.\nThe answer is: 4",
        },
    ],
    ("lucasmccabe/logiqa", None, "train"): [
        {
            "context": "Four people travel.\n",
            "query": "Which can be drawn?",
            "options": LOGIQA_OPTIONS,
            "correct_option": 1,
        },
    ],
    ("lucasmccabe/logiqa", None, "validation"): [
        {"context": "Two facts.", "query": "Which follows?", "options": LOGIQA_OPTIONS, "correct_option": "3"},
    ],
    ("lucasmccabe/logiqa", None, "test"): [
        {"context": "Bad row.", "query": "Only three options?", "options": LOGIQA_OPTIONS[:3], "correct_option": 0},
    ],
}


def _rows(out_dir, name):
    return json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))


def _by_instruction(rows):
    return {row["instruction"]: row for row in rows}


@pytest.fixture
def hub_build(fake_hub, tmp_path):
    hub = fake_hub(UPSTREAM)
    manifest = build("all", tmp_path, n=50, seed=1)
    return hub, manifest, tmp_path


def test_every_paper_dataset_builds_from_its_upstream_layout(hub_build):
    _, manifest, out = hub_build
    expected_rows = {
        "geography": 1,  # the row with a null output is skipped
        "agriculture": 1,
        "medicine": 1,
        "finance": 2,
        "dolly": 2,
        "alpaca_gpt4": 1,
        "instruction_wild": 1,
        "gsm8k": 2,  # train + test pooled; the row without "####" is skipped
        "metamath": 1,
        "logiqa": 2,  # the row with three options is skipped
    }
    assert {name: record["rows"] for name, record in manifest["datasets"].items()} == expected_rows
    for name, record in manifest["datasets"].items():
        assert record["source_kind"] == "hub" and record["seed"] == 1
        rows = _rows(out, name)
        assert all(row["source"].startswith("hf:") for row in rows)
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == set(expected_rows)


def test_load_dataset_calls_use_the_right_configs_and_workarounds(hub_build):
    hub, _, _ = hub_build
    calls = {(call["path"], call["name"], call["split"]): call for call in hub.calls}
    assert ("openai/gsm8k", "main", "train") in calls and ("openai/gsm8k", "main", "test") in calls
    for split in ("train", "validation", "test"):
        assert calls[("lucasmccabe/logiqa", None, split)]["revision"] == "refs/convert/parquet"
    wild = calls[("json", None, "train")]
    assert wild["data_files"] == "hf://datasets/fuliucansheng/InstructionWild/instinwild_en.json"


def test_alpaca_layout_datasets_pass_through(hub_build):
    _, _, out = hub_build
    finance = _by_instruction(_rows(out, "finance"))
    assert finance["Classify the sentiment."]["input"] == "Stocks fell."
    assert finance["Classify the sentiment."]["output"] == "negative"
    assert "text" not in finance["What is an IRA?"]
    agriculture = _rows(out, "agriculture")[0]
    assert agriculture["instruction"] == "Why do cassava cuttings mature faster?"
    assert (agriculture["input"], agriculture["output"]) == ("", "They have a head start.")
    wild = _rows(out, "instruction_wild")[0]
    assert wild["source"] == "hf:fuliucansheng/InstructionWild/instinwild_en.json"


def test_dolly_uses_databricks_training_format(hub_build):
    _, _, out = hub_build
    rows = {row["output"]: row for row in _rows(out, "dolly")}
    assert rows["Marshawn Lynch"]["instruction"] == (
        f"{ALPACA_INTRO}\n\n### Instruction:\nWho created the beast quake?\n\n### Response:\n"
    )
    assert rows["In 1889."]["instruction"] == (
        f"{ALPACA_INTRO}\n\n### Instruction:\nWhen was the tower built?\n\n"
        "Input:\nThe tower was built in 1889.\n\n### Response:\n"
    )
    assert rows["In 1889."]["input"] == ""


def test_math_datasets_use_the_cot_prompt_and_final_answers(hub_build):
    _, _, out = hub_build
    gsm8k = {row["output"]: row for row in _rows(out, "gsm8k")}
    assert set(gsm8k) == {"375", "100,000"}  # kept as written; the metric strips separators on both sides
    assert gsm8k["375"]["instruction"] == (f"{ALPACA_INTRO}\n\n### Instruction:\nHow many donated items?{COT_END}")
    assert {row["source_file"] for row in gsm8k.values()} == {"main/train", "main/test"}
    metamath = _rows(out, "metamath")[0]
    assert metamath["output"] == "4"
    assert metamath["instruction"].endswith("What is $\\lceil\\sqrt{49/4}\\rceil$?" + COT_END)


def test_logiqa_uses_the_logiqa2_prompt_and_letters(hub_build):
    _, _, out = hub_build
    rows = {row["output"]: row for row in _rows(out, "logiqa")}
    assert set(rows) == {"B", "D"}  # correct_option 1 (int) and "3" (string)
    assert rows["B"]["instruction"] == (
        "Write a multi-choice question for the following article:\n Article: Four people travel.\n"
        " Question: Which can be drawn?\n Options: A. Zhao chose car.\n B. Zhao did not choose car.\n"
        " C. Li chose ship.\n D. Zhang chose plane.\n\n Answer:"
    )
    assert rows["D"]["source_file"] == "validation" and rows["D"]["source_version"] == "refs/convert/parquet"


def test_sampling_is_seeded(fake_hub, tmp_path):
    fake_hub(
        {
            ("llamafactory/alpaca_gpt4_en", None, "train"): [
                {"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(40)
            ]
        }
    )
    first = build("alpaca_gpt4", tmp_path / "a", n=10, seed=7)
    again = build("alpaca_gpt4", tmp_path / "b", n=10, seed=7)
    other = build("alpaca_gpt4", tmp_path / "c", n=10, seed=8)
    rows_a, rows_b, rows_c = (_rows(tmp_path / d, "alpaca_gpt4") for d in "abc")
    assert rows_a == rows_b and rows_a != rows_c
    assert len(rows_a) == 10 and len({row["source_row"] for row in rows_a}) == 10
    assert first["datasets"]["alpaca_gpt4"]["seed"] == 7 and other["datasets"]["alpaca_gpt4"]["seed"] == 8
    assert first["datasets"]["alpaca_gpt4"]["sha256"] == again["datasets"]["alpaca_gpt4"]["sha256"]


def test_duplicates_are_dropped(fake_hub, tmp_path):
    row = {"instruction": "Same question", "input": "", "output": "Same answer"}
    fake_hub({("llamafactory/alpaca_gpt4_en", None, "train"): [row, dict(row), {**row, "input": "other"}]})
    manifest = build("alpaca_gpt4", tmp_path, n=5)
    record = manifest["datasets"]["alpaca_gpt4"]
    assert record["rows"] == 2 and record["skipped_duplicate"] == 1


def test_no_hub_error_says_what_to_do(fake_hub, tmp_path):
    fake_hub({})  # every load fails like an unreachable hub
    with pytest.raises(DataUnavailableError) as error:
        build("gsm8k", tmp_path, n=5)
    message = str(error.value)
    assert message.startswith("gsm8k: could not load 'openai/gsm8k'")
    assert "--offline" in message and "--fixed-dir" in message and "gsm8k_random_5k.json" in message
    assert not (tmp_path / "dataset_info.json").exists()  # nothing written on failure


def test_real_load_dataset_without_hub_access_gives_the_same_error(hub_offline):
    # HF_HUB_OFFLINE=1 (conftest): the real datasets.load_dataset fails fast, as on a machine without network.
    with pytest.raises(DataUnavailableError, match=r"could not load 'adapteval-tests/not-a-dataset'.*--offline"):
        load_split("adapteval-tests/not-a-dataset", "train")


def test_fixed_file_takes_precedence_over_the_hub(fake_hub, tmp_path):
    hub = fake_hub(UPSTREAM)
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    released = [{"instruction": f"q{i}", "input": "", "output": str(i)} for i in range(6)]
    (fixed / "gsm8k_random_5k.json").write_text(json.dumps(released))
    manifest = build("reasoning", tmp_path / "out", n=4, seed=3, fixed_dir=fixed)
    assert "openai/gsm8k" not in hub.paths()
    record = manifest["datasets"]["gsm8k"]
    assert record["source_kind"] == "fixed" and record["rows"] == 4
    rows = _rows(tmp_path / "out", "gsm8k")
    assert [row["source_row"] for row in rows] == sorted(row["source_row"] for row in rows)  # file order kept
    assert manifest["datasets"]["metamath"]["source_kind"] == "hub"
