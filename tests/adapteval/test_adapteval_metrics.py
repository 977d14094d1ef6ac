"""Metrics: ROUGE-Lsum sentence splitting, BLEU, exact match through ``score_predictions``, the registry."""

import pytest

from adapteval.metrics import (
    METRIC_GROUPS,
    METRICS,
    corpus_bleu,
    rouge_per_sample,
    score_predictions,
    split_sentences,
)
from adapteval.registry import specs


REFERENCE = "The cat sat on the mat. The dog barked loudly at the mailman!"
PREDICTION = "The dog barked loudly at the mailman. The cat sat on the mat."


def test_split_sentences_needs_no_downloaded_data():
    text = 'He said "Stop." Then he left.\nA new line? Yes! (Really.) Done'
    assert split_sentences(text) == ['He said "Stop."', "Then he left.", "A new line?", "Yes!", "(Really.)", "Done"]
    assert split_sentences("") == []


def test_rouge_lsum_sentence_splitting_scores_reordered_sentences_higher():
    # Same two sentences in swapped order. One line: rougeLsum is plain LCS = 7 of 13 tokens each side,
    # F1 = 7/13. One sentence per line: the summary-level union LCS recovers every token, F1 = 1.
    split = rouge_per_sample([PREDICTION], [REFERENCE], split=True)
    unsplit = rouge_per_sample([PREDICTION], [REFERENCE], split=False)
    assert unsplit["rougeLsum"][0] == pytest.approx(7 / 13)
    assert split["rougeLsum"][0] == pytest.approx(1.0)
    # rouge1/2/L ignore line breaks
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        assert split[rouge_type] == pytest.approx(unsplit[rouge_type])
    assert split["rougeL"][0] == pytest.approx(7 / 13)
    assert split["rouge2"][0] == pytest.approx(11 / 12)  # only "mat the" / "mailman the" bigrams differ


def test_rouge_uses_stemming():
    scores = rouge_per_sample(["the dogs were barking"], ["the dog was barked"])
    assert scores["rouge1"][0] == pytest.approx(0.75)  # the, dog(s), bark(ing/ed) match; were/was do not


def test_corpus_bleu_is_scaled_to_unit_interval():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert corpus_bleu(["completely different words here"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_score_predictions_rouge_dataset_reports_the_appendix_metrics():
    result = score_predictions("medicine", [PREDICTION, REFERENCE], [REFERENCE, REFERENCE])
    assert result["metric"] == "rougeLsum"
    assert set(result["scores"]) == {"rougeLsum", "rouge1", "rouge2", "rougeL", "bleu"}
    assert result["per_sample"] == pytest.approx([1.0, 1.0])
    assert result["score"] == result["scores"]["rougeLsum"]
    assert result["scores"]["rougeL"] == pytest.approx((7 / 13 + 1.0) / 2)
    assert result["n"] == 2 and result["answer_format"] is None


def test_empty_prediction_scores_zero_and_is_counted():
    rouge = score_predictions("dolly", ["", "   ", REFERENCE], [REFERENCE, REFERENCE, REFERENCE])
    assert rouge["per_sample"] == pytest.approx([0.0, 0.0, 1.0])
    assert rouge["score"] == pytest.approx(1 / 3)
    assert rouge["n"] == 3 and rouge["n_empty_predictions"] == 2

    em = score_predictions("gsm8k", ["", None, "The answer is 18"], ["18", "18", "18"])
    assert em["per_sample"] == [0.0, 0.0, 1.0]
    assert em["score"] == pytest.approx(1 / 3)
    assert em["n_empty_predictions"] == 2


def test_exact_match_per_dataset_extraction():
    gsm8k = score_predictions(
        "gsm8k",
        ["... so 100000 in total.", "3 + 4 = 7, then 7 * 2 = 14", "It is 18.0", "I do not know"],
        ["100,000", "14", "18", "5"],
    )
    assert gsm8k["per_sample"] == [1.0, 1.0, 1.0, 0.0]
    assert gsm8k["answer_format"] == "gsm8k"

    metamath = score_predictions(
        "metamath",
        [r"so the probability is $\boxed{\frac{1}{2}}$", "half of 8 is 4, so 3/4", "there are 12", r"\boxed{x^2+1}"],
        [r"\frac{1}{2}", "0.75", "12", "x^2+1"],
    )
    assert metamath["per_sample"] == [1.0, 1.0, 1.0, 1.0]

    logiqa = score_predictions("logiqa", ["B", "The answer is (C)", "Answer: A. Zhao chose ...", "D."], list("BCAB"))
    assert logiqa["per_sample"] == [1.0, 1.0, 1.0, 0.0]
    assert logiqa["score"] == pytest.approx(0.75)


def test_offline_packs_use_their_bench_metric():
    assert score_predictions("gsm_symbolic", ["The answer is 1,828."], ["1828"])["score"] == 1.0
    assert score_predictions("logiqa_evals", ["(D)"], ["D"])["score"] == 1.0
    assert score_predictions("chatterbot", ["Richard Nixon"], ["Richard Nixon"])["metric"] == "rougeLsum"


def test_length_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"3 predictions but 2 references"):
        score_predictions("gsm8k", ["1", "2", "3"], ["1", "2"])


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown AdaptEval dataset 'gsm9k'.*valid datasets: .*gsm8k"):
        score_predictions("gsm9k", ["1"], ["1"])


def test_metric_registry_metadata_matches_the_datasets():
    for spec in specs():
        assert spec.metric in METRIC_GROUPS, spec.name
        for metric in METRIC_GROUPS[spec.metric]:
            assert METRICS[metric].higher_is_better
            assert spec.bench in METRICS[metric].benches, (spec.name, metric)
    assert METRICS["bleu"].aggregation == "corpus"
    assert METRICS["em"].benches == ("reasoning", "fewshot")
    assert not METRICS["answer_bpb"].higher_is_better
