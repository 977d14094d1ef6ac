"""``stage: tlm``: the workflow, trainer and loss (mirrors LLaMA-Factory's ``train/<stage>/`` folders)."""
