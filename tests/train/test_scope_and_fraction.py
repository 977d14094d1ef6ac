"""``tlm_loss_tokens: user`` and the calibrated threshold ``tlm_select_fraction``."""

import json

import pytest
import torch
from tlm_testing import QUESTIONS, base_recipe, read_jsonl

from tlm_plugin.hparams import TLMArguments
from tlm_plugin.train.setup import build_selector
from tlm_plugin.selectors.perplexity import quantile_threshold


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
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from llamafactory.train.tuner import run_exp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tlm_plugin.train.loss import log_perplexity
    from tlm_plugin.train.token_scope import user_content_mask

    out = tmp_path / "out"
    run_exp(base_recipe(tiny_model, tiny_data, out, tlm_loss_tokens="user", tlm_select_fraction=0.5))
    rows = read_jsonl(out / "tlm_scores.jsonl")
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["loss_tokens"] == "user"
    assert summary["n_selected"] == len(QUESTIONS) // 2
    assert summary["log_p0_used"] == pytest.approx(sorted(r["log_ppl"] for r in rows)[len(rows) // 2 - 1])

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="chatml"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for row, (question, answer) in zip(rows, QUESTIONS):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, mask = user_content_mask(template, tokenizer, messages)
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == question
        ids_t, mask_t = torch.tensor([ids]), torch.tensor([mask])
        with torch.no_grad():
            direct, _ = log_perplexity(model(ids_t).logits, ids_t, mask_t)
        assert row["log_ppl"] == pytest.approx(float(direct), abs=1e-4)
        full, _ = log_perplexity(model(ids_t).logits.detach(), ids_t, torch.ones_like(ids_t))
        assert abs(row["log_ppl"] - float(full)) > 1e-3  # the scope really changed what is counted
        assert row["log_ppl_user"] == pytest.approx(row["log_ppl"], abs=1e-6)
        assert row["log_ppl_user_after"] == pytest.approx(row["log_ppl_after"], abs=1e-6)


def test_prompt_scope_run_also_records_the_user_token_log_ppl(tiny_model, tiny_data, tmp_path):
    """The default scope trains on the whole prompt; the user-token record shows what reached the user's text."""
    from llamafactory.train.tuner import run_exp

    user_out, prompt_out = tmp_path / "user", tmp_path / "prompt"
    run_exp(base_recipe(tiny_model, tiny_data, user_out, tlm_loss_tokens="user", do_train=False))
    run_exp(base_recipe(tiny_model, tiny_data, prompt_out, tlm_selector="all"))
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
