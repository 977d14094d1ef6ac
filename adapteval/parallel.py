"""Running AdaptEval cells at once: up to N on one machine, each on its own devices, or as tasks of a Ray cluster.

Cells are independent runs (their own recipe, seed, data and folder), so running them at once changes nothing in
their results. ``--workers N`` keeps N cells running, each a ``llamafactory-cli train`` subprocess whose
``CUDA_VISIBLE_DEVICES`` is its own slice of the visible GPUs (``--gpus-per-cell`` each; without GPUs the cells share
the CPUs). ``--ray ADDRESS`` submits every cell as a Ray task asking for ``--gpus-per-cell`` GPUs (Ray sets the
task's ``CUDA_VISIBLE_DEVICES``) to an existing cluster (``ray start --head`` ...), the way LLaMA-Factory itself uses
Ray; the nodes must see ``--out`` and the data folder at the same paths (a shared file system) and have this project
installed.

A cell that fails is recorded in its folder (``failed.json``: the error and its log's last lines) and the others go
on; the run then ends with :class:`CellsFailedError` naming them. A rerun runs exactly the cells without a
``cell.json`` (failed, interrupted or never run), as a sequential run does.
"""

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from adapteval import launch
from adapteval.errors import RunnerError
from adapteval.plan import Cell


FAILED_FILE = launch.FAILED_FILE


class CellsFailedError(RunnerError):
    """Some cells failed while the others finished; ``records`` holds the finished ones (None where one failed)."""

    def __init__(self, message: str, records: list[dict | None]) -> None:
        super().__init__(message)
        self.records = records


@dataclass(frozen=True)
class Slot:
    """Where one running cell goes: the devices it sees (None: the parent's, e.g. CPU only)."""

    index: int
    devices: tuple[str, ...] | None

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        return env


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may give out: ``CUDA_VISIBLE_DEVICES`` when set, else every device torch sees."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


def slots(workers: int, gpus_per_cell: int | None, gpus: list[str]) -> list[Slot]:
    """``workers`` slots over ``gpus``: ``gpus_per_cell`` consecutive devices each (default: an equal share); a
    ValueError, before anything runs, when they do not fit."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if gpus_per_cell is not None and gpus_per_cell < 0:
        raise ValueError(f"--gpus-per-cell must be 0 or more, got {gpus_per_cell}")
    if not gpus or gpus_per_cell == 0:
        if gpus_per_cell:
            raise ValueError(f"--gpus-per-cell {gpus_per_cell}: no GPU is visible (CUDA_VISIBLE_DEVICES, torch)")
        return [Slot(i, None if not gpus else ()) for i in range(workers)]
    per = gpus_per_cell if gpus_per_cell is not None else len(gpus) // workers
    if per < 1 or per * workers > len(gpus):
        raise ValueError(
            f"--workers {workers} x --gpus-per-cell {per if per >= 1 else gpus_per_cell} needs "
            f"{max(per, 1) * workers} GPUs; {len(gpus)} visible ({','.join(gpus)})"
        )
    return [Slot(i, tuple(gpus[i * per : (i + 1) * per])) for i in range(workers)]


def record_failure(cell: Cell, error: BaseException) -> None:
    cell.dir.mkdir(parents=True, exist_ok=True)
    text = {
        "cell": cell.name,
        "error": f"{type(error).__name__}: {error}",
        "log": str(cell.dir / "run.log"),
        "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (cell.dir / FAILED_FILE).write_text(json.dumps(text, indent=2) + "\n", encoding="utf-8")


def _finish(cells: list[Cell], records: list[dict | None], failures: dict[int, BaseException]) -> list[dict]:
    if failures:
        lines = {i: (str(err).splitlines() or [type(err).__name__])[0] for i, err in failures.items()}
        names = "; ".join(
            line if cells[i].name in line else f"{cells[i].name}: {line}" for i, line in sorted(lines.items())
        )
        raise CellsFailedError(
            f"{len(failures)} of {len(cells)} cells failed (the others finished; see failed.json in their folders): "
            f"{names}",
            records,
        )
    return records  # type: ignore[return-value]


def run_local(
    cells: list[Cell],
    todo: list[int],
    records: list[dict | None],
    workers: int,
    gpus_per_cell: int | None,
    env: Mapping[str, str],
    launcher: launch.Launcher,
    predictor: launch.Launcher,
    done: Callable[[int, dict], None],
) -> list[dict]:
    """Run the cells at positions ``todo`` with at most ``workers`` at once, each in a free slot."""
    free: queue.Queue[Slot] = queue.Queue()
    for slot in slots(workers, gpus_per_cell, visible_gpus(env)):
        free.put(slot)
    failures: dict[int, BaseException] = {}
    lock = threading.Lock()

    def work(position: int) -> None:
        slot = free.get()
        try:
            record = launch.run_cell(cells[position], launcher, slot.env(env), predictor)
        except Exception as err:  # noqa: BLE001  (recorded, reported at the end; the other cells go on)
            record_failure(cells[position], err)
            with lock:
                failures[position] = err
            return
        finally:
            free.put(slot)
        with lock:
            records[position] = record
            done(position, record)

    threads = [threading.Thread(target=work, args=(p,), daemon=True) for p in todo]
    pending = list(threads)
    running: list[threading.Thread] = []
    while pending or running:  # start a thread only when a slot can take it: at most `workers` alive
        running = [t for t in running if t.is_alive()]
        while pending and len(running) < workers:
            thread = pending.pop(0)
            thread.start()
            running.append(thread)
        time.sleep(0.05)
    return _finish(cells, records, failures)


def _ray_cell(cell: Cell) -> dict:
    """One cell on a Ray worker: the worker's own environment (its PATH, the devices Ray gave the task)."""
    return launch.run_cell(cell, launch.launch_llamafactory, launch.subprocess_env(), launch.launch_vllm_predict)


AUTH_HINT = (
    "set RAY_AUTH_MODE=token here and make the cluster's token available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
    "~/.ray/auth_token, as on its nodes)"
)


def _is_this_machines_cluster(address: str) -> bool:
    """Whether ``address`` is the cluster the last ``ray start`` on this machine started (Ray records it)."""
    try:
        from ray._private.utils import read_ray_address  # noqa: PLC0415  (Ray's own record of it)
    except ImportError:
        return False
    return address == "auto" or (read_ray_address() or "") == address


def _connect(ray, address: str) -> None:
    """``ray.init`` on the cluster at ``address``, with the token authentication ``ray start`` chose on this machine.

    ``ray start --head`` turns token authentication on by itself wherever a token exists (``~/.ray/auth_token``, which
    any local ``ray.init()`` creates, or ``RAY_AUTH_TOKEN``), while a driver given an explicit address never does:
    the address ``ray start`` printed would then be refused. For the cluster started on this machine the driver does
    what ``ray start`` did; for any other, ``RAY_AUTH_MODE`` decides, as in Ray, and a refusal says what to set.
    """
    if os.environ.get("RAY_AUTH_MODE") is None and _is_this_machines_cluster(address):
        try:
            from ray._private.authentication.authentication_token_setup import (  # noqa: PLC0415
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:  # a Ray without token authentication
            pass
        else:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except ConnectionError as err:
        chain, cause = [], err
        while cause is not None:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        if any("InvalidAuthToken" in c or c.startswith("AuthenticationError") for c in chain):
            raise RunnerError(
                f"--ray {address}: the Ray cluster there asks for token authentication and this process sent no "
                f"valid token: {AUTH_HINT}."
            ) from None
        raise RunnerError(
            f"--ray {address}: no Ray cluster answered there ({err}). Start one with `ray start --head` and pass "
            "the address it prints (`ray start --address='HOST:PORT'`), or `auto` for the one on this machine."
        ) from None


def run_on_ray(
    cells: list[Cell],
    todo: list[int],
    records: list[dict | None],
    address: str,
    gpus_per_cell: int | None,
    done: Callable[[int, dict], None],
    cpus_per_cell: float = 1.0,
) -> list[dict]:
    """Submit the cells at positions ``todo`` to the Ray cluster at ``address`` and wait for all of them."""
    try:
        import ray  # noqa: PLC0415  (optional: only --ray needs it)
    except ImportError:
        raise RunnerError("--ray needs the ray package: pip install 'ray[default]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, address)
    try:
        if gpus_per_cell is None:
            gpus_per_cell = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_ray_cell).options(num_gpus=gpus_per_cell, num_cpus=cpus_per_cell, max_retries=0)
        futures = {task.remote(cells[p]): p for p in todo}
        failures: dict[int, BaseException] = {}
        waiting = list(futures)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            position = futures[ready[0]]
            try:
                record = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001  (a failed task: recorded, the other cells go on)
                cause = getattr(err, "cause", None) or err
                record_failure(cells[position], cause)
                failures[position] = cause
                continue
            records[position] = record
            done(position, record)
    finally:
        if started_here:
            ray.shutdown()
    return _finish(cells, records, failures)
