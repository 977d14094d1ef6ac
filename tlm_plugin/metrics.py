"""ROUGE of predicted answers (rouge-score, Porter stemming, sentences one per line for ROUGE-Lsum).

Used by the demo and by AdaptEval's metrics (``adapteval.metrics`` builds on this module; the plugin never imports
AdaptEval).
"""

import re
from functools import lru_cache

from rouge_score import rouge_scorer


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at ., ! or ? (or their full-width forms), with any closing quotes/brackets, where whitespace
# follows. Needs no downloaded data (no nltk punkt); abbreviations such as "e.g. x" split too, which only makes
# ROUGE-Lsum's summary-level LCS slightly more forgiving.
_SENTENCE_BREAK = re.compile(r"([.!?。！？][\"'”’)\]]*)\s+")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences: at line breaks, and after sentence-final punctuation followed by space."""
    broken = _SENTENCE_BREAK.sub(lambda match: match.group(1) + "\n", text)
    return [sentence.strip() for sentence in broken.splitlines() if sentence.strip()]


def one_sentence_per_line(text: str) -> str:
    """The form ROUGE-Lsum expects: sentences separated by newlines."""
    return "\n".join(split_sentences(text))


@lru_cache(maxsize=1)
def _rouge_scorer():
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_per_sample(predictions: list[str], references: list[str], split: bool = True) -> dict[str, list[float]]:
    """Per-sample ROUGE F1 for every type in ``ROUGE_TYPES`` (rouge-score, Porter stemming).

    With ``split`` (the AdaptEval setting) both sides are first put one sentence per line, which is what makes
    rougeLsum a summary-level score; rouge1/2/L ignore line breaks, so splitting does not change them.
    """
    scorer = _rouge_scorer()
    scores: dict[str, list[float]] = {rouge_type: [] for rouge_type in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        if split:
            prediction, reference = one_sentence_per_line(prediction), one_sentence_per_line(reference)
        result = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for rouge_type in ROUGE_TYPES:
            scores[rouge_type].append(float(result[rouge_type].fmeasure))
    return scores
