"""AdaptEval metrics: ROUGE-Lsum (headline for DomainBench and InstructionBench), ROUGE-1/2/L and BLEU (the
paper's appendix tables), exact match with per-dataset answer extraction (ReasoningBench), and ARC's pass@2 and
pass@1 (the answer's grid, or also the second attempt's, is the reference grid exactly).

Every metric is registered with its metadata, in the spirit of lm-evaluation-harness: ``METRICS[name]`` gives a
``MetricSpec`` (higher_is_better, the benches that report it, how per-sample values aggregate). The text scores are
in [0, 1]; BLEU is sacrebleu's corpus score divided by 100. An empty prediction is scored, not dropped: it gets 0.
``answer_bpb`` (bits per byte of the reference answer, lower is better) is measured by the training run itself
(``tlm_eval_answers``) and read from its records, not computed from predictions.

``score_predictions(dataset_name, predictions, references, second_attempts=None)`` is the one entry point the runner
needs.
"""

from dataclasses import dataclass

from adapteval.extract import ANSWER_FORMATS
from adapteval.registry import get_dataset
from tlm_plugin.metrics import ROUGE_TYPES, one_sentence_per_line, rouge_per_sample, split_sentences  # noqa: F401  (re-exported)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus-level BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), scaled to [0, 1]."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score / 100.0


def exact_match_per_sample(predictions: list[str], references: list[str], answer_format: str) -> list[float]:
    """1.0 where the answer extracted from the prediction equals the reference's, else 0.0 (see ``extract``)."""
    fmt = ANSWER_FORMATS[answer_format]
    return [
        float(fmt.match(fmt.extract_prediction(prediction), fmt.extract_reference(reference)))
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def pass_at_2_per_sample(
    predictions: list[str], references: list[str], second_attempts: list[str | None], answer_format: str
) -> list[float]:
    """1.0 where the prediction or the second attempt (None: there is none) matches the reference, else 0.0."""
    first = exact_match_per_sample(predictions, references, answer_format)
    second = exact_match_per_sample(["" if a is None else str(a) for a in second_attempts], references, answer_format)
    return [max(a, b) for a, b in zip(first, second, strict=True)]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric. ``per_sample`` metrics aggregate by mean; corpus metrics compute one value directly."""

    name: str
    higher_is_better: bool
    benches: tuple[str, ...]
    description: str
    aggregation: str  # "mean" of per-sample values, or "corpus"


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("rougeLsum", True, ("domain", "instruction"), "ROUGE-Lsum F1, one sentence per line", "mean"),
        MetricSpec("rouge1", True, ("domain", "instruction"), "ROUGE-1 F1", "mean"),
        MetricSpec("rouge2", True, ("domain", "instruction"), "ROUGE-2 F1", "mean"),
        MetricSpec("rougeL", True, ("domain", "instruction"), "ROUGE-L F1", "mean"),
        MetricSpec("bleu", True, ("domain", "instruction"), "sacrebleu corpus BLEU / 100", "corpus"),
        MetricSpec("em", True, ("reasoning", "fewshot"), "exact match of the extracted answer", "mean"),
        MetricSpec(
            "pass@2",
            True,
            ("arc", "arc-dev", "arc-sft"),
            "ARC's score: the answer's grid or the second attempt's is the reference grid exactly",
            "mean",
        ),
        MetricSpec(
            "pass@1", True, ("arc", "arc-dev", "arc-sft"), "the answer's grid is the reference grid exactly", "mean"
        ),
        MetricSpec(
            "answer_bpb",
            False,
            ("domain", "instruction", "reasoning", "fewshot", "arc", "arc-dev", "arc-sft"),
            "bits per byte of the reference answer, teacher-forced (sft label tokens)",
            "mean",
        ),
    )
}

# The metrics reported for a dataset whose headline metric is the key (headline first).
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "rougeLsum": ("rougeLsum", "rouge1", "rouge2", "rougeL", "bleu"),
    "em": ("em",),
    "pass@2": ("pass@2", "pass@1"),
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _text_scores(predictions: list[str], references: list[str]) -> tuple[dict[str, float], list[float]]:
    per_sample = rouge_per_sample(predictions, references)
    scores = {rouge_type: _mean(values) for rouge_type, values in per_sample.items()}
    scores["bleu"] = corpus_bleu(predictions, references) if predictions else 0.0
    return scores, per_sample["rougeLsum"]


def score_predictions(
    dataset_name: str,
    predictions: list[str],
    references: list[str],
    second_attempts: list[str | None] | None = None,
) -> dict:
    """Score one dataset's predictions with its registered metric.

    ``second_attempts`` (pass@2 datasets: ARC): each row's second answer, aligned with the predictions, None where
    a row has none; without them pass@2 equals pass@1. Other metrics ignore them.

    Returns a dict (all floats in [0, 1])::

        {"dataset": "gsm8k", "metric": "em", "score": 0.76,      # headline metric and its value
         "scores": {"em": 0.76},                                 # every metric of the group (see METRIC_GROUPS)
         "per_sample": [1.0, 0.0, ...],                          # the headline metric per row
         "n": 5000, "n_empty_predictions": 3,                    # empty predictions are scored 0, not dropped
         "answer_format": "gsm8k"}                               # None for ROUGE datasets

    and for pass@2 also ``"n_second_attempts"``, the rows that had one. Raises ValueError if the lists differ in
    length, ``UnknownNameError`` for an unregistered dataset.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{dataset_name}: got {len(predictions)} predictions but {len(references)} references; "
            "they must pair up one to one"
        )
    if second_attempts is not None and len(second_attempts) != len(predictions):
        raise ValueError(
            f"{dataset_name}: got {len(second_attempts)} second attempts for {len(predictions)} predictions; "
            "they must pair up one to one (None where a row has none)"
        )
    spec = get_dataset(dataset_name).SPEC
    assert spec.metric in METRIC_GROUPS, (spec.name, spec.metric)
    predictions = ["" if prediction is None else str(prediction) for prediction in predictions]
    references = [str(reference) for reference in references]
    extra = {}
    if spec.metric == "em":
        per_sample = exact_match_per_sample(predictions, references, spec.answer_format)
        scores = {"em": _mean(per_sample)}
    elif spec.metric == "pass@2":
        second = list(second_attempts) if second_attempts is not None else [None] * len(predictions)
        first = exact_match_per_sample(predictions, references, spec.answer_format)
        per_sample = pass_at_2_per_sample(predictions, references, second, spec.answer_format)
        scores = {"pass@2": _mean(per_sample), "pass@1": _mean(first)}
        extra["n_second_attempts"] = sum(1 for attempt in second if attempt is not None)
    else:
        scores, per_sample = _text_scores(predictions, references)
    return {
        "dataset": spec.name,
        "metric": spec.metric,
        "score": scores[spec.metric],
        "scores": scores,
        "per_sample": per_sample,
        "n": len(predictions),
        "n_empty_predictions": sum(1 for prediction in predictions if not prediction.strip()),
        "answer_format": spec.answer_format,
        **extra,
    }
