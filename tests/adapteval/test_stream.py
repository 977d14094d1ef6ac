"""``adapteval stream``: a dataset replayed as traffic to a learning server, and the learning curve it writes."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from openai_server import OpenAIServer
from tlm_testing import QUESTIONS, VENV_BIN, base_recipe, cli_env, write_dataset

from adapteval import cli, stream


def _record(row, sent, latency, version, answer, reference, ok=True):
    return {
        "row": row,
        "sent": sent,
        "latency_s": latency,
        "ok": ok,
        "status": 200 if ok else 500,
        "version": version if ok else None,
        "answer": answer if ok else None,
        "reference": reference,
    }


# Hand-made records: ROUGE of "the dog sat" against "the cat sat" is 2/3 (LCS "the sat"), of "the cat" 0.8
# (precision 1, recall 2/3); the bigrams of "the dog sat" share none with the reference.
RECORDS = [
    _record(0, 2.0, 1.0, 0, "the cat sat", "the cat sat"),
    _record(1, 1.0, 2.0, 0, "the dog sat", "the cat sat"),  # sent first
    _record(2, 3.0, 3.0, None, None, "x", ok=False),
    _record(3, 4.0, 4.0, 1, "a b", "c d"),
    _record(4, 5.0, 5.0, 1, "the cat", "the cat sat"),
]


def test_the_curve_per_version_and_over_time_bins():
    result = stream.curve(RECORDS, {0: 2.0, 1: 1.5, 2: 1.4}, bin_rows=2, bleu=False, states={3: "rejected"})
    assert result["metric"] == "rougeLsum"
    assert (result["n_requests"], result["n_answers"], result["n_failed"]) == (5, 4, 1)

    v0, v1, v2, v3 = result["versions"]
    assert (v0["version"], v0["answers"], v0["rows"], v0["probe_answer_bpb"]) == (0, 2, [0, 1], 2.0)
    assert v0["scores"]["rougeL"] == pytest.approx((1 + 2 / 3) / 2)
    assert v0["scores"]["rouge2"] == pytest.approx(0.5)
    assert v0["scores"]["bleu"] is None  # bleu=False
    assert v0["latency_s_p50"] == pytest.approx(1.5)
    assert (v1["answers"], v1["rows"], v1["probe_answer_bpb"]) == (2, [3, 4], 1.5)
    assert v1["scores"]["rougeLsum"] == pytest.approx((0 + 0.8) / 2)
    assert (v2["answers"], v2["probe_answer_bpb"], v2["scores"]["rougeL"]) == (0, 1.4, None)  # published, unused
    assert (v3["version"], v3["state"], v3["probe_answer_bpb"], v3["answers"]) == (3, "rejected", None, 0)

    # In the order sent: rows 1, 0 | 2 (failed), 3 | 4.
    bins = result["bins"]
    assert [b["rows"] for b in bins] == [[1, 0], [2, 3], [4]]
    assert [(b["start"], b["end"]) for b in bins] == [(0, 2), (2, 4), (4, 5)]
    assert [(b["answers"], b["failed"]) for b in bins] == [(2, 0), (1, 1), (1, 0)]
    assert [b["score"] for b in bins] == pytest.approx([(1 + 2 / 3) / 2, 0.0, 0.8])
    assert [b["versions"] for b in bins] == [[0], [1], [1]]

    # Latency of the answered requests 1, 2, 4, 5 s: p50 between 2 and 4, p95 at rank 2.85 of 0..3.
    assert result["latency_s"] == pytest.approx({"n": 4, "p50": 3.0, "p95": 4.85, "mean": 3.0, "max": 5.0})
    assert result["per_request_scores"][2] == {}
    assert result["per_request_scores"][4]["rougeL"] == pytest.approx(0.8)


def test_default_bins_are_at_most_ten_and_answers_without_fingerprint_are_their_own_row():
    records = [_record(k, float(k), 0.1, None, "a", "a") for k in range(23)]
    result = stream.curve(records, {}, bleu=False)
    assert result["bin_rows"] == 3
    assert [b["requests"] for b in result["bins"]] == [3] * 7 + [2]
    assert [v["label"] for v in result["versions"]] == ["no fingerprint"]
    assert result["versions"][0]["answers"] == 23
    assert result["bins"][0]["versions"] == []


def test_bleu_and_exact_match():
    pytest.importorskip("sacrebleu")
    records = [_record(0, 0.0, 0.1, 0, "so it is 42", "steps #### 42"), _record(1, 1.0, 0.1, 0, "7", "x #### 8")]
    result = stream.curve(records, {}, answer_format="gsm8k")
    assert result["metric"] == "em"
    assert result["versions"][0]["scores"]["em"] == 0.5
    assert [b["score"] for b in result["bins"]] == [1.0, 0.0]
    same = stream.curve([_record(0, 0.0, 0.1, 0, "the cat sat on the mat", "the cat sat on the mat")], {})
    assert same["versions"][0]["scores"]["bleu"] == pytest.approx(1.0)
    assert stream.answer_format_of(Path("build/gsm8k.json")) == ("gsm8k", "gsm8k")
    assert stream.answer_format_of(Path("traffic.json")) == (None, None)


def test_percentile_and_versions_from_the_status():
    assert stream.percentile([], 50) is None
    assert stream.percentile([7.0], 95) == 7.0
    assert stream.percentile([3.0, 1.0, 2.0], 50) == 2.0
    status = {
        "current_version": 2,
        "published": [0, 1, 2],
        "rolled_back": [2],
        "rejected": [{"version": 3, "why": "worse"}],
        "probe_answer_bpb": {"v0": 2.5, "v1": 2.25, "v2": 2},
    }
    assert stream.probe_values(status) == {0: 2.5, 1: 2.25, 2: 2.0}
    assert stream.version_states(status) == {0: "published", 1: "published", 2: "rolled back", 3: "rejected"}
    assert stream.parse_version("tlm-v12") == 12
    assert stream.parse_version("fp_abc") is None


def test_settling_reads_the_learner_status():
    window = {"tlm_chunk_size": 3, "tlm_serve_window_s": None}

    def status(state, next_seq, pending, received=9, learning=True):
        learner = {"state": state, "next_seq": next_seq, "pending": pending, "message": "m", "error": "e"}
        return {"learning": learning, "received": received, "learner": learner}

    assert stream._settled(status("waiting", 9, 0), window)[0] is True
    assert stream._settled(status("waiting", 6, 0), window)[0] is None  # not read the last requests yet
    assert stream._settled(status("learning", 6, 3), window)[0] is None
    assert stream._settled(status("waiting", 9, 1, received=10), window)[0] is True  # 1 < a window of 3
    assert stream._settled(status("waiting", 9, 1, received=10), None)[0] is None  # the window is not known
    assert stream._settled(status("paused", 3, 2), window)[0] is True
    assert stream._settled(status("failed: learning paused", 3, 0), window)[0] is False
    assert stream._settled(status("waiting", 0, 0, learning=False), window)[0] is True


# ---------------------------------------------------------------------------------------------------- the data
def test_alpaca_json_jsonl_and_chat_rows(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "output": "Blue."},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {"instruction": "Next?", "input": "", "output": "b", "history": [["First?", "a"]], "system": "Be brief."},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for source in (path, lines):
        got = stream.read_rows(source)
        assert [r.index for r in got] == [0, 1, 2, 3]
        assert got[0].messages == [{"role": "user", "content": "Add.\n2 and 3"}]  # as LLaMA-Factory joins them
        assert (got[1].messages, got[1].reference) == ([{"role": "user", "content": "Name a colour."}], "Blue.")
        assert (got[2].messages, got[2].reference) == ([{"role": "user", "content": "Hi?"}], "Hello.")
        assert [m["role"] for m in got[3].messages] == ["system", "user", "assistant", "user"]
    assert len(stream.read_rows(path, limit=2)) == 2
    held_out = stream.read_rows(path, limit=2, skip=1)  # the first row is the probe set's: not sent
    assert [r.index for r in held_out] == [1, 2] and held_out[0].reference == "Blue."
    with pytest.raises(ValueError, match="leaves none of its 4 rows"):
        stream.read_rows(path, skip=4)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no such data file"),
        ("{not json", "neither JSON nor JSON Lines"),
        ('"a string"', "expected a JSON list of rows"),
        ("[]", "has no rows"),
        (json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}]), "row 1 (counting from 0)"),
        (json.dumps([["q", "a"]]), "row 0 (counting from 0) is a JSON list"),
        (json.dumps([{"messages": [{"role": "user", "content": "q"}] * 2}]), "the last message must be"),
        ('{"instruction": "q", "output": "a"}\nnot json\n', "line 2 is not JSON"),
    ],
)
def test_a_bad_data_file_is_a_user_error_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    code = cli.main(["stream", "--data", str(path), "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "o")])
    assert code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("adapteval stream: error: ") and str(path) in err and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_server_is_needed(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "q", "output": "a"}]), encoding="utf-8")
    assert cli.main(["stream", "--data", str(path), "--out", str(tmp_path / "o")]) == cli.EXIT_USER_ERROR
    assert "give --recipe" in capsys.readouterr().err
    recipe = tmp_path / "train.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "sft"}), encoding="utf-8")
    assert cli.main(["stream", "--data", str(path), "--recipe", str(recipe)]) == cli.EXIT_USER_ERROR
    assert "tlm_mode: serve" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- against a running server
def _traffic(tmp_path: Path, n: int) -> Path:
    rows = [{"instruction": q, "input": "in" if k % 2 else "", "output": a} for k, (q, a) in enumerate(QUESTIONS[:n])]
    path = tmp_path / "traffic.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_replay_against_a_running_openai_server(tmp_path, capsys):
    data = _traffic(tmp_path, 5)
    out = tmp_path / "out"
    with OpenAIServer("Sediment settles where the river slows at the sea.") as server:
        args = ["stream", "--data", str(data), "--url", server.url, "--api-key", "k1", "--out", str(out)]
        code = cli.main([*args, "--clients", "3", "--max-tokens", "16", "--bin", "2"])
        sent = list(server.requests)
    assert code == 0
    assert len(sent) == 5 and {r["auth"] for r in sent} == {"Bearer k1"}
    assert {(r["model"], r["do_sample"], r["temperature"], r["max_tokens"]) for r in sent} == {
        ("teacher", False, 0, 16)
    }
    assert sorted(r["messages"][0]["content"] for r in sent) == sorted(
        q + ("\nin" if k % 2 else "") for k, (q, _) in enumerate(QUESTIONS[:5])
    )
    records = [json.loads(line) for line in (out / stream.REQUESTS_FILE).read_text().splitlines()]
    assert [r["row"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["status"] == 200 and r["ok"] and r["version"] is None for r in records)
    assert records[0]["scores"]["rougeL"] == 1.0  # the reply is row 0's reference
    result = json.loads((out / stream.CURVE_JSON).read_text())
    assert result["server"]["status"] is None and result["server"]["started_here"] is False
    assert [b["requests"] for b in result["bins"]] == [2, 2, 1]
    printed = capsys.readouterr().out
    assert "| no fingerprint | 5 | - |" in printed
    assert printed.endswith((out / stream.CURVE_MD).read_text())


def test_a_failed_request_is_recorded_and_the_exit_code_is_1(tmp_path, monkeypatch, capsys):
    data = _traffic(tmp_path, 3)
    real = stream.chat

    def flaky(url, messages, **kwargs):
        if messages[0]["content"].startswith(QUESTIONS[1][0]):
            raise ConnectionResetError("reset by peer")
        return real(url, messages, **kwargs)

    monkeypatch.setattr(stream, "chat", flaky)
    with OpenAIServer("an answer") as server:
        code = cli.main(["stream", "--data", str(data), "--url", server.url, "--out", str(tmp_path / "out")])
    assert code == 1
    records = [json.loads(line) for line in (tmp_path / "out" / stream.REQUESTS_FILE).read_text().splitlines()]
    assert [r["ok"] for r in records] == [True, False, True]
    assert records[1]["status"] is None and "reset by peer" in records[1]["error"]
    result = json.loads((tmp_path / "out" / stream.CURVE_JSON).read_text())
    assert (result["n_failed"], result["n_answers"]) == (1, 2)
    assert "[2/3] row 1 failed: ConnectionResetError: reset by peer" in capsys.readouterr().out


class FakeServer:
    """Stands in for ServerProcess: records how it was made and whether it was stopped; ``fail_next`` makes the
    next one not come up."""

    made: list["FakeServer"] = []
    fail_next = False
    url = "http://127.0.0.1:1"

    def __init__(self, recipe, port, env=None, log=None):
        self.recipe, self.port, self.env, self.log, self.stopped = recipe, port, env, log, False
        self.fail = FakeServer.fail_next
        FakeServer.made.append(self)

    def start(self):
        return self

    def wait_ready(self, timeout):
        if self.fail:
            raise RuntimeError("the server exited with code 1: TLMConfigError: boom")
        return self

    def stop(self):
        self.stopped = True


@pytest.fixture
def fake_server(monkeypatch, tmp_path):
    FakeServer.made, FakeServer.fail_next = [], False
    monkeypatch.setattr(stream, "ServerProcess", FakeServer)
    monkeypatch.setattr(stream, "connect", lambda url, key: stream.Target(url, key, "m"))
    monkeypatch.setattr(stream, "tlm_status", lambda target: None)
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "tlm", "tlm_mode": "serve", "output_dir": "x"}), encoding="utf-8")
    return recipe


def test_the_started_server_is_stopped_after_ctrl_c(tmp_path, monkeypatch, fake_server, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "replay", interrupted)
    args = ["stream", "--recipe", str(fake_server), "--data", str(_traffic(tmp_path, 2)), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "--api-key", "k"]) == 130
    (server,) = FakeServer.made
    assert server.stopped and server.env == {"API_KEY": "k"} and server.log == str(tmp_path / "o" / "server.log")
    assert "interrupted" in capsys.readouterr().err


def test_a_server_that_does_not_start_is_exit_1(tmp_path, fake_server, capsys):
    FakeServer.fail_next = True
    args = ["stream", "--recipe", str(fake_server), "--data", str(_traffic(tmp_path, 2)), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 1
    assert FakeServer.made[0].stopped
    assert "the server did not start: the server exited with code 1: TLMConfigError: boom" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a real learning server
@pytest.mark.slow
def test_stream_against_a_learning_server_started_from_its_recipe(tiny_model, tmp_path):
    probe = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS[9:]]
    data_dir = write_dataset(tmp_path / "data", probe, name="probe")
    recipe = base_recipe(
        tiny_model,
        data_dir,
        tmp_path / "serve",
        tlm_mode="serve",
        tlm_chunk_size=3,
        tlm_selector="all",
        tlm_probe_dataset="probe",
        overwrite_output_dir=False,
    )
    recipe.pop("dataset")
    recipe.pop("num_train_epochs")
    recipe_path = tmp_path / "serve.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    data = _traffic(tmp_path, 9)
    out = tmp_path / "out"
    args = ["stream", "--recipe", str(recipe_path), "--data", str(data), "--clients", "2", "--out", str(out)]
    proc = subprocess.run(
        [str(VENV_BIN / "adapteval"), *args, "--settle", "60"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / stream.CURVE_JSON).read_text())
    records = [json.loads(line) for line in (out / stream.REQUESTS_FILE).read_text().splitlines()]
    assert len(records) == result["n_requests"] == 9
    assert all(r["status"] == 200 for r in records)
    assert all(isinstance(r["version"], int) and r["version"] >= 0 for r in records)
    by_version = {v["version"]: v for v in result["versions"]}
    assert by_version[0]["probe_answer_bpb"] is not None
    assert result["settle"]["settled"] is True
    assert max(by_version) >= 1 and result["server"]["status"]["windows"] == 3
    assert sum(v["answers"] for v in result["versions"]) == 9
    assert (out / stream.CURVE_PNG).is_file() and (out / stream.SERVER_LOG).is_file()
    assert "| v0 |" in proc.stdout and "| v0 |" in (out / stream.CURVE_MD).read_text()
    assert "adapteval stream: stopping the server" in proc.stdout
