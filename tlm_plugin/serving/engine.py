"""LLaMA-Factory's chat engine with adapter versions: which version answers a request, and the swap to a new one.

- ``huggingface``: one model in memory with the current version's LoRA weights (not merged). A swap copies the new
  version's weights into it under a reader-writer lock: generations hold it for reading from their first token to
  their last, a swap waits for the running ones and holds new ones back (a few milliseconds at LoRA sizes), so no
  answer ever mixes two versions.
- ``vllm``: each version is a new ``LoRARequest`` (a new name and id, so vLLM never serves cached weights of an older
  one); a request is answered through a shallow copy of LLaMA-Factory's engine that carries its version's request.
  No lock and no restart.
"""

import asyncio
import copy
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from tlm_plugin.serving.store import Store


class VersionLock:
    """A writer-preferring reader-writer lock for asyncio: answers read, a swap writes."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    async def acquire_read(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @asynccontextmanager
    async def writing(self):
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Ticket:
    """One request's hold on a version: the engine to call and the version it answers with."""

    version: int
    engine: Any
    release: Any = None
    released: bool = field(default=False)

    async def done(self) -> None:
        if not self.released:
            self.released = True
            if self.release is not None:
                await self.release()


class VersionedEngine:
    """The engine of ``chat_model`` answering with one adapter version at a time (see the module's text)."""

    def __init__(self, chat_model, store: Store, version: int, versioned: bool) -> None:
        """``versioned``: answer with adapter version ``version`` of ``store`` (else with what LLaMA-Factory loaded:
        the recipe's own adapter, or none, when nothing has been learned and nothing will be)."""
        self.chat_model, self.store = chat_model, store
        self.engine = chat_model.engine
        self.kind = str(getattr(self.engine, "name", "huggingface")).lower()
        self.version = version
        self.lock = VersionLock()
        self.slots = asyncio.Semaphore(int(os.getenv("MAX_CONCURRENT", "1")))
        self.swap_seconds: list[float] = []
        self.vllm = "vllm" in self.kind
        if self.vllm:
            self.request = self._lora_request(version) if versioned else getattr(self.engine, "lora_request", None)
        elif versioned:
            self.engine.model = PeftModel.from_pretrained(self.engine.model, store.version_dir(version))
            self.engine.model.eval()

    @property
    def template(self):
        return self.engine.template

    def _lora_request(self, version: int):
        from vllm.lora.request import LoRARequest  # optional: GPU nodes with vLLM

        return LoRARequest(f"tlm-v{version}", version + 1, self.store.version_dir(version))

    async def acquire(self) -> Ticket:
        """Hold the current version for one answer (call ``ticket.done()`` after its last token)."""
        if self.vllm:
            engine = copy.copy(self.engine)
            engine.lora_request = self.request
            return Ticket(self.version, engine)
        await self.slots.acquire()
        try:
            await self.lock.acquire_read()
        except BaseException:
            self.slots.release()
            raise

        async def release() -> None:
            await self.lock.release_read()
            self.slots.release()

        return Ticket(self.version, self.engine, release)

    async def swap(self, version: int) -> float:
        """Answer with ``version`` from now on; returns the seconds new answers were held back."""
        if version == self.version:
            return 0.0
        if self.vllm:
            start = time.perf_counter()
            self.request, self.version = self._lora_request(version), version
            return self._timed(start)
        weights = await asyncio.to_thread(
            load_file, os.path.join(self.store.version_dir(version), "adapter_model.safetensors")
        )
        async with self.lock.writing():
            start = time.perf_counter()
            with torch.no_grad():
                set_peft_model_state_dict(self.engine.model, weights)
            self.version = version
            return self._timed(start)

    def _timed(self, start: float) -> float:
        seconds = time.perf_counter() - start
        self.swap_seconds.append(seconds)
        return seconds
