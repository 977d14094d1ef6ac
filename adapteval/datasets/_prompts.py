"""Prompt formats of AdaptEval (tlm.md; the paper's appendix B tables)."""

ALPACA_INTRO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# GSM8K and MetaMath: zero-shot chain of thought in the Alpaca layout (matches gsm8k_random_5k.json exactly).
COT_TEMPLATE = ALPACA_INTRO + "\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."

OPTION_LETTERS = "ABCD"


def cot_prompt(question: str) -> str:
    return COT_TEMPLATE.format(question=question)


def logiqa_prompt(article: str, question: str, options: list[str]) -> str:
    """LogiQA 2.0's multi-choice prompt, zero-shot; every line after the first starts with a space.

    "Write a multi-choice question for the following article:\\n Article: ...\\n Question: ...\\n
    Options: A. ...\\n B. ...\\n C. ...\\n D. ...\\n\\n Answer:"
    """
    assert len(options) == len(OPTION_LETTERS), options
    labelled = [f"{letter}. {option.strip()}" for letter, option in zip(OPTION_LETTERS, options)]
    lines = [
        "Write a multi-choice question for the following article:",
        f"Article: {article.strip()}",
        f"Question: {question.strip()}",
        "Options: " + labelled[0],
        *labelled[1:],
    ]
    return "\n ".join(lines) + "\n\n Answer:"


def dolly_prompt(instruction: str, context: str) -> str:
    """The prompt part of Databricks' own Dolly training format (databrickslabs/dolly, training/consts.py).

    The record ends after the response key, where the model's answer starts; "Input:" appears only when the row
    has a context passage.
    """
    parts = [ALPACA_INTRO, "### Instruction:\n" + instruction.strip()]
    if context.strip():
        parts.append("Input:\n" + context.strip())
    parts.append("### Response:\n")
    return "\n\n".join(parts)
