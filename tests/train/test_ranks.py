"""Every rank enters every collective the same number of times, by construction, with 2 and 3 gloo ranks.

Unit level (``ranks_worker.py``): per-prompt generation under a ZeRO-3 config with uneven numbers of calls, the
end-of-run wait with a rank far behind a short ``ddp_timeout``, a local teacher loaded under a ZeRO-3 config. End to
end (``llamafactory-cli train`` under torchrun): a fresh per-prompt run on 3 ranks with votes and an odd number of
prompts, a gate that flags only one rank's prompts, and a resume on 3 ranks where one rank has nothing left to do.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tlm_testing import QUESTIONS, VENV_BIN, base_recipe, read_jsonl, run_and_kill, run_cli, write_dataset


pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("ranks_worker.py")


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


def torchrun(n: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(n), str(WORKER), *args]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)


def test_per_prompt_generation_under_zero3_lets_ranks_make_different_numbers_of_calls(tiny_model, tmp_path):
    """Left to transformers, ``generate`` turns ``synced_gpus`` on under ZeRO-3 with 2 ranks and the run hangs."""
    out = tmp_path / "out.json"
    proc = torchrun(2, "uneven_generate", str(tiny_model), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["calls"] for r in ranks] == [6, 3]


def test_the_end_of_run_wait_outlasts_a_short_ddp_timeout(tmp_path):
    """Per-prompt ranks finish at different times: the last one arrives 8 s after the others, past a 3 s timeout."""
    out = tmp_path / "out.json"
    proc = torchrun(3, "slow_rank", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    waited = [r["waited_s"] for r in json.loads(out.read_text())["ranks"]]
    assert min(waited[:2]) > 5 and waited[2] < 3


def test_a_local_teacher_is_loaded_whole_under_a_zero3_config(tiny_model, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), "teacher", str(tiny_model), str(out)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["partitioned"] == 0 and result["empty"] == 0
    assert isinstance(result["reply"], str)


# ---------------------------------------------------------------------------------------------------------------
# End to end

TWO_DEMOS = [list(QUESTIONS[6]), list(QUESTIONS[7])]
ONE_DEMO = [list(QUESTIONS[8])]
# 7 prompts over two tasks (two sets of demonstrations); the last two carry a single demonstration (answered untrained)
FEWSHOT = [(q, a, TWO_DEMOS) for q, a in QUESTIONS[:5]] + [(q, a, ONE_DEMO) for q, a in (QUESTIONS[5], QUESTIONS[9])]


def fewshot_data(tmp_path: Path) -> Path:
    rows = [{"instruction": q, "input": "", "output": a, "history": history} for q, a, history in FEWSHOT]
    return write_dataset(tmp_path / "data", rows, name="fewshot", columns={"history": "history"})


def fewshot_recipe(tiny_model, data: Path, out: Path, **overrides) -> dict:
    settings = dict(
        dataset="fewshot",
        do_predict=True,
        tlm_mode="per_prompt",
        tlm_selector="demos",
        tlm_demo_orders=4,
        tlm_demo_votes=3,
        overwrite_output_dir=False,
        ddp_timeout=600,
    )
    return base_recipe(tiny_model, data, out, **{**settings, **overrides})


def ranks(n: int) -> dict[str, str]:
    return {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(n)}


def check_complete(out: Path, n: int) -> list[dict]:
    records = read_jsonl(out / "tlm_demos.jsonl")
    assert [r["index"] for r in records] == list(range(n))
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == n
    assert not list(out.glob("tlm_prompts.rank*.jsonl"))
    return records


def test_a_fresh_per_prompt_run_on_three_ranks_with_votes_finishes(tiny_model, tmp_path):
    """The run that hung: rank 1, slower to start, saw rank 0's first record file and took the resume path alone."""
    out = tmp_path / "out"
    proc = run_cli(fewshot_recipe(tiny_model, fewshot_data(tmp_path), out), tmp_path, extra_env=ranks(3), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Resuming" not in proc.stderr
    records = check_complete(out, len(FEWSHOT))
    assert [r["n_demos"] for r in records] == [2, 2, 2, 2, 2, 1, 1]
    assert [r["steps"] > 0 or bool(r.get("cache_hit")) for r in records] == [True] * 5 + [False] * 2
    assert [len(r.get("votes", [])) > 1 for r in records] == [True] * 5 + [False] * 2


def test_a_gate_that_flags_one_ranks_prompts_only(tiny_model, tmp_path):
    """Two ranks, five prompts (shares of 3 and 2); only rank 0's prompts have two answer options (margin < tau),
    rank 1's have one (margin 1): rank 0 trains three prompts and answers with votes while rank 1 trains none."""
    rows = [
        {"instruction": q, "input": "", "output": a, "options": ["yes", "no"] if i % 2 == 0 else ["yes"]}
        for i, (q, a) in enumerate(QUESTIONS[:5])
    ]
    data = write_dataset(tmp_path / "data", rows, name="gated")
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        data,
        out,
        dataset="gated",
        do_predict=True,
        tlm_mode="per_prompt",
        tlm_selector="nearest",
        tlm_sift_budget=2,
        tlm_gate="margin",
        tlm_gate_options="options",
        tlm_gate_tau=0.99,
        overwrite_output_dir=False,
        ddp_timeout=600,
    )
    proc = run_cli(recipe, tmp_path, extra_env=ranks(2), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert [r["index"] for r in records] == list(range(5))
    assert [r["flagged"] for r in records] == [True, False, True, False, True]
    assert [r["steps"] > 0 for r in records] == [True, False, True, False, True]
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == 5


def test_a_resume_on_three_ranks_where_one_rank_has_nothing_left(tiny_model, tmp_path):
    """Prompts 0-4 of 7 were answered on one rank; on 3 ranks the shares are {0,3,6}, {1,4}, {2,5}: rank 1 has
    nothing left to do and goes straight to the end-of-run wait, the others answer 6 and 5."""
    data = fewshot_data(tmp_path)
    out = tmp_path / "out"
    recipe = fewshot_recipe(tiny_model, data, out, tlm_demo_orders=12)
    at = run_and_kill(recipe, tmp_path, "tlm_prompts.rank0.jsonl", 5)
    if at != 5:  # the kill landed one prompt later: keep exactly the first five answered prompts
        lines = (out / "tlm_prompts.rank0.jsonl").read_text().splitlines(keepends=True)[:5]
        (out / "tlm_prompts.rank0.jsonl").write_text("".join(lines))
    proc = run_cli(recipe, tmp_path, extra_env=ranks(3), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Resuming: 5 of 7 prompts were answered before." in proc.stderr
    records = check_complete(out, len(FEWSHOT))
    assert [len(r.get("votes", [])) > 1 for r in records] == [True] * 5 + [False] * 2
