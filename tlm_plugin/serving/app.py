"""The learning server's HTTP side: LLaMA-Factory's OpenAI-compatible routes, each answer marked with its adapter
version and kept in the stream, the learner watched, and ``/tlm/*`` and ``/metrics``.

``/v1/models`` and ``/v1/chat/completions`` (streaming too) answer as ``llamafactory-cli api`` does, through
LLaMA-Factory's own request handling and engines, with ``API_KEY`` bearer auth and ``API_MODEL_NAME``; each answer
says ``system_fingerprint: "tlm-v<N>"``. Before an answer is generated its request is appended to
``tlm_stream.jsonl`` (messages, id, time, the version answering, whether it may be learned: an extra body field
``"tlm_learn": false`` keeps a request out of learning). Bad input gets a 4xx naming what is wrong and changes nothing.
"""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security.http import HTTPAuthorizationCredentials, HTTPBearer
from llamafactory.api.chat import create_chat_completion_response, create_stream_chat_completion_response
from llamafactory.api.protocol import ChatCompletionRequest, ModelCard, ModelList
from llamafactory.extras.logging import get_logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from tlm_plugin.serving.engine import Ticket, VersionedEngine
from tlm_plugin.serving.store import Store, fingerprint
from tlm_plugin.train import outputs


logger = get_logger(__name__)

WATCH_S = 0.25  # how often the server looks for a new version


class RequestChat:
    """What LLaMA-Factory's response builders call as a chat model, for one request: records the request in the
    stream right before its answer is generated, then asks the version's engine."""

    def __init__(self, server: "Server", ticket: Ticket, request_id: str, learn: bool, streaming: bool) -> None:
        self.server, self.ticket, self.request_id = server, ticket, request_id
        self.learn, self.streaming = learn, streaming
        self.engine = ticket.engine
        self.seq: int | None = None

    def _record(self, messages, system, tools, media) -> None:
        self.seq = self.server.store.append(
            {
                "id": self.request_id,
                "time": time.time(),
                "version": self.ticket.version,
                "learn": self.learn and not media,
                "messages": messages,
                "system": system,
                "tools": tools,
                "stream": self.streaming,
            }
        )
        self.server.metrics["received"].inc()

    async def achat(self, messages, system=None, tools=None, images=None, videos=None, audios=None, **kwargs):
        self._record(messages, system, tools, bool(images or videos or audios))
        return await self.engine.chat(messages, system, tools, images, videos, audios, **kwargs)

    async def astream_chat(self, messages, system=None, tools=None, images=None, videos=None, audios=None, **kwargs):
        self._record(messages, system, tools, bool(images or videos or audios))
        async for token in self.engine.stream_chat(messages, system, tools, images, videos, audios, **kwargs):
            yield token


class Learner:
    """The learner process: started, watched, restarted after a failure (``tlm_serve_retries`` times), then paused
    with its error; stopped and started again on a rollback."""

    def __init__(self, store: Store, retries: int) -> None:
        self.store, self.retries = store, retries
        self.proc: subprocess.Popen | None = None
        self.failures = 0
        self.error: str | None = None
        self.restarting = False
        self.stopping = False
        self._released = asyncio.Event()
        self._released.set()

    @property
    def log_path(self) -> str:
        return os.path.join(self.store.output_dir, outputs.LEARNER_LOG_FILE)

    def start(self) -> None:
        # no busy-waiting threads beside the answering ones; no progress bars in the log
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tlm_plugin.serving.learner", self.store.output_dir],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            log.close()

    def tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=n)).strip()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def supervise(self) -> None:
        while not self.stopping:
            if self.proc is None:
                self.start()
            rc = await asyncio.to_thread(self.proc.wait)
            if self.stopping:
                return
            if self.restarting:
                await self._released.wait()
                self.restarting = False
                self.proc = None
                continue
            self.failures += 1
            self.error = f"the learner exited with code {rc}: {self.tail()}"
            logger.warning(f"tlm serve: {self.error}")
            if self.failures > self.retries:
                logger.warning(f"tlm serve: learning paused after {self.failures} failures; answering goes on.")
                return
            await asyncio.sleep(min(2.0**self.failures, 30.0))
            self.proc = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def hold(self) -> None:
        """Stop the learner now (a window in progress is dropped: it has no outcome on disk and is learned again)
        and start no new one until :meth:`release`."""
        self.restarting = True
        self._released.clear()
        await asyncio.to_thread(self.kill)

    def release(self) -> None:
        """Start a learner again (it loads the current version); earlier failures are forgiven."""
        self.failures, self.error = 0, None
        self._released.set()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Server:
    def __init__(self, store: Store, engine: VersionedEngine, tlm_args, learner: Learner | None) -> None:
        self.store, self.engine, self.tlm_args, self.learner = store, engine, tlm_args, learner
        self.model_name = os.getenv("API_MODEL_NAME", "gpt-3.5-turbo")
        self.api_key = os.getenv("API_KEY")
        self.in_flight = 0
        self.switching = asyncio.Lock()
        self.supervisor: asyncio.Task | None = None
        self.latencies: deque[float] = deque(maxlen=200)
        registry = CollectorRegistry()
        self.registry = registry
        self.metrics = {
            "requests": Counter(
                "tlm_requests", "Chat completion requests by HTTP status", ["code"], registry=registry
            ),
            "latency": Histogram(
                "tlm_request_latency_seconds",
                "Chat completion latency (whole answer)",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
                registry=registry,
            ),
            "received": Counter("tlm_prompts_received", "Requests kept in tlm_stream.jsonl", registry=registry),
            "swap": Histogram(
                "tlm_swap_seconds",
                "Time answers were held back by an adapter swap",
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
                registry=registry,
            ),
            "version": Gauge("tlm_adapter_version", "Adapter version answering now", registry=registry),
            "learned": Gauge("tlm_prompts_learned", "Prompts learned from", registry=registry),
            "selected": Gauge("tlm_prompts_selected", "Learned prompts selected by S(x)", registry=registry),
            "windows": Gauge("tlm_windows", "Windows learned (published or rejected)", registry=registry),
            "rejected": Gauge("tlm_versions_rejected", "Versions the drift guard rejected", registry=registry),
            "probe": Gauge("tlm_probe_answer_bpb", "Probe answers' bits per byte, current version", registry=registry),
            "in_flight": Gauge("tlm_requests_in_flight", "Chat requests answering or waiting", registry=registry),
        }
        self.metrics["version"].set(engine.version)

    # ------------------------------------------------------------------ versions
    async def watch(self) -> None:
        """Swap to each new version once it is complete on disk (the learner publishes, the server serves)."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                async with self.switching:  # a rollback decides and swaps under the same lock
                    current = self.store.current()
                    if current is not None and current > self.engine.version:
                        await self.use(current)
            except Exception as err:  # a version that cannot be loaded is not served; answering goes on
                logger.warning(f"tlm serve: could not switch versions: {err!r}")

    async def use(self, version: int) -> None:
        seconds = await self.engine.swap(version)
        self.metrics["swap"].observe(seconds)
        self.metrics["version"].set(version)
        meta = self.store.meta(version)
        probe = meta.get("probe_answer_bpb")
        print(
            f"tlm serve: answering with v{version} (swap {seconds * 1000:.1f} ms, learned {meta.get('learned', 0)}"
            + (f", probe answer bpb {probe:.4f}" if probe is not None else "")
            + ")",
            flush=True,
        )

    def supervise(self) -> None:
        """Watch the learner (again, after it was given up on: a rollback or a resume starts it anew)."""
        if self.learner is not None and (self.supervisor is None or self.supervisor.done()):
            self.supervisor = asyncio.create_task(self.learner.supervise())

    def status(self) -> dict[str, Any]:
        outcomes = self.store.outcomes()
        control = self.store.control()
        published = self.store.published()
        probe = {}
        for n in published:
            value = self.store.meta(n).get("probe_answer_bpb")
            if value is not None:
                probe[n] = value
        learner = self.store.learner_status() if self.learner is not None else {}
        if self.learner is not None:
            learner = {
                **learner,
                "pid": self.learner.proc.pid if self.learner.alive() else None,
                "alive": self.learner.alive(),
                "failures": self.learner.failures,
                "error": self.learner.error,
            }
            if self.learner.error and not self.learner.alive():
                learner["state"] = "failed: learning paused"
        rejected = [o for o in outcomes if o["status"] == "rejected"]
        totals = {k: sum(int(o.get(k) or 0) for o in outcomes) for k in ("learned", "selected", "skipped_steps")}
        return {
            "current_version": self.engine.version,
            "system_fingerprint": fingerprint(self.engine.version),
            "engine": self.engine.kind,
            "learning": self.learner is not None,
            "received": self.store.received,
            **totals,
            "windows": len(outcomes),
            "published": [n for n in published if n not in set(control["rolled_back"])],
            "rolled_back": sorted(control["rolled_back"]),
            "rejected": [{"version": o["version"], "why": o.get("rejected_because")} for o in rejected],
            "probe_answer_bpb": {f"v{n}": v for n, v in probe.items()},
            "learner": learner,
            "in_flight": self.in_flight,
            "swap_ms": _summary_ms(self.engine.swap_seconds),
        }

    async def rollback(self, version: int) -> dict[str, Any]:
        async with self.switching:
            return await self._rollback(version)

    async def _rollback(self, version: int) -> dict[str, Any]:
        published = self.store.published()
        if version not in published:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"version {version} is not a published version (published: {published})"
            )
        if self.learner is not None:  # no version may appear between this decision and the learner's restart
            await self.learner.hold()
            published = self.store.published()
        control = self.store.control()
        rolled_back = (set(control["rolled_back"]) - {version}) | {n for n in published if n > version}
        used = published + self.store.rejected()
        control.update(rolled_back=sorted(rolled_back), guard_reset_after=max(used))
        control.setdefault("rollbacks", []).append({"to": version, "time": time.time()})
        self.store.write_control(control)
        seconds = await self.engine.swap(version)
        self.metrics["version"].set(version)
        print(f"tlm serve: rolled back to v{version} (swap {seconds * 1000:.1f} ms)", flush=True)
        if self.learner is not None:
            self.learner.release()
            self.supervise()
        return {"current_version": version, "rolled_back": sorted(rolled_back)}

    def resume(self) -> dict[str, Any]:
        """Learning again: the drift guard's pause lifted, a learner given up on after failures started anew."""
        control = self.store.control()
        used = self.store.published() + self.store.rejected()
        control["guard_reset_after"] = max(used) if used else -1
        self.store.write_control(control)
        restarted = False
        if self.learner is not None and not self.learner.alive():
            self.learner.release()
            self.learner.proc = None
            self.supervise()
            restarted = True
        return {"resumed": True, "learner_restarted": restarted}

    def refresh_gauges(self) -> None:
        outcomes = self.store.outcomes()
        self.metrics["learned"].set(sum(int(o.get("learned") or 0) for o in outcomes))
        self.metrics["selected"].set(sum(int(o.get("selected") or 0) for o in outcomes))
        self.metrics["windows"].set(len(outcomes))
        self.metrics["rejected"].set(sum(1 for o in outcomes if o["status"] == "rejected"))
        probe = self.store.meta(self.engine.version).get("probe_answer_bpb") if self.store.published() else None
        self.metrics["probe"].set(probe if probe is not None else math.nan)
        self.metrics["in_flight"].set(self.in_flight)

    async def finish(self, ticket: Ticket | None, code: str, start: float) -> None:
        """A chat request is over (answered, refused or failed): its version released, counted, timed."""
        if ticket is not None:
            await ticket.done()
        self.in_flight -= 1
        self.metrics["requests"].labels(code).inc()
        if code == "200":
            elapsed = time.perf_counter() - start
            self.latencies.append(elapsed)
            self.metrics["latency"].observe(elapsed)

    def retry_after(self) -> int:
        typical = sorted(self.latencies)[len(self.latencies) // 2] if self.latencies else 1.0
        return max(1, math.ceil(typical))


def _summary_ms(seconds: list[float]) -> dict[str, float | int | None]:
    """Count, median and largest of the adapter swaps so far, in milliseconds."""
    if not seconds:
        return {"count": 0, "median": None, "max": None}
    ordered = sorted(seconds)
    return {"count": len(ordered), "median": ordered[len(ordered) // 2] * 1000, "max": ordered[-1] * 1000}


def _error(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=code, headers=headers)


class BodyLimit:
    """ASGI middleware: a request whose declared Content-Length exceeds the limit is answered 413 unread."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                response = _error(
                    413,
                    f"request body of {int(length)} bytes exceeds the limit of {self.limit} "
                    "(tlm_serve_max_body_bytes)",
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(server.watch())]
        server.supervise()
        yield
        if server.learner is not None:
            server.learner.stopping = True
            await asyncio.to_thread(server.learner.stop)
        for task in [*tasks, server.supervisor]:
            if task is not None:
                task.cancel()

    app = FastAPI(root_path=os.getenv("FASTAPI_ROOT_PATH", ""), lifespan=lifespan)
    limit = server.tlm_args.tlm_serve_max_body_bytes
    app.add_middleware(BodyLimit, limit=limit)
    security = HTTPBearer(auto_error=False)

    async def verify_api_key(auth: Annotated[HTTPAuthorizationCredentials | None, Depends(security)]):
        if server.api_key and (auth is None or auth.credentials != server.api_key):
            raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="Invalid API key.")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return _error(400, f"invalid request: {err.errors()}")

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(verify_api_key)])
    async def list_models():
        return ModelList(data=[ModelCard(id=server.model_name)])

    @app.post("/v1/chat/completions", dependencies=[Depends(verify_api_key)])
    async def chat_completions(request: Request):
        start = time.perf_counter()
        if server.in_flight >= server.tlm_args.tlm_serve_queue_limit:
            server.metrics["requests"].labels("429").inc()
            return _error(
                429,
                f"{server.in_flight} requests are being answered or waiting (tlm_serve_queue_limit); retry later",
                {"Retry-After": str(server.retry_after())},
            )
        server.in_flight += 1
        ticket = None
        streamed = False
        code = "200"
        try:
            body = await request.body()
            if len(body) > limit:
                code = "413"
                return _error(413, f"request body of {len(body)} bytes exceeds the limit of {limit}")
            parsed = _parse_body(body, server.model_name)
            if isinstance(parsed, JSONResponse):
                code = str(parsed.status_code)
                return parsed
            chat_request, learn = parsed
            ticket = await server.engine.acquire()
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            chat = RequestChat(server, ticket, request_id, learn, bool(chat_request.stream))
            marks = {"id": request_id, "system_fingerprint": fingerprint(ticket.version)}
            if chat_request.stream:
                events = create_stream_chat_completion_response(chat_request, chat)
                first = await events.__anext__()  # LLaMA-Factory checks the request here (4xx before any event)
                streamed = True
                return EventSourceResponse(
                    _marked_events(first, events, marks, ticket, server, start),
                    media_type="text/event-stream",
                    sep="\n",
                )
            response = await create_chat_completion_response(chat_request, chat)
            return JSONResponse({**response.model_dump(mode="json"), **marks})
        except HTTPException as err:
            code = str(err.status_code)
            raise
        except Exception:
            code = "500"
            raise
        finally:
            if not streamed:
                await server.finish(ticket, code, start)

    @app.get("/tlm/status", dependencies=[Depends(verify_api_key)])
    async def tlm_status():
        return server.status()

    @app.post("/tlm/rollback", dependencies=[Depends(verify_api_key)])
    async def tlm_rollback(request: Request):
        try:
            payload = json.loads(await request.body())
            version = payload["version"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return _error(400, 'send {"version": N} with N an integer, the published version to answer with')
        return await server.rollback(version)

    @app.post("/tlm/resume", dependencies=[Depends(verify_api_key)])
    async def tlm_resume():
        return server.resume()

    @app.get("/metrics")
    async def metrics():
        server.refresh_gauges()
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        return {"ok": True, "version": server.engine.version}

    return app


def _parse_body(body: bytes, model_name: str):
    """(the request, whether it may be learned) or the 4xx response that says what is wrong."""
    try:
        payload = json.loads(body)
    except ValueError as err:
        return _error(400, f"the request body is not valid JSON: {err}")
    if not isinstance(payload, dict):
        return _error(400, "the request body must be a JSON object")
    learn = payload.pop("tlm_learn", True)
    if not isinstance(learn, bool):
        return _error(400, f"tlm_learn must be true or false, got {learn!r}")
    try:
        chat_request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _error(400, f"invalid chat completion request: {problems}")
    if chat_request.model != model_name:
        return _error(404, f"unknown model {chat_request.model!r}: this server serves {model_name!r} (API_MODEL_NAME)")
    if not chat_request.messages:
        return _error(400, "messages is empty: send at least one user message")
    return chat_request, learn


async def _marked_events(first: str, events, marks: dict[str, str], ticket: Ticket, server: Server, start: float):
    """LLaMA-Factory's stream chunks with the request's id and fingerprint; releases the version at the end."""
    code = "200"
    try:
        yield _mark(first, marks)
        async for chunk in events:
            yield _mark(chunk, marks)
    except Exception:
        code = "500"
        raise
    finally:
        await server.finish(ticket, code, start)


def _mark(chunk: str, marks: dict[str, str]) -> str:
    if chunk == "[DONE]":
        return chunk
    return json.dumps({**json.loads(chunk), **marks}, ensure_ascii=False)
