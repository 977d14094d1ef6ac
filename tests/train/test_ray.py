"""LLaMA-Factory's Ray path: its ``Worker`` actors call the tuner's ``_training_function`` on every worker.

A local Ray cluster of two CPU workers runs LLaMA-Factory's own worker class with the environment its Ray launcher
gives each worker (rank, world size, master address and port), so every worker enters stage tlm through the hook,
as under torchrun. LLaMA-Factory 0.9.5's launcher itself cannot place workers on a CPU-only cluster: its placement
group asks for one bundle of 10 CPUs per CPU of the cluster (``get_placement_group(total_devices)``), which never
fits; on GPU clusters the bundles are one per GPU and fit. So the workers here get one CPU each, the one change.
"""

import importlib.util
import json
import os
import socket

import pytest
from tlm_testing import QUESTIONS, base_recipe, read_jsonl


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install -e '.[dev]')"
    ),
]


def test_two_ray_workers_run_stage_tlm_with_outputs_complete_once(tiny_model, tiny_data, tmp_path):
    import ray
    from llamafactory.train import tuner

    recipe = base_recipe(tiny_model, tiny_data, tmp_path / "out", do_predict=True, tlm_log_p0=5.99)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        worker_cls = ray.remote(tuner.Worker)
        workers = []
        for rank in range(2):
            env = {
                **{k: v for k, v in os.environ.items() if k.startswith(("HF_", "PATH", "PYTHON", "OMP"))},
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "TORCHELASTIC_USE_AGENT_STORE": "False",
                "OMP_NUM_THREADS": "1",
                "LLAMAFACTORY_VERBOSITY": "WARN",
                "DISABLE_VERSION_CHECK": "1",
            }
            workers.append(worker_cls.options(num_cpus=1, runtime_env={"env_vars": env}).remote())
        ray.get([w._training_function.remote(config={"args": recipe, "callbacks": []}) for w in workers])
    finally:
        ray.shutdown()
    out = tmp_path / "out"
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["world_size"] == 2
    scores = read_jsonl(out / "tlm_scores.jsonl")
    assert [r["index"] for r in scores] == list(range(len(QUESTIONS)))
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert [p["prompt"].split("user\n")[1].split("<|im_end|>")[0] for p in preds] == [q for q, _ in QUESTIONS]
    assert summary["optimizer_steps"] > 0 and summary["backward_passes"] == sum(r["selected"] for r in scores)
