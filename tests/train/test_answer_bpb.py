"""``tlm_eval_answers``: bits per byte of the reference answers, checked against a direct computation."""

import json
import math

import pytest
import torch
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, write_dataset


pytestmark = pytest.mark.slow


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def test_bits_per_byte_match_a_direct_computation_and_rows_without_answers_are_counted(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS]
    rows[2]["output"] = ""  # no reference answer: skipped and counted
    rows[5]["output"] = "Café — naïve ✓"  # multi-byte characters: bytes, not characters
    data = write_dataset(tmp_path / "data", rows)
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, data, out, do_train=False, tlm_eval_answers=True))
    records = read_jsonl(out / "tlm_scores.jsonl")
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["n_answers"] == len(rows) - 1 and summary["n_answers_missing"] == 1
    assert "answer_bpb_base" not in records[2]

    # independently: the chatml prompt, the label tokens = the answer then the template's "<|im_end|>\n",
    # the NLL of the label tokens from a plain forward, the UTF-8 byte count of the answer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for i, row in enumerate(rows):
        if not row["output"]:
            continue
        prompt = tokenizer.encode(f"<|im_start|>user\n{row['instruction']}<|im_end|>\n<|im_start|>assistant\n")
        labels = tokenizer.encode(row["output"] + "<|im_end|>\n")
        content = tokenizer.encode(row["output"])
        assert labels[: len(content)] == content
        ids = torch.tensor([prompt + labels])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        positions = range(len(prompt) - 1, ids.shape[1] - 1)  # logits at t predict token t + 1
        nll = [-float(log_probs[t, ids[0, t + 1]]) for t in positions]
        nbytes = len(row["output"].encode("utf-8"))
        rec = records[i]
        assert (rec["answer_tokens"], rec["answer_content_tokens"], rec["answer_bytes"]) == (
            len(labels),
            len(content),
            nbytes,
        )
        assert rec["answer_bpb_base"] == pytest.approx(sum(nll) / math.log(2) / nbytes, rel=1e-5)
        assert rec["answer_content_bpb_base"] == pytest.approx(
            sum(nll[: len(content)]) / math.log(2) / nbytes, rel=1e-5
        )
        assert rec["answer_bpb"] == rec["answer_bpb_base"]  # do_train: false measures the base model alone
    assert summary["mean_answer_bpb_base"] == pytest.approx(
        sum(r["answer_bpb_base"] for r in records if "answer_bpb_base" in r) / (len(rows) - 1)
    )


def test_offline_measures_the_adapted_model(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_in_process(
        base_recipe(tiny_model, tiny_data, out, tlm_selector="all", learning_rate=1e-2, tlm_eval_answers=True)
    )
    records = read_jsonl(out / "tlm_scores.jsonl")
    assert all(r["answer_bpb"] != r["answer_bpb_base"] for r in records)
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["mean_answer_bpb"] == pytest.approx(sum(r["answer_bpb"] for r in records) / len(records))
