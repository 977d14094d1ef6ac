"""``adapteval run --workers N`` and ``--ray ADDRESS``: cells at once, each on its own devices, failures recorded.

The fast tests use the fake launcher (no subprocess); the slow ones run the tiny model for real: sequentially, with
two workers, and on a local Ray cluster of two CPU workers started and stopped by the test, and compare the cells.
"""

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from adapteval_testing import DATASET, SUBPROCESS_ENV, FakeLauncher, fake_run, write_tiny_recipe

from adapteval import builder, cli, parallel
from adapteval.parallel import CellsFailedError, Slot, slots


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapteval-data")
    builder.build(DATASET, path, n=6, seed=0, offline=True)
    return path


def test_slots_share_the_visible_gpus_and_refuse_what_does_not_fit():
    gpus = ["0", "1", "2", "3"]
    assert slots(2, None, gpus) == [Slot(0, ("0", "1")), Slot(1, ("2", "3"))]
    assert slots(3, 1, gpus) == [Slot(0, ("0",)), Slot(1, ("1",)), Slot(2, ("2",))]
    assert slots(2, None, []) == [Slot(0, None), Slot(1, None)]  # CPU only: nothing to set
    assert slots(2, 0, gpus) == [Slot(0, ()), Slot(1, ())]  # GPUs hidden from the cells
    with pytest.raises(ValueError, match="needs 6 GPUs; 4 visible"):
        slots(3, 2, gpus)
    with pytest.raises(ValueError, match="needs 5 GPUs"):
        slots(5, None, gpus)
    with pytest.raises(ValueError, match="no GPU is visible"):
        slots(2, 1, [])
    assert Slot(0, ("2", "3")).env({"A": "1"}) == {"A": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert parallel.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5"}) == ["4", "5"]
    assert parallel.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


class CountingLauncher(FakeLauncher):
    """The fake launcher, slowed down, counting the cells running at once and the devices each saw."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lock, self.running, self.most, self.devices = threading.Lock(), 0, 0, []

    def __call__(self, recipe_path, log_path, env):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.devices.append(env.get("CUDA_VISIBLE_DEVICES"))
        try:
            time.sleep(0.3)
            with self.lock:
                return super().__call__(recipe_path, log_path, env)
        finally:
            with self.lock:
                self.running -= 1


METHODS = "base,tlm,tlm-online,tent"


def test_workers_run_cells_at_once_on_their_own_devices_with_the_sequential_results(tmp_path, data_dir, monkeypatch):
    for folder in ("seq", "par"):
        (tmp_path / folder).mkdir()
    sequential = fake_run(tmp_path / "seq", data_dir, FakeLauncher(), methods=METHODS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    launcher = CountingLauncher()
    at_once = fake_run(tmp_path / "par", data_dir, launcher, methods=METHODS, workers=2)
    assert launcher.most == 2  # two cells ran at the same time, never more
    assert sorted(launcher.devices) == ["0,1", "0,1", "2,3", "2,3"]
    drop = ("timings", "finished_at", "data_file", "recipe")  # the recipes differ only in their paths:
    for a, b in zip(at_once, sequential, strict=True):
        paths = ("dataset_dir", "output_dir")
        assert {k: v for k, v in a["recipe"].items() if k not in paths} == {
            k: v for k, v in b["recipe"].items() if k not in paths
        }
    assert [{k: v for k, v in r.items() if k not in drop} for r in at_once] == [
        {k: v for k, v in r.items() if k not in drop} for r in sequential
    ]


def test_a_failed_cell_is_recorded_the_others_finish_and_a_rerun_runs_only_it(tmp_path, data_dir):
    launcher = CountingLauncher(fail_on=2)
    with pytest.raises(
        CellsFailedError, match=r"1 of 4 cells failed .*: cell chatterbot/\S+: llamafactory-cli exited"
    ) as e:
        fake_run(tmp_path, data_dir, launcher, methods=METHODS, workers=2)
    failed = [r for r in e.value.records if r is None]
    assert len(failed) == 1 and len(launcher.recipes) == 4
    cells = tmp_path / "out" / "cells" / DATASET
    failed_dirs = [d for d in cells.iterdir() if (d / "failed.json").is_file()]
    assert len(failed_dirs) == 1 and not (failed_dirs[0] / "cell.json").exists()
    assert "boom" in (failed_dirs[0] / "run.log").read_text()
    assert sum((d / "cell.json").is_file() for d in cells.iterdir()) == 3

    again = CountingLauncher()
    records = fake_run(tmp_path, data_dir, again, methods=METHODS, workers=2)
    assert len(again.recipes) == 1 and all(r is not None for r in records)  # only the failed cell ran again
    assert not (failed_dirs[0] / "failed.json").exists() and (failed_dirs[0] / "cell.json").is_file()


@dataclass(frozen=True)
class FakeCell:  # what run_on_ray reads of a cell (hashable: a task's object reference is its cell here)
    name: str
    dir: Path


class FakeRay:
    """Ray's driver calls that ``run_on_ray`` makes, on a cluster of ``gpus`` GPUs: every task's options recorded."""

    class TaskError(Exception):  # as ray.exceptions.RayTaskError: the task's own exception in ``cause``
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    def __init__(self, gpus: int):
        self.resources = {"CPU": 16.0} | ({"GPU": float(gpus)} if gpus else {})
        self.options_seen: list[dict] = []

    def is_initialized(self):
        return True  # a driver already connected: run_on_ray neither connects nor shuts down

    def cluster_resources(self):
        return self.resources

    def remote(self, fn):
        assert fn is parallel._ray_cell
        fake = self

        class Remote:
            def options(self, **kwargs):
                fake.options_seen.append(kwargs)
                return self

            def remote(self, cell):
                return cell  # the object reference: its cell

        return Remote()

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.name == "bad":
            raise self.TaskError(RuntimeError("llamafactory-cli exited with 1"))
        return {"cell": ref.name}


def test_ray_tasks_ask_for_the_cells_gpus_and_a_failed_task_is_recorded(tmp_path, monkeypatch):
    cells = [FakeCell(n, tmp_path / n) for n in ("a", "bad", "c")]
    for gpus, asked, expected in ((4, None, 1), (0, None, 0), (8, 2, 2)):
        fake = FakeRay(gpus)
        monkeypatch.setitem(sys.modules, "ray", fake)
        finished = []
        records: list = [None, None, None]
        with pytest.raises(CellsFailedError, match=r"1 of 3 cells failed .*bad: llamafactory-cli exited with 1"):
            parallel.run_on_ray(cells, [0, 1, 2], records, "auto", asked, lambda p, r, seen=finished: seen.append(p))
        assert fake.options_seen == [{"num_gpus": expected, "num_cpus": 1.0, "max_retries": 0}]
        assert finished == [0, 2] and records == [{"cell": "a"}, None, {"cell": "c"}]
        failed = json.loads((tmp_path / "bad" / parallel.FAILED_FILE).read_text())
        assert failed["error"] == "RuntimeError: llamafactory-cli exited with 1"
        assert not (tmp_path / "a" / parallel.FAILED_FILE).exists()


def _run_args(out: Path) -> list[str]:
    return [
        "run",
        "--template",
        "chatml",
        "--bench",
        DATASET,
        "--methods",
        "base,tlm",
        "--limit",
        "4",
        "--out",
        str(out),
    ]


def _real_run(out: Path, data_dir: Path, recipe: Path, *extra: str) -> list[dict]:
    args = [*_run_args(out), "--data", str(data_dir), "--recipe", str(recipe), *extra]
    code = cli.main(args)
    assert code == 0, [p.read_text()[-2000:] for p in out.glob("cells/*/*/run.log")]
    return [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/*/cell.json"))]


def _same(cells: list[dict]) -> list[tuple]:
    return [(c["method"], c["score"], c["per_sample"], c["log_ppl_after"]) for c in cells]


@pytest.mark.slow
def test_real_cells_with_two_workers_and_on_a_local_ray_cluster_equal_the_sequential_run(
    tiny_model, data_dir, tmp_path, monkeypatch
):
    for key, value in SUBPROCESS_ENV.items():
        monkeypatch.setenv(key, value)
    recipe = write_tiny_recipe(tiny_model, tmp_path / "tiny.yaml")
    sequential = _real_run(tmp_path / "seq", data_dir, recipe)
    assert len(sequential) == 2
    assert _same(_real_run(tmp_path / "workers", data_dir, recipe, "--workers", "2")) == _same(sequential)

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    if importlib.util.find_spec("ray") is None or ray_cli is None:
        pytest.skip("ray is not installed (pip install -e '.[dev]'): the Ray half of this test did not run")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Ray picks the node's address itself (as on a cluster) and prints it; the driver connects to what it printed.
    # `ray start` turns token authentication on wherever a token exists (~/.ray/auth_token, which any local
    # ray.init() writes, or RAY_AUTH_TOKEN), so the test gives it one of its own: the cluster always asks for it.
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_AUTH_TOKEN": token}
    start = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0"]
    start += ["--include-dashboard=false", "--disable-usage-stats"]
    started = subprocess.run(start, capture_output=True, text=True, timeout=180, env=env)
    # The drivers are `adapteval` processes, as a user runs them: this process's own Ray state (its token, its auth
    # mode) stays as it was for the tests that start a local cluster of their own.
    adapteval_cli = [shutil.which("adapteval", path=str(Path(sys.executable).parent))]
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        printed = re.search(r"--address='([^']+)'", started.stdout + started.stderr)
        address = printed.group(1) if printed else f"127.0.0.1:{port}"

        def run_on_ray(out: Path, **extra_env: str) -> subprocess.CompletedProcess:
            args = [*_run_args(out), "--data", str(data_dir), "--recipe", str(recipe), "--ray", address]
            return subprocess.run(
                adapteval_cli + args, capture_output=True, text=True, timeout=900, env=env | extra_env
            )

        # A driver that sends no token is refused, and the error says what to set.
        refused = run_on_ray(tmp_path / "refused", RAY_AUTH_MODE="disabled", RAY_NUM_REDIS_GET_RETRIES="3")
        assert refused.returncode != 0 and "asks for token authentication" in refused.stderr, refused.stderr[-3000:]
        assert "RAY_AUTH_MODE=token" in refused.stderr and not list((tmp_path / "refused").glob("cells/*/*/cell.json"))

        # The address `ray start` printed, with nothing else set: the run uses the token as `ray start` did.
        ran = run_on_ray(tmp_path / "ray")
        assert ran.returncode == 0, ran.stderr[-3000:]
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
    on_ray = [json.loads(p.read_text()) for p in sorted((tmp_path / "ray").glob("cells/*/*/cell.json"))]
    assert _same(on_ray) == _same(sequential)
