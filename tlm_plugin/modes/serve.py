"""Learn while serving (``tlm_mode: serve``): ``API_PORT=8000 llamafactory-cli api recipe.yaml``.

An OpenAI-compatible server (LLaMA-Factory's routes, engines and ``API_KEY``) that answers every request with the
current adapter version and learns from its own traffic in the background: windows of ``tlm_chunk_size`` received
prompts, TLM's online update (:mod:`tlm_plugin.serving.learner`, its own process), a new version published whole
(``output_dir/tlm_versions/v<N>/``) and swapped in between answers, a drift guard on a probe set, rollback, and a
restart after ``kill -9`` that loses no prompt and learns none twice (:mod:`tlm_plugin.serving.store`).

Start-up: the recipe is checked (before any model loads), the stream opened (a torn last line cut), the learner
started; with learning on, the server waits for v0 (the adapter before learning, measured on the probe set), loads
LLaMA-Factory's engine with the current version and listens on ``API_HOST:API_PORT`` (127.0.0.1:8000 by default).
"""

import functools
import json
import os
import time
from typing import Any

import uvicorn
from llamafactory.chat import ChatModel
from llamafactory.extras.logging import get_logger
from llamafactory.hparams.parser import read_args

from tlm_plugin import registry
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.serving import recipe as serve_recipe
from tlm_plugin.serving.app import Learner, Server, create_app
from tlm_plugin.serving.engine import VersionedEngine
from tlm_plugin.serving.store import Store
from tlm_plugin.train import outputs


logger = get_logger(__name__)

V0_WAIT_S = 3600.0  # a first start loads the model and measures the probe set before v0 exists


def run(recipe: dict[str, Any]) -> None:
    """The mode's entry (``llamafactory-cli api`` with a stage-tlm recipe of ``tlm_mode: serve``)."""
    tlm_args = serve_recipe.check(recipe)
    host = os.getenv("API_HOST", "127.0.0.1")
    port = int(os.getenv("API_PORT", "8000"))
    serve_recipe.check_address(host, tlm_args)
    out = recipe["output_dir"]
    _check_output_dir(recipe, out)
    store = Store(out)
    received = store.open_stream()
    outputs.atomic_write(os.path.join(out, outputs.SERVE_RECIPE_FILE), json.dumps(recipe, indent=1) + "\n")
    print(
        f"tlm serve: every prompt this server receives is kept in {store.stream_path} "
        f"({received} kept so far){' and learned from' if tlm_args.tlm_learn else ''}.",
        flush=True,
    )
    if tlm_args.tlm_learn and tlm_args.tlm_probe_dataset is None:
        print(
            "tlm serve: no tlm_probe_dataset: each version records its window's log-perplexity before / after; no "
            "drift guard runs.",
            flush=True,
        )
    learner = None
    if tlm_args.tlm_learn:
        learner = Learner(store, tlm_args.tlm_serve_retries)
        learner.start()
        _wait_for_first_version(store, learner)
    current = store.current()
    version = current if current is not None else 0
    vllm = str(recipe.get("infer_backend", "huggingface")).lower() == "vllm"
    if (
        current is None
    ):  # no learning and no version yet: the recipe's own adapter (or none), as LLaMA-Factory loads it
        adapter = recipe.get("adapter_name_or_path")
    else:  # vLLM starts with the current version as its LoRA; huggingface loads it unmerged below
        adapter = store.version_dir(current) if vllm else None
    chat_model = ChatModel(serve_recipe.infer_args(recipe, adapter))
    engine = VersionedEngine(chat_model, store, version, versioned=current is not None)
    server = Server(store, engine, tlm_args, learner)
    app = create_app(server)
    print(f"tlm serve: answering with v{version} on http://{host}:{port}/v1 (status: /tlm/status)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=os.getenv("TLM_SERVE_LOG_LEVEL", "warning"))
    finally:
        if learner is not None:
            learner.stopping = True
            learner.stop()
        store.close_stream()


def _check_output_dir(recipe: dict[str, Any], out: str) -> None:
    """Continue the serve run in ``out`` (same settings), start one, or refuse another run's folder."""
    identity = serve_recipe.identity(recipe)
    run_file = os.path.join(out, outputs.RUN_FILE)
    if recipe.get("overwrite_output_dir"):
        outputs.start_fresh(out)
    if os.path.isfile(run_file):
        with open(run_file, encoding="utf-8") as f:
            earlier = json.load(f)
        if earlier.get("mode") != "serve":
            raise TLMConfigError(
                f"output_dir {out} holds a stage-tlm {earlier.get('mode')} run; a learning server needs its own "
                "output_dir (or overwrite_output_dir: true to replace that run)."
            )
        if earlier.get("identity") != identity:
            raise TLMConfigError(
                f"output_dir {out} holds a learning server started with other settings ({earlier.get('identity')} "
                f"vs {identity} now). Restart it with the same recipe, choose another output_dir, or set "
                "overwrite_output_dir: true to start over (removing its stream and versions)."
            )
        return
    outputs.write_identity(out, identity, "serve")


def _wait_for_first_version(store: Store, learner: Learner) -> None:
    """Block until a version exists (v0 on a first start), or the learner fails before making one."""
    deadline = time.monotonic() + V0_WAIT_S
    while store.current() is None:
        if not learner.alive():
            raise TLMConfigError(f"the learner failed before its first version: {learner.tail()}")
        if time.monotonic() > deadline:
            learner.stop()
            raise TLMConfigError(f"no adapter version after {V0_WAIT_S:.0f} s: {learner.tail()}")
        time.sleep(0.2)


def hook(run_api):
    """``llamafactory.api.app.run_api`` for a stage-tlm recipe of a mode that ``api`` runs (others: LLaMA-Factory's)."""

    @functools.wraps(run_api)
    def run_api_with_tlm() -> None:
        recipe = read_args(None)
        if not (isinstance(recipe, dict) and recipe.get("stage") == "tlm"):
            return run_api()
        mode = registry.MODES.get(recipe.get("tlm_mode", "offline"))
        if mode is None or mode.command != "api":
            raise TLMConfigError(
                f"llamafactory-cli api with a stage: tlm recipe serves a mode of the api command (tlm_mode: serve); "
                f"this recipe has tlm_mode: {recipe.get('tlm_mode', 'offline')} (run it with llamafactory-cli train)."
            )
        registry.load(mode.entry)(recipe)

    return run_api_with_tlm
