"""Seeds of what is random about one prompt, independent of which rank answers it and in which order."""

import hashlib
from collections.abc import Sequence


def prompt_seed(run_seed: int, input_ids: Sequence[int]) -> int:
    """The seed of everything random about one prompt (candidates, generation, orders, random picks): from the run's
    seed and the prompt's own tokens, so it is the same whichever rank answers it, in whatever order, resumed or not."""
    digest = hashlib.sha256(f"{run_seed}:{','.join(map(str, input_ids))}".encode()).digest()
    return int.from_bytes(digest[:6], "big")
