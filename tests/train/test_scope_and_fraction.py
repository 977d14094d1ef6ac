"""``tlm_loss_tokens: user`` and the calibrated threshold ``tlm_select_fraction``."""

import json

import pytest
import torch
from tlm_testing import QUESTIONS, base_recipe, read_jsonl

from tlm_plugin.hparams import TLMArguments
from tlm_plugin.selectors.perplexity import quantile_threshold
from tlm_plugin.train.setup import build_selector


def test_quantile_threshold_selects_the_requested_fraction():
    log_ppl = torch.tensor([4.0, 2.0, 5.0, 3.0, 1.0, 6.0, 0.5, 2.5])
    for fraction, expected in [(0.5, 4), (0.25, 2), (1.0, 8), (0.1, 1)]:
        thr = quantile_threshold(log_ppl, fraction)
        assert int((log_ppl > thr).sum()) == expected


def test_offline_fraction_overrides_log_p0_and_records_it():
    selector = build_selector(TLMArguments(tlm_select_fraction=0.5, tlm_log_p0=100.0))
    w = selector.weights(torch.tensor([4.0, 2.0, 5.0, 3.0]))
    assert (w > 0).tolist() == [True, False, True, False]
    assert selector.log_p0_used == 3.0
    assert w[0].item() == pytest.approx(0.1 * torch.exp(torch.tensor(1.0)).item())


def test_online_fraction_is_a_running_quantile_of_the_prompts_seen():
    selector = build_selector(TLMArguments(tlm_select_fraction=0.5, tlm_mode="online"))
    assert selector.weights(torch.tensor([3.0, 1.0])).tolist()[1] == 0
    assert selector.log_p0_used == 1.0
    selector.weights(torch.tensor([10.0, 9.0]))  # seen: 3, 1, 10, 9 -> threshold 3
    assert selector.log_p0_used == 3.0


@pytest.mark.slow
def test_user_scope_scores_match_a_direct_computation(tiny_model, tiny_data, tmp_path):
    from llamafactory.train.tuner import run_exp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    run_exp(base_recipe(tiny_model, tiny_data, out, tlm_loss_tokens="user", tlm_select_fraction=0.5))
    rows = read_jsonl(out / "tlm_scores.jsonl")
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["loss_tokens"] == "user"
    assert summary["n_selected"] == len(QUESTIONS) // 2
    assert summary["log_p0_used"] == pytest.approx(sorted(r["log_ppl"] for r in rows)[len(rows) // 2 - 1])

    # expected values computed here, without the plugin's helpers: the chatml prompt as text, the user's
    # characters located in it, each token kept when most of its characters are the user's, and the NLL of the kept
    # tokens from a plain forward of the unadapted model
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    head = "<|im_start|>user\n"
    for row, (question, _) in zip(rows, QUESTIONS):
        text = f"{head}{question}<|im_end|>\n<|im_start|>assistant\n"
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start, end = len(head), len(head) + len(question)
        keep = [2 * max(0, min(b, end) - max(a, start)) > (b - a) for a, b in enc["offset_mapping"]]
        assert tokenizer.decode([t for t, k in zip(enc["input_ids"], keep) if k]).strip() == question
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        nll = -log_probs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        counted = torch.tensor(keep[1:])
        assert row["n_tokens"] == ids.shape[1]
        assert row["log_ppl"] == pytest.approx(float(nll[counted].mean()), abs=1e-4)
        assert abs(row["log_ppl"] - float(nll.mean())) > 1e-3  # the scope really changed what is counted
        assert row["log_ppl_user"] == pytest.approx(row["log_ppl"], abs=1e-6)
        assert row["log_ppl_user_after"] == pytest.approx(row["log_ppl_after"], abs=1e-6)


def test_prompt_scope_run_also_records_the_user_token_log_ppl(tiny_model, tiny_data, tmp_path):
    """The default scope trains on the whole prompt; the user-token record shows what reached the user's text."""
    from llamafactory.train.tuner import run_exp

    user_out, prompt_out = tmp_path / "user", tmp_path / "prompt"
    run_exp(base_recipe(tiny_model, tiny_data, user_out, tlm_loss_tokens="user", do_train=False))
    run_exp(base_recipe(tiny_model, tiny_data, prompt_out, tlm_selector="all", learning_rate=1e-2))
    user_rows, prompt_rows = read_jsonl(user_out / "tlm_scores.jsonl"), read_jsonl(prompt_out / "tlm_scores.jsonl")
    for user_row, prompt_row in zip(user_rows, prompt_rows, strict=True):
        # before adaptation both runs score the same unadapted model over the same user tokens
        assert prompt_row["log_ppl_user"] == pytest.approx(user_row["log_ppl"], abs=1e-5)
        assert prompt_row["log_ppl_user"] != pytest.approx(prompt_row["log_ppl"], abs=1e-3)
        assert prompt_row["log_ppl_user_after"] != pytest.approx(prompt_row["log_ppl_user"], abs=1e-6)
    summary = json.loads((prompt_out / "tlm_summary.json").read_text())
    assert summary["loss_tokens"] == "prompt"
    assert summary["mean_log_ppl_user_before"] == pytest.approx(
        sum(r["log_ppl_user"] for r in prompt_rows) / len(prompt_rows)
    )
    assert summary["mean_log_ppl_user_after"] < summary["mean_log_ppl_user_before"]
