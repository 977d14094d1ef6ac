"""The learning server as a user runs it: ``llamafactory-cli api recipe.yaml`` on 127.0.0.1, a tiny model, real HTTP.

Each server is started, waited for and stopped (or killed) by its test. Windows are by count (no time limit), so the
learning is a function of the stream alone and a killed-and-restarted server must give the uninterrupted records.
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from tlm_testing import QUESTIONS, VENV_BIN, base_recipe, cli_env, write_dataset

from tlm_plugin.serving.launch import ServerProcess, chat, free_port, request
from tlm_plugin.serving.store import VERSION_FILE


pytestmark = pytest.mark.slow
KEY = "test-key"
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LLAMAFACTORY_VERBOSITY": "WARN", "API_VERBOSE": "0"}
LEARNING_FIELDS = ("index", "learned", "reason", "n_tokens", "log_ppl", "selected", "weight", "log_ppl_after")


def serve_recipe(model: Path, tmp_path: Path, name: str = "serve", probe_rows: int = 4, **overrides) -> Path:
    """A serve recipe on the tiny model; ``probe_rows`` drift-guard rows (more: each window takes longer to learn)."""
    rows = []
    for k in range(probe_rows):
        q, a = QUESTIONS[k % len(QUESTIONS)]
        rows.append({"instruction": q if k < 4 else f"{q} ({k})", "input": "", "output": a})
    data = write_dataset(tmp_path / "data", rows, name="probe")
    settings = {
        "tlm_mode": "serve",
        "tlm_chunk_size": 3,
        "tlm_selector": "all",
        "tlm_probe_dataset": "probe",
        "overwrite_output_dir": False,
        "cutoff_len": 64,
        "max_new_tokens": 6,
        **overrides,
    }
    recipe = base_recipe(model, data, tmp_path / "out", **settings)
    for key in ("dataset", "num_train_epochs"):
        recipe.pop(key, None)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def start(recipe: Path, tmp_path: Path, **env) -> ServerProcess:
    server = ServerProcess(str(recipe), free_port(), {**ENV, **env}, log=str(tmp_path / "server.log"))
    return server.start().wait_ready(timeout=300)


def status(server: ServerProcess, key: str | None = None) -> dict:
    return request(server.url + "/tlm/status", key=key)[2]


def wait_for(predicate, timeout: float = 180.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ask(server: ServerProcess, i: int, key: str | None = None, **extra):
    code, body = chat(
        server.url, [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)][0]} ({i})"}], key, **extra
    )
    assert code == 200, body
    return body


def version_of(body: dict) -> int:
    fp = body["system_fingerprint"]
    assert fp.startswith("tlm-v")
    return int(fp[len("tlm-v") :])


def learning_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "tlm_scores.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: r.get(k) for k in (*LEARNING_FIELDS, "version", "status")} for r in rows]


def stream_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "tlm_stream.jsonl").read_text(encoding="utf-8").splitlines()]


# -------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tiny_model, tmp_path_factory):
    """One server with API_KEY for the tests that only read (run in file order; rollback and crashes come last)."""
    tmp_path = tmp_path_factory.mktemp("serve")
    recipe = serve_recipe(tiny_model, tmp_path, tlm_serve_retries=1)
    server = start(recipe, tmp_path, API_KEY=KEY)
    yield server, tmp_path / "out"
    server.stop()


def test_answers_carry_versions_that_only_grow_and_every_prompt_is_kept_before_its_answer(shared):
    server, out = shared
    seen = []
    for i in range(9):
        body = ask(server, i, KEY)
        version = version_of(body)
        seen.append(version)
        # the request is in the stream, and its version is complete on disk, by the time the answer arrives
        assert body["id"] in {r["id"] for r in stream_lines(out)}
        assert (out / "tlm_versions" / f"v{version}" / VERSION_FILE).is_file()
        time.sleep(0.3)
    assert seen == sorted(seen)
    not_learned = ask(server, 20, KEY, tlm_learn=False)
    code, _ = chat(server.url, [{"role": "user", "content": "word " * 80}], KEY)
    assert code == 200
    tool_turn = [
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "Let me compute."},
        {"role": "tool", "content": "42"},
    ]
    code, _ = chat(server.url, tool_turn, KEY)
    assert code == 200
    wait_for(
        lambda: status(server, KEY)["windows"] >= 3 and status(server, KEY)["learner"]["pending"] == 3,
        what="3 windows",
    )
    st = status(server, KEY)
    assert st["received"] == 12 and st["learned"] == 9 and st["selected"] == 9  # tlm_selector: all
    assert st["published"][:4] == [0, 1, 2, 3] and st["current_version"] >= 1
    assert set(st["probe_answer_bpb"]) >= {"v0", "v1", "v2", "v3"}
    lines = stream_lines(out)
    assert [r["seq"] for r in lines] == list(range(12))
    assert lines[9]["learn"] is False and lines[9]["id"] == not_learned["id"]
    records = {r["index"]: r for r in learning_records(out)}
    assert sorted(records) == list(range(9))  # the last three wait for a fourth window
    assert all(r["learned"] and r["selected"] and r["weight"] == 1.0 for r in records.values())
    assert [records[i]["version"] for i in range(9)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    # the three not learned: tlm_learn false, longer than cutoff_len, a tool turn; a fourth window shows why
    for i in range(3):
        ask(server, 30 + i, KEY)
    wait_for(lambda: status(server, KEY)["windows"] >= 4, what="a fourth window")
    records = {r["index"]: r for r in learning_records(out)}
    assert records[9] == {**records[9], "learned": False, "reason": "tlm_learn: false"}
    assert records[10]["learned"] is False and "cutoff_len" in records[10]["reason"]
    assert records[11]["learned"] is False and "not a user turn" in records[11]["reason"]
    assert all(records[i]["learned"] for i in (12, 13, 14))


def test_streamed_answers_carry_the_fingerprint_and_are_kept(shared):
    server, out = shared
    import urllib.request

    body = json.dumps(
        {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "stream"}], "stream": True}
    ).encode()
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [line[len(b"data: ") :] for line in resp.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["system_fingerprint"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"] in {r["id"] for r in stream_lines(out) if r["stream"]}


def test_concurrent_clients_all_answered(shared):
    server, out = shared
    before = len(stream_lines(out))
    results, errors = [], []

    def client(c: int) -> None:
        for j in range(4):
            try:
                code, body = chat(server.url, [{"role": "user", "content": f"client {c} question {j}"}], KEY)
                results.append((code, body))
            except Exception as err:  # noqa: BLE001 (every failure is reported)
                errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    start_t = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 16 and all(code == 200 for code, _ in results)
    assert time.monotonic() - start_t < 180
    ids = [body["id"] for _, body in results]
    assert len(set(ids)) == 16 and set(ids) <= {r["id"] for r in stream_lines(out)[before:]}


def test_rollback_makes_an_older_version_current_and_the_learner_continues_from_it(shared):
    server, out = shared
    st = wait_for(lambda: (s := status(server, KEY))["current_version"] >= 2 and s, what="version 2")
    assert request(server.url + "/tlm/rollback", {"version": 1})[0] == 401  # auth as the API
    assert request(server.url + "/tlm/rollback", {"version": 999}, KEY)[0] == 404
    assert request(server.url + "/tlm/rollback", {"version": "1"}, KEY)[0] == 400
    code, _, body = request(server.url + "/tlm/rollback", {"version": 1}, KEY)
    assert code == 200 and body["current_version"] == 1
    assert set(body["rolled_back"]) == {n for n in st["published"] if n > 1} | set(body["rolled_back"])
    assert version_of(ask(server, 40, KEY)) == 1
    newest = max(status(server, KEY)["published"] + [r["version"] for r in status(server, KEY)["rejected"]])
    for i in range(3):
        ask(server, 41 + i, KEY)
    st = wait_for(
        lambda: (s := status(server, KEY))["current_version"] > newest and s, what="a version after rollback"
    )
    first_after = min(n for n in st["published"] if n > newest)  # later windows may have followed already
    meta = json.loads((out / "tlm_versions" / f"v{first_after}" / VERSION_FILE).read_text())
    assert meta["parent"] == 1  # learned on from the version rolled back to
    assert not set(st["published"]) & set(st["rolled_back"])
    assert version_of(ask(server, 44, KEY)) >= st["current_version"]


def test_a_learner_crash_never_stops_answering(shared):
    server, out = shared
    for attempt in (1, 2):  # tlm_serve_retries: 1 -> restarted once, then learning pauses
        pid = wait_for(lambda: (s := status(server, KEY)["learner"]).get("alive") and s.get("pid"), what="a learner")
        os.kill(pid, 9)
        wait_for(lambda n=attempt: status(server, KEY)["learner"]["failures"] == n, what=f"failure {attempt}")
        ask(server, 50 + attempt, KEY)  # answering goes on
    st = wait_for(lambda: (s := status(server, KEY))["learner"]["state"].startswith("failed") and s, what="pause")
    assert "exited with code -9" in st["learner"]["error"]
    assert not st["learner"]["alive"]
    assert version_of(ask(server, 60, KEY)) == st["current_version"]
    code, _, body = request(server.url + "/tlm/resume", {}, KEY)  # the operator starts learning again
    assert code == 200 and body["learner_restarted"]
    st = wait_for(lambda: (s := status(server, KEY))["learner"]["alive"] and s, what="a new learner")
    assert st["learner"]["failures"] == 0 and st["learner"]["error"] is None


# -------------------------------------------------------------------------------------------------------------------
def test_kill_9_mid_window_then_restart_learns_every_prompt_once_as_an_uninterrupted_server(tiny_model, tmp_path):
    prompts = list(range(9))  # three windows of three

    def replay(server, items):
        for i in items:
            ask(server, i)

    # The drift guard's probe pass closes every window: with 400 probe rows it takes seconds, so the kill below lands
    # while window 2 is being learned (with 4 rows the tiny model could learn it between two polls, unseen).
    probe_rows = 400
    straight = tmp_path / "straight"
    server = start(serve_recipe(tiny_model, straight, probe_rows=probe_rows), straight)
    replay(server, prompts)
    wait_for(lambda: status(server)["windows"] == 3, what="3 windows")
    server.stop()
    expected = learning_records(straight / "out")

    killed = tmp_path / "killed"
    recipe = serve_recipe(tiny_model, killed, probe_rows=probe_rows)
    out = killed / "out"
    server = start(recipe, killed)
    replay(server, prompts[:6])  # window 1 learned (or being learned), window 2 complete: the learner starts it
    learner_status = out / "tlm_learner_status.json"
    wait_for(
        lambda: learner_status.is_file() and "from seq 3" in learner_status.read_text(), timeout=120, what="window 2"
    )
    server.kill()  # the server and its learner, in the middle of window 2
    assert not (out / "tlm_versions" / "v2").exists()
    server = start(recipe, killed)
    assert status(server)["received"] == 6
    replay(server, prompts[6:])
    wait_for(lambda: status(server)["windows"] == 3, what="3 windows after the restart")
    server.stop()
    got = learning_records(out)
    assert [r["index"] for r in got] == list(range(9))  # none lost, none learned twice
    assert [r["seq"] for r in stream_lines(out)] == prompts
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["index"], key)
            else:
                assert a[key] == b[key], (a["index"], key)


def test_the_drift_guard_rejects_a_harmful_update_and_pauses(tiny_model, tmp_path):
    recipe = serve_recipe(
        tiny_model,
        tmp_path,
        learning_rate=3.0,  # a step this large makes the probe answers less likely
        tlm_chunk_size=2,
        tlm_probe_tolerance=0.0,
        tlm_probe_patience=2,
    )
    server = start(recipe, tmp_path)
    try:
        for i in range(4):
            ask(server, i)
        st = wait_for(lambda: (s := status(server))["learner"].get("state") == "paused" and s, what="the pause")
        assert [r["version"] for r in st["rejected"]] == [1, 2] and st["published"] == [0]
        assert "best served" in st["rejected"][0]["why"]
        assert "paused" in st["learner"]["message"]
        assert version_of(ask(server, 5)) == 0  # answers keep the version the guard trusts
        code, _, _ = request(server.url + "/tlm/resume", {})
        assert code == 200
        wait_for(lambda: status(server)["learner"].get("state") != "paused", what="learning resumed")
    finally:
        server.stop()


def test_open_address_without_api_key_is_refused_before_anything_is_written(tiny_model, tmp_path):
    recipe = serve_recipe(tiny_model, tmp_path)
    env = {**cli_env(), "API_HOST": "0.0.0.0", "API_PORT": str(free_port())}
    env.pop("API_KEY", None)
    proc = subprocess.run(
        [str(VENV_BIN / "llamafactory-cli"), "api", str(recipe)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "API_KEY is not set" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_command_refuses_a_serve_recipe_and_restart_with_other_settings_is_refused(tiny_model, tmp_path):
    recipe = serve_recipe(tiny_model, tmp_path)
    proc = subprocess.run(
        [str(VENV_BIN / "llamafactory-cli"), "train", str(recipe)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "runs under `llamafactory-cli api recipe.yaml`" in proc.stderr
    out = tmp_path / "out"
    out.mkdir()
    (out / "tlm_run.json").write_text(json.dumps({"identity": "0123456789abcdef", "mode": "serve"}))
    proc = subprocess.run(
        [str(VENV_BIN / "llamafactory-cli"), "api", str(recipe)],
        env={**cli_env(), "API_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "started with other settings" in proc.stderr
    assert not (out / "tlm_stream.jsonl").exists()
