"""Helpers shared by the AdaptEval runner tests (a module of its own so that test modules can import it)."""

import json
from pathlib import Path

import yaml
from tlm_testing import base_recipe

from adapteval import plan, runner


DATASET = "chatterbot"  # an offline pack of InstructionBench (ROUGE-Lsum), built from a PyPI package
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "WARN"}


def write_tiny_recipe(model_dir: Path, path: Path) -> Path:
    """The tiny model's base recipe; the runner fills in dataset, dataset_dir and output_dir per cell."""
    recipe = base_recipe(model_dir, Path("unused"), Path("unused"), max_new_tokens=8)
    for key in plan.RUNNER_KEYS:
        recipe.pop(key, None)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


class FakeLauncher:
    """Writes generated_predictions.jsonl as LLaMA-Factory would; ``answer(row_index, reference)`` picks each
    prediction (None drops the row). Records the recipes it was given."""

    def __init__(self, answer=lambda index, reference: reference, fail_on: int | None = None):
        self.answer, self.fail_on, self.recipes = answer, fail_on, []

    def __call__(self, recipe_path: Path, log_path: Path, env) -> int:
        recipe = yaml.safe_load(recipe_path.read_text())
        self.recipes.append(recipe)
        if self.fail_on == len(self.recipes):
            log_path.write_text("loading...\nTraceback (most recent call last):\nValueError: boom\n")
            return 1
        data = Path(recipe["dataset_dir"])
        info = json.loads((data / "dataset_info.json").read_text())[recipe["dataset"]]
        rows = json.loads((data / info["file_name"]).read_text())
        out = Path(recipe["output_dir"])
        out.mkdir(parents=True)
        lines = []
        for index, row in enumerate(rows):
            prediction = self.answer(index, row["output"])
            if prediction is not None:
                lines.append(json.dumps({"prompt": row["instruction"], "predict": prediction, "label": row["output"]}))
        (out / "generated_predictions.jsonl").write_text("\n".join(lines) + "\n")
        log_path.write_text("ok\n")
        return 0


def fake_run(tmp_path, data_dir, launcher, methods="base,tlm", **kwargs):
    """``runner.run`` with the fake launcher; the tiny base recipe unless ``recipe`` is passed (None: paper's)."""
    if "recipe" not in kwargs:
        kwargs["recipe"] = write_tiny_recipe(Path("tiny"), tmp_path / "tiny.yaml")
    kwargs = {"model": "tiny", "template": "chatml", "limit": 4, **kwargs}
    return runner.run(tmp_path / "out", DATASET, methods, data_dir=data_dir, launcher=launcher, **kwargs)
