"""The learning server's own logic without a model: the on-disk store, the version lock, the door (queue limit,
body limit, bad requests) through the real app with an engine that answers when told to."""

import asyncio
import json
import os
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from tlm_plugin.errors import TLMConfigError
from tlm_plugin.hparams import parse_tlm_args
from tlm_plugin.serving import recipe as serve_recipe
from tlm_plugin.serving.app import Server, create_app
from tlm_plugin.serving.engine import VersionedEngine, VersionLock
from tlm_plugin.serving.learner import Loop, learnable
from tlm_plugin.serving.store import VERSION_FILE, Store


# ---------------------------------------------------------------------------------------------------------- store
def test_a_torn_last_line_is_cut_and_numbering_continues(tmp_path):
    store = Store(str(tmp_path))
    store.open_stream()
    assert [store.append({"id": f"r{i}"}) for i in range(3)] == [0, 1, 2]
    store.close_stream()
    with open(store.stream_path, "ab") as f:
        f.write(b'{"seq": 3, "id": "torn')  # a kill in the middle of a write
    again = Store(str(tmp_path))
    assert again.open_stream() == 3
    assert again.append({"id": "r3"}) == 3
    lines = open(again.stream_path, encoding="utf-8").read().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2", "r3"]


def test_read_stream_returns_only_complete_lines_and_the_offset_after_them(tmp_path):
    store = Store(str(tmp_path))
    with open(store.stream_path, "wb") as f:
        f.write(b'{"seq": 0}\n{"seq": 1}\n{"seq": 2')
    records, offset = store.read_stream(0)
    assert [r["seq"] for r in records] == [0, 1] and offset == len(b'{"seq": 0}\n{"seq": 1}\n')
    with open(store.stream_path, "ab") as f:
        f.write(b"}\n")
    records, _ = store.read_stream(offset)
    assert [r["seq"] for r in records] == [2]


def test_a_version_is_invisible_until_it_is_whole(tmp_path):
    store = Store(str(tmp_path))
    store.publish(0, lambda d: open(os.path.join(d, "w"), "w").write("0"), {"version": 0, "next_seq": 0})
    seen = {}

    def write(folder):
        open(os.path.join(folder, "adapter_model.safetensors"), "w").write("x")
        seen["published"], seen["current"] = store.published(), store.current()

    store.publish(1, write, {"version": 1, "next_seq": 3})
    assert seen == {"published": [0], "current": 0}
    assert store.published() == [0, 1] and store.current() == 1

    def crash(folder):
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        store.publish(2, crash, {"version": 2, "next_seq": 6})
    assert store.published() == [0, 1] and store.current() == 1
    store.remove_partial()
    assert sorted(os.listdir(store.versions_dir)) == ["v0", "v1"]


def test_rollback_rejections_and_numbers(tmp_path):
    store = Store(str(tmp_path))
    for n in (0, 1, 2):
        store.publish(n, lambda d: None, {"version": n, "next_seq": 3 * n})
    store.reject(3, {"version": 3, "next_seq": 9})
    store.reject(4, {"version": 4, "next_seq": 12})
    assert store.rejections_in_a_row() == 2 and store.next_number() == 5
    assert [o["status"] for o in store.outcomes()] == ["published", "published", "rejected", "rejected"]
    store.write_control({"rolled_back": [2], "guard_reset_after": 4})
    assert store.current() == 1 and store.rejections_in_a_row() == 0
    store.publish(5, lambda d: None, {"version": 5, "next_seq": 15})
    assert store.current() == 5
    assert os.path.isfile(os.path.join(store.version_dir(5), VERSION_FILE))


# ---------------------------------------------------------------------------------------------------------- rules
def test_which_requests_are_learned():
    user = {"role": "user", "content": "What is a bond?"}
    assert learnable({"messages": [user]}) is None
    assert "tlm_learn" in learnable({"messages": [user], "learn": False})
    tool_turn = [user, {"role": "function", "content": "[]"}, {"role": "observation", "content": "42"}]
    assert "not a user turn" in learnable({"messages": tool_turn})
    assert "empty" in learnable({"messages": [{"role": "user", "content": "  "}]})


def test_the_recipe_checks_before_any_model_loads(monkeypatch):
    base = {"stage": "tlm", "tlm_mode": "serve", "output_dir": "out", "model_name_or_path": "m"}
    with pytest.raises(TLMConfigError, match="adapter_name_or_path names several"):
        serve_recipe.check({**base, "adapter_name_or_path": "a,b"})
    with pytest.raises(TLMConfigError, match="output_dir"):
        serve_recipe.check({k: v for k, v in base.items() if k != "output_dir"})
    with pytest.raises(TLMConfigError, match="tlm_probe_tolerance has no effect"):
        serve_recipe.check({**base, "tlm_probe_tolerance": 0.5})  # no probe set: the guard does not run
    with pytest.raises(TLMConfigError, match="tlm_mode"):
        serve_recipe.check({**base, "tlm_mode": "online", "tlm_serve_queue_limit": 3})
    tlm_args = serve_recipe.check(base)
    monkeypatch.delenv("API_KEY", raising=False)
    serve_recipe.check_address("127.0.0.1", tlm_args)
    serve_recipe.check_address("::1", tlm_args)
    with pytest.raises(TLMConfigError, match="API_KEY"):
        serve_recipe.check_address("0.0.0.0", tlm_args)
    monkeypatch.setenv("API_KEY", "k")
    serve_recipe.check_address("0.0.0.0", tlm_args)
    monkeypatch.delenv("API_KEY")
    serve_recipe.check_address("0.0.0.0", serve_recipe.check({**base, "tlm_serve_allow_open": True}))
    assert serve_recipe.identity({**base, "tlm_serve_queue_limit": 3}) == serve_recipe.identity(base)
    assert serve_recipe.identity({**base, "learning_rate": 1.0}) != serve_recipe.identity(base)


# ---------------------------------------------------------------------------------------------------------- lock
def test_a_swap_waits_for_running_answers_and_holds_new_ones_back():
    async def scenario():
        lock, order = VersionLock(), []
        await lock.acquire_read()  # an answer is running

        async def swap():
            async with lock.writing():
                order.append("swap")

        async def new_answer():
            await lock.acquire_read()
            order.append("new answer")
            await lock.release_read()

        swapping = asyncio.create_task(swap())
        await asyncio.sleep(0.01)
        answering = asyncio.create_task(new_answer())
        await asyncio.sleep(0.01)
        assert order == []  # the swap waits for the running answer; the new answer waits behind the swap
        order.append("running answer ends")
        await lock.release_read()
        await asyncio.gather(swapping, answering)
        return order

    assert asyncio.run(scenario()) == ["running answer ends", "swap", "new answer"]


# ---------------------------------------------------------------------------------------------------------- door
class HeldEngine:
    """An engine whose answers wait for ``go``; records what it was asked."""

    name = "huggingface"
    template = None

    def __init__(self) -> None:
        self.go = threading.Event()
        self.started = 0

    async def chat(self, messages, system, tools, images, videos, audios, **kwargs):
        self.started += 1
        await asyncio.to_thread(self.go.wait, 30)
        return [SimpleNamespace(response_text="ok", prompt_length=3, response_length=1, finish_reason="stop")]


def _app(tmp_path, monkeypatch, **settings):
    monkeypatch.setenv("API_KEY", "secret")
    monkeypatch.setenv("MAX_CONCURRENT", "1")
    store = Store(str(tmp_path))
    store.open_stream()
    engine_impl = HeldEngine()
    tlm_args = parse_tlm_args({"tlm_mode": "serve", **settings})
    engine = VersionedEngine(SimpleNamespace(engine=engine_impl), store, 0, versioned=False)
    server = Server(store, engine, tlm_args, learner=None)
    return create_app(server), engine_impl, store


def test_the_door_answers_each_bad_request_with_its_4xx_and_keeps_the_stream(tmp_path, monkeypatch):
    app, engine, store = _app(tmp_path, monkeypatch, tlm_serve_queue_limit=2, tlm_serve_max_body_bytes=600)
    engine.go.set()
    ok = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            auth = {"Authorization": "Bearer secret"}
            out = {}
            out["ok"] = await c.post("/v1/chat/completions", json=ok, headers=auth)
            out["no key"] = await c.post("/v1/chat/completions", json=ok)
            out["wrong key"] = await c.post("/v1/chat/completions", json=ok, headers={"Authorization": "Bearer x"})
            out["bad json"] = await c.post("/v1/chat/completions", content=b'{"model": ', headers=auth)
            out["unknown model"] = await c.post("/v1/chat/completions", json={**ok, "model": "x"}, headers=auth)
            out["empty"] = await c.post("/v1/chat/completions", json={**ok, "messages": []}, headers=auth)
            out["too big"] = await c.post(
                "/v1/chat/completions",
                json={**ok, "messages": [{"role": "user", "content": "x" * 1000}]},
                headers=auth,
            )
            out["status"] = await c.get("/tlm/status", headers=auth)
            out["status no key"] = await c.get("/tlm/status")
            out["rollback bad"] = await c.post("/tlm/rollback", content=b"{}", headers=auth)
            out["ok again"] = await c.post("/v1/chat/completions", json={**ok, "tlm_learn": False}, headers=auth)
            return out

    out = asyncio.run(scenario())
    codes = {k: r.status_code for k, r in out.items()}
    assert codes == {
        "ok": 200,
        "no key": 401,
        "wrong key": 401,
        "bad json": 400,
        "unknown model": 404,
        "empty": 400,
        "too big": 413,
        "status": 200,
        "status no key": 401,
        "rollback bad": 400,
        "ok again": 200,
    }
    assert "not valid JSON" in out["bad json"].json()["detail"]
    assert "unknown model 'x'" in out["unknown model"].json()["detail"]
    assert "exceeds the limit of 600" in out["too big"].json()["detail"]
    assert out["ok"].json()["system_fingerprint"] == "tlm-v0"
    lines = [json.loads(line) for line in open(store.stream_path, encoding="utf-8")]
    assert [r["id"] for r in lines] == [out["ok"].json()["id"], out["ok again"].json()["id"]]
    assert [r["learn"] for r in lines] == [True, False]


def test_requests_beyond_the_queue_limit_get_429_with_retry_after(tmp_path, monkeypatch):
    app, engine, store = _app(tmp_path, monkeypatch, tlm_serve_queue_limit=2)
    ok = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            auth = {"Authorization": "Bearer secret"}
            held = [asyncio.create_task(c.post("/v1/chat/completions", json=ok, headers=auth)) for _ in range(2)]
            while engine.started < 1:  # one answering, one waiting for the engine's single slot
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            refused = await c.post("/v1/chat/completions", json=ok, headers=auth)
            engine.go.set()
            answered = await asyncio.gather(*held)
            after = await c.post("/v1/chat/completions", json=ok, headers=auth)
            return refused, answered, after

    refused, answered, after = asyncio.run(scenario())
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "tlm_serve_queue_limit" in refused.json()["detail"]
    assert [r.status_code for r in answered] == [200, 200] and after.status_code == 200
    assert len(open(store.stream_path, encoding="utf-8").read().splitlines()) == 3


def test_metrics_are_prometheus_text_with_the_request_counts(tmp_path, monkeypatch):
    app, engine, _ = _app(tmp_path, monkeypatch)
    engine.go.set()
    ok = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            auth = {"Authorization": "Bearer secret"}
            await c.post("/v1/chat/completions", json=ok, headers=auth)
            await c.post("/v1/chat/completions", json={**ok, "model": "x"}, headers=auth)
            return await c.get("/metrics")

    metrics = asyncio.run(scenario())
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    lines = set(metrics.text.splitlines())
    assert 'tlm_requests_total{code="200"} 1.0' in lines and 'tlm_requests_total{code="404"} 1.0' in lines
    assert "tlm_prompts_received_total 1.0" in lines and "tlm_adapter_version 0.0" in lines
    assert "tlm_request_latency_seconds_count 1.0" in lines


# ---------------------------------------------------------------------------------------------------------- vLLM
class FakeVllmEngine:
    name = "vLLM"
    template = None

    def __init__(self) -> None:
        self.lora_request = ("default", 1, "recipe-adapter")


def test_vllm_answers_each_request_through_its_own_versions_lora_request(tmp_path, monkeypatch):
    monkeypatch.setattr(
        VersionedEngine, "_lora_request", lambda self, v: (f"tlm-v{v}", v + 1, self.store.version_dir(v))
    )
    store = Store(str(tmp_path))
    shared = FakeVllmEngine()
    engine = VersionedEngine(SimpleNamespace(engine=shared), store, 2, versioned=True)

    async def scenario():
        first = await engine.acquire()
        await engine.swap(5)
        second = await engine.acquire()
        return first, second

    first, second = asyncio.run(scenario())
    assert (first.version, first.engine.lora_request[:2]) == (2, ("tlm-v2", 3))
    assert (second.version, second.engine.lora_request[:2]) == (5, ("tlm-v5", 6))  # a new name and id per version
    assert shared.lora_request == ("default", 1, "recipe-adapter")  # the shared engine is never changed
    untouched = VersionedEngine(SimpleNamespace(engine=FakeVllmEngine()), store, 0, versioned=False)
    ticket = asyncio.run(untouched.acquire())
    assert ticket.engine.lora_request == ("default", 1, "recipe-adapter")  # nothing learned: the recipe's adapter


# ---------------------------------------------------------------------------------------------------------- windows
def _loop(tmp_path, chunk: int, window_s: float | None) -> Loop:
    settings = SimpleNamespace(tlm_chunk_size=chunk, tlm_serve_window_s=window_s, tlm_probe_patience=3)
    learner = SimpleNamespace(
        tlm_args=settings,
        probe=None,
        current=0,
        prepare=lambda r: "not learned" if learnable(r) else {"index": r["seq"]},
    )
    return Loop(learner, Store(str(tmp_path)))


def _write_stream(store_dir, records) -> None:
    store = Store(str(store_dir))
    store.open_stream()
    for record in records:
        store.append(record)
    store.close_stream()


def test_a_window_closes_at_chunk_size_learnable_prompts_or_after_its_time_limit(tmp_path):
    now = time.time()
    user = [{"role": "user", "content": "q"}]
    _write_stream(tmp_path, [{"time": now, "messages": user, "learn": i != 1} for i in range(5)])
    by_count = _loop(tmp_path, chunk=3, window_s=None)
    window = by_count.next_window()
    assert [r["seq"] for r in window] == [0, 1, 2, 3]  # seq 1 is not learned and does not count
    by_count.pending = by_count.pending[len(window) :]
    assert by_count.next_window() is None  # one learnable prompt left, no time limit: wait
    old = tmp_path / "old"
    _write_stream(old, [{"time": now - 60, "messages": user} for _ in range(2)])
    assert _loop(old, chunk=3, window_s=30).next_window() is not None  # the time limit closes a short window
    assert _loop(old, chunk=3, window_s=120).next_window() is None
