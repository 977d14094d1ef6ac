"""``adapteval stream``: replay a dataset as traffic to a learning server and measure its learning curve.

The rows of a data file (alpaca: instruction, input, output; or chat rows with ``messages``) are sent in order, as
``clients`` concurrent clients, to a ``tlm_mode: serve`` server: one started here from ``--recipe`` (and stopped at
the end), or a running one at ``--url``. Every answer names the adapter version that gave it
(``system_fingerprint: "tlm-v<N>"``). The answers are scored against the references with AdaptEval's metrics, per
version and in bins of consecutive requests, beside each version's probe answer bits per byte from ``/tlm/status``.

Files in ``out``: ``stream_requests.jsonl`` (one record per request; appended as answers come, rewritten in row order
with each answer's scores at the end), ``stream_curve.json``, ``stream_curve.md``, ``stream_curve.png`` and, when the
server was started here, ``server.log``.
"""

import dataclasses
import hashlib
import http.client
import importlib.util
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adapteval.builder import user_turn
from adapteval.errors import ServerError
from adapteval.metrics import METRIC_GROUPS, corpus_bleu, exact_match_per_sample, rouge_per_sample
from adapteval.records import write_json
from adapteval.registry import DATASETS
from tlm_plugin.hparams import TLMArguments
from tlm_plugin.serving.launch import ServerProcess, chat, free_port, request
from tlm_plugin.train.outputs import atomic_write, jsonl_line


FORMAT = "adapteval-stream/1"
REQUESTS_FILE = "stream_requests.jsonl"
CURVE_JSON = "stream_curve.json"
CURVE_MD = "stream_curve.md"
CURVE_PNG = "stream_curve.png"
SERVER_LOG = "server.log"

DEFAULT_BINS = 10  # without --bin, the requests fall into at most this many bins
DEFAULT_START_TIMEOUT_S = 3600.0  # a first start loads the model and measures v0 on the probe set
POLL_S = 0.5  # how often --settle looks at /tlm/status
TEXT_METRICS = METRIC_GROUPS["rougeLsum"]  # rougeLsum, rouge1, rouge2, rougeL, bleu
TABLE_COLUMNS = (("rougeLsum", "ROUGE-Lsum"), ("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("em", "EM"))
FINGERPRINT = re.compile(r"^tlm-v(\d+)$")
CHAT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


# ------------------------------------------------------------------------------------------------------ the data
@dataclass(frozen=True)
class Row:
    """One prompt of the data file: the messages sent and the reference answer."""

    index: int
    messages: list[dict[str, str]]
    reference: str


def read_rows(path: str | Path, limit: int | None = None, skip: int = 0) -> list[Row]:
    """The rows of a JSON list or JSON Lines file (``ValueError`` naming the file and row when one is unusable).

    An alpaca row (``instruction``, optional ``input``, ``output``; ``system`` and ``history`` as LLaMA-Factory reads
    them) becomes the user turn LLaMA-Factory builds from it; a chat row (``messages`` with role/content, or
    ``conversations`` with from/value) is sent up to its last message, an assistant message, which is the reference.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the data file: {err}") from err
    raw = _parse_rows(path, text)
    if not raw:
        raise ValueError(f"{path}: the data file has no rows")
    if skip >= len(raw):
        raise ValueError(f"{path}: --skip {skip} leaves none of its {len(raw)} rows")
    end = len(raw) if limit is None else skip + limit
    return [to_row(path, index, raw[index]) for index in range(skip, min(end, len(raw)))]


def _parse_rows(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except ValueError as err:
        whole = err
    else:
        if isinstance(data, list):
            return data
        if isinstance(data, dict):  # JSON Lines of one row
            return [data]
        raise ValueError(f"{path}: expected a JSON list of rows or JSON Lines, got a JSON {type(data).__name__}")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if not rows:
                raise ValueError(f"{path}: neither JSON nor JSON Lines ({whole})") from None
            raise ValueError(f"{path}: line {number} is not JSON ({err})") from None
    return rows


def to_row(path: Path, index: int, raw: Any) -> Row:
    where = f"{path}: row {index} (counting from 0)"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is a JSON {type(raw).__name__}, not an object")
    if "messages" in raw or "conversations" in raw:
        return _chat_row(where, index, raw.get("messages", raw.get("conversations")))
    instruction, output, input_text = raw.get("instruction"), raw.get("output"), raw.get("input") or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where} has no instruction (alpaca rows: instruction, input, output; or messages)")
    if not isinstance(input_text, str):
        raise ValueError(f"{where}: input is a {type(input_text).__name__}, not a string")
    if not isinstance(output, str) or not output.strip():
        raise ValueError(f"{where} has no output (the reference answer)")
    messages = []
    system = raw.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    history = raw.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
    ):
        raise ValueError(f"{where}: history must be a list of [user, assistant] string pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": user_turn({"instruction": instruction, "input": input_text})})
    return Row(index, messages, output)


def _chat_row(where: str, index: int, turns: Any) -> Row:
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError(f"{where}: messages must be a list of at least a user and an assistant message")
    messages = []
    for turn in turns:
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: every message needs a role ({', '.join(CHAT_ROLES)}) and a string content")
        messages.append({"role": CHAT_ROLES[role], "content": content})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise ValueError(f"{where}: the last message must be the assistant's reference answer")
    if messages[-2]["role"] != "user":
        raise ValueError(f"{where}: the message before the reference answer must be the user's")
    return Row(index, messages[:-1], messages[-1]["content"])


def answer_format_of(path: Path) -> tuple[str | None, str | None]:
    """(dataset, answer format) when the file is an exact-match AdaptEval dataset named as ``adapteval build`` names
    its files (``gsm8k.json``), else (None, None): such answers are scored by exact match too."""
    module = DATASETS.get(path.stem)
    if module is None or module.SPEC.answer_format is None:
        return None, None
    return module.SPEC.name, module.SPEC.answer_format


# ------------------------------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class Target:
    url: str  # http://host:port, without /v1
    key: str | None
    model: str


def base_url(url: str) -> str:
    """``http://host:port`` of a server given as that, with a trailing slash, or as its ``/v1`` base."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise ValueError(f"--url {url!r}: expected http://host:port (or http://host:port/v1)")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def connect(url: str, key: str | None) -> Target:
    """The server at ``url`` and the model it serves (``GET /v1/models``)."""
    try:
        code, _, body = request(f"{url}/v1/models", key=key, timeout=30)
    except (OSError, http.client.HTTPException) as err:
        raise ValueError(f"cannot reach the server at {url}: {err}") from err
    if code == 401:
        raise ValueError(f"the server at {url} refused the API key (401): pass --api-key (or set API_KEY)")
    models = body.get("data") if code == 200 and isinstance(body, dict) else None
    if not models or not isinstance(models[0], dict) or not isinstance(models[0].get("id"), str):
        raise ValueError(f"{url}/v1/models answered {code} without a model list: is it an OpenAI-compatible server?")
    return Target(url, key, models[0]["id"])


def tlm_status(target: Target) -> dict[str, Any] | None:
    """``GET /tlm/status`` of a learning server; None where the server is not one or does not answer."""
    try:
        code, _, body = request(f"{target.url}/tlm/status", key=target.key, timeout=30)
    except (OSError, http.client.HTTPException):
        return None
    return body if code == 200 and isinstance(body, dict) and "current_version" in body else None


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such recipe") from None
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the recipe: {err}") from err
    if not isinstance(recipe, dict) or recipe.get("stage") != "tlm" or recipe.get("tlm_mode") != "serve":
        raise ValueError(f"{path}: not a learning server's recipe (stage: tlm with tlm_mode: serve)")
    return recipe


def window_settings(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe's window: ``tlm_chunk_size`` and ``tlm_serve_window_s`` (their defaults where it sets none)."""
    if recipe is None:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(TLMArguments)}
    return {key: recipe.get(key, defaults[key]) for key in ("tlm_chunk_size", "tlm_serve_window_s")}


# ------------------------------------------------------------------------------------------------- the replay
def parse_version(fingerprint: Any) -> int | None:
    match = FINGERPRINT.match(fingerprint) if isinstance(fingerprint, str) else None
    return int(match.group(1)) if match else None


def ask(target: Target, row: Row, client: int, max_tokens: int | None) -> dict[str, Any]:
    """Send one row as a greedy chat completion; the request's record (a failure is recorded, not raised)."""
    extra: dict[str, Any] = {"do_sample": False, "temperature": 0.0}
    if max_tokens is not None:
        extra["max_tokens"] = max_tokens
    sent = time.time()
    start = time.perf_counter()
    code, body, error = None, None, None
    try:
        code, body = chat(target.url, row.messages, key=target.key, model=target.model, **extra)
    except Exception as err:  # a reset connection, a timeout, a torn response: recorded, the replay goes on
        error = f"{type(err).__name__}: {err}"
    latency = time.perf_counter() - start
    answer, fingerprint = None, None
    if code == 200 and isinstance(body, dict):
        fingerprint = body.get("system_fingerprint")
        try:
            answer = body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            error = "the answer has no choices[0].message.content"
        if answer is not None and not isinstance(answer, str):
            answer, error = None, "the answer's content is not a string"
    elif code is not None:
        detail = body.get("detail") if isinstance(body, dict) else body
        error = f"HTTP {code}: {str(detail)[:300]}"
    return {
        "row": row.index,
        "client": client,
        "sent": sent,
        "latency_s": latency,
        "status": code,
        "ok": code == 200 and error is None,
        "version": parse_version(fingerprint),
        "system_fingerprint": fingerprint,
        "answer": answer,
        "reference": row.reference,
        "error": error,
    }


def replay(
    target: Target,
    rows: list[Row],
    clients: int,
    max_tokens: int | None,
    requests_path: Path,
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Send the rows in order from ``clients`` threads (each takes the next row when its answer is in); the records
    in row order, each appended to ``requests_path`` as it comes."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()
    queue = iter(rows)
    requests_path.write_text("", encoding="utf-8")

    def client(number: int) -> None:
        while not stop.is_set():
            with lock:
                row = next(queue, None)
            if row is None:
                return
            record = ask(target, row, number, max_tokens)
            with lock:
                records.append(record)
                with requests_path.open("a", encoding="utf-8") as f:
                    f.write(jsonl_line(record))
                if progress is not None:
                    progress(len(records), len(rows), record)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()  # the clients send nothing more; what is answered is in requests_path
        raise
    return sorted(records, key=lambda r: r["row"])


def settle(target: Target, seconds: float, window: dict[str, Any] | None) -> dict[str, Any]:
    """Wait up to ``seconds`` for the learner to learn what it has received: it has read every request, is waiting
    (or paused) and nothing is pending, or (with the recipe's window known) what is pending cannot fill a window."""
    start = time.monotonic()
    while True:
        status = tlm_status(target)
        waited = round(time.monotonic() - start, 3)
        if status is None:
            return {"settled": False, "why": "the server does not answer GET /tlm/status", "waited_s": waited}
        done, why = _settled(status, window)
        if done is not None:
            return {"settled": done, "why": why, "waited_s": waited}
        if waited >= seconds:
            return {"settled": False, "why": f"{why} after {seconds:g} s", "waited_s": waited}
        time.sleep(POLL_S)


def _settled(status: dict[str, Any], window: dict[str, Any] | None) -> tuple[bool | None, str]:
    """(True: nothing more will be learned without more traffic, False: it never will, None: not yet; why)."""
    if not status.get("learning"):
        return True, "the server does not learn (tlm_learn: false)"
    learner = status.get("learner") or {}
    state, pending = str(learner.get("state") or ""), int(learner.get("pending") or 0)
    if state.startswith("failed"):
        return False, f"the learner failed: {learner.get('error')}"
    if state == "paused":
        return True, f"learning is paused: {learner.get('message')}"
    read_all = int(learner.get("next_seq") or 0) + pending >= int(status.get("received") or 0)
    if state == "waiting" and read_all:
        if pending == 0:
            return True, "the learner has learned every request"
        if window is not None and window["tlm_serve_window_s"] is None and pending < window["tlm_chunk_size"]:
            return True, f"{pending} requests wait for a full window of {window['tlm_chunk_size']}"
    return None, f"the learner is {state or 'starting'} with {pending} requests pending"


# -------------------------------------------------------------------------------------------------- the curve
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between the closest ranks (numpy's default); None of no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_answers(records: list[dict[str, Any]], answer_format: str | None = None) -> list[dict[str, float]]:
    """Per answered record: ROUGE-Lsum, ROUGE-1/2/L (AdaptEval's settings) and, with ``answer_format``, exact
    match; the records that were not answered get an empty dict."""
    answered = [r for r in records if r["ok"]]
    predictions = [r["answer"] or "" for r in answered]
    references = [r["reference"] for r in answered]
    per = rouge_per_sample(predictions, references) if answered else {}
    em = exact_match_per_sample(predictions, references, answer_format) if answer_format and answered else None
    scored = iter(range(len(answered)))
    out = []
    for record in records:
        if not record["ok"]:
            out.append({})
            continue
        k = next(scored)
        values = {name: per[name][k] for name in TEXT_METRICS if name != "bleu"}
        if em is not None:
            values["em"] = em[k]
        out.append(values)
    return out


def group_scores(records: list[dict[str, Any]], scores: list[dict[str, float]], bleu: bool) -> dict[str, Any]:
    """Means of the per-answer scores of the answered ``records`` and their corpus BLEU (None without answers, or
    BLEU without sacrebleu)."""
    kept = [(r, s) for r, s in zip(records, scores) if r["ok"]]
    names = [n for n in TEXT_METRICS if n != "bleu"] + (["em"] if kept and "em" in kept[0][1] else [])
    out: dict[str, Any] = {name: _mean([s[name] for _, s in kept]) for name in names}
    out["bleu"] = (
        corpus_bleu([r["answer"] or "" for r, _ in kept], [r["reference"] for r, _ in kept])
        if (kept and bleu)
        else None
    )
    return out


def curve(
    records: list[dict[str, Any]],
    probe: dict[int, float],
    bin_rows: int | None = None,
    answer_format: str | None = None,
    bleu: bool = True,
    states: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The learning curve of a replay: per adapter version (every version answering, with a probe value or a state:
    published, rolled back, rejected) its answers, their scores and its probe answer bits per byte; over time, the
    requests in the order sent in bins of ``bin_rows`` (default: at most ``DEFAULT_BINS`` bins) with their scores
    and the versions answering; latency."""
    states = states or {}
    scores = score_answers(records, answer_format)
    metric = "em" if answer_format else "rougeLsum"
    answered = [r for r in records if r["ok"]]
    numbers = sorted({r["version"] for r in answered if r["version"] is not None} | set(probe) | set(states))
    keys: list[int | None] = [*numbers, *([None] if any(r["version"] is None for r in answered) else [])]
    versions = []
    for key in keys:
        mine = [(r, s) for r, s in zip(records, scores) if r["ok"] and r["version"] == key]
        versions.append(
            {
                "version": key,
                "label": "no fingerprint" if key is None else f"v{key}",
                "state": states.get(key) if key is not None else None,
                "answers": len(mine),
                "rows": [r["row"] for r, _ in mine],
                "probe_answer_bpb": probe.get(key) if key is not None else None,
                "scores": group_scores([r for r, _ in mine], [s for _, s in mine], bleu),
                "latency_s_p50": percentile([r["latency_s"] for r, _ in mine], 50),
            }
        )
    order = sorted(range(len(records)), key=lambda k: (records[k]["sent"], records[k]["row"]))
    size = bin_rows or max(1, math.ceil(len(records) / DEFAULT_BINS))
    bins = []
    for number, start in enumerate(range(0, len(order), size)):
        part = order[start : start + size]
        mine = [records[k] for k in part]
        group = group_scores(mine, [scores[k] for k in part], bleu)
        bins.append(
            {
                "bin": number,
                "start": start,
                "end": start + len(part),
                "rows": [r["row"] for r in mine],
                "requests": len(mine),
                "answers": sum(1 for r in mine if r["ok"]),
                "failed": sum(1 for r in mine if not r["ok"]),
                "score": group[metric],
                "scores": group,
                "versions": sorted({r["version"] for r in mine if r["ok"] and r["version"] is not None}),
            }
        )
    latencies = [r["latency_s"] for r in answered]
    return {
        "metric": metric,
        "n_requests": len(records),
        "n_answers": len(answered),
        "n_failed": len(records) - len(answered),
        "latency_s": {
            "n": len(latencies),
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "mean": _mean(latencies),
            "max": max(latencies) if latencies else None,
        },
        "versions": versions,
        "bin_rows": size,
        "bins": bins,
        "per_request_scores": scores,
    }


def version_states(status: dict[str, Any] | None) -> dict[int, str]:
    """``{version: "published" | "rolled back" | "rejected"}`` from ``/tlm/status``."""
    status = status or {}
    states = {n: "published" for n in status.get("published") or []}
    states.update({n: "rolled back" for n in status.get("rolled_back") or []})
    states.update({r["version"]: "rejected" for r in status.get("rejected") or [] if isinstance(r, dict)})
    return {n: state for n, state in states.items() if isinstance(n, int)}


def probe_values(status: dict[str, Any] | None) -> dict[int, float]:
    """``{version: probe answer bits per byte}`` from ``/tlm/status`` (``"probe_answer_bpb": {"v0": x, ...}``)."""
    found = {}
    for label, value in ((status or {}).get("probe_answer_bpb") or {}).items():
        number = parse_version(f"tlm-{label}")
        if number is not None and isinstance(value, int | float):
            found[number] = float(value)
    return found


# ------------------------------------------------------------------------------------------------- the outputs
def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    columns = [(key, title) for key, title in TABLE_COLUMNS if key != "em" or result["metric"] == "em"]
    latency = result["latency_s"]
    server = result["server"]
    lines = [
        f"# adapteval stream: {Path(result['data_file']).name}",
        "",
        f"{result['n_requests']} requests ({result['n_failed']} failed) from {result['settings']['clients']} "
        f"client(s) in {result['wall_s']:.1f} s to {server['url']} (model {server['model']}); latency p50 "
        f"{_fmt(latency['p50'], 3)} s, p95 {_fmt(latency['p95'], 3)} s.",
    ]
    status = server.get("status")
    if status is not None:
        rejected = ", ".join(f"v{r['version']}" for r in status.get("rejected") or []) or "none"
        lines.append(
            f"Learner: {status.get('windows', 0)} windows, {status.get('learned', 0)} prompts learned, "
            f"published {', '.join(f'v{n}' for n in status.get('published') or []) or 'none'}, rejected {rejected}."
        )
    if result.get("settle") is not None:
        s = result["settle"]
        lines.append(f"Settle: {'done' if s['settled'] else 'not done'} after {s['waited_s']:.1f} s ({s['why']}).")
    lines += [
        "",
        "Per adapter version: the answers it gave, scored against the references, and its probe answer bits per "
        "byte (lower is better).",
        "",
        "| version | answers | probe answer bpb | " + " | ".join(title for _, title in columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for v in result["versions"]:
        cells = " | ".join(_fmt(v["scores"].get(key)) for key, _ in columns)
        label = v["label"] + (f" ({v['state']})" if v["state"] not in (None, "published") else "")
        lines.append(f"| {label} | {v['answers']} | {_fmt(v['probe_answer_bpb'])} | {cells} |")
    metric = dict(TABLE_COLUMNS).get(result["metric"], result["metric"])
    lines += [
        "",
        f"Over time: the requests in the order sent, {result['bin_rows']} a bin.",
        "",
        f"| requests | answers | {metric} | versions |",
        "|---|---:|---:|---|",
    ]
    for b in result["bins"]:
        versions = ", ".join(f"v{n}" for n in b["versions"]) or "-"
        span = f"{b['start']}" if b["end"] - b["start"] == 1 else f"{b['start']}-{b['end'] - 1}"
        lines.append(f"| {span} | {b['answers']} | {_fmt(b['score'])} | {versions} |")
    return "\n".join(lines) + "\n"


def plot_curve(result: dict[str, Any], path: Path) -> Path:
    """Two panels: the probe answer bits per byte per version; the answers' headline metric over the time bins."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    probed = [v for v in result["versions"] if v["probe_answer_bpb"] is not None]
    if probed:
        left.plot([v["version"] for v in probed], [v["probe_answer_bpb"] for v in probed], marker="o")
        left.set_xticks([v["version"] for v in probed])
        left.set_xticklabels([v["label"] for v in probed], fontsize=8)
    else:
        left.text(0.5, 0.5, "no probe values (tlm_probe_dataset)", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("adapter version")
    left.set_ylabel("bits per byte")
    left.set_title("probe answers, bits per byte (lower is better)", fontsize=10)
    metric = dict(TABLE_COLUMNS).get(result["metric"], result["metric"])
    points = [b for b in result["bins"] if b["score"] is not None]
    xs = [(b["start"] + b["end"] - 1) / 2 for b in points]
    right.plot(xs, [b["score"] for b in points], marker="o")
    for x, b in zip(xs, points):
        label = ",".join(f"v{n}" for n in b["versions"])
        right.annotate(label, (x, b["score"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    right.set_xlabel("request (in the order sent)")
    right.set_ylabel(metric)
    right.set_ylim(0, min(1.05, max([0.1, *(b["score"] * 1.2 for b in points)])))  # the metrics lie in [0, 1]
    right.set_title(f"answers' {metric} over time ({result['bin_rows']} a bin)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def write_outputs(out: Path, result: dict[str, Any], records: list[dict[str, Any]], scores: list[dict]) -> dict:
    """stream_requests.jsonl (row order, with scores), stream_curve.json / .md / .png; the paths written (the PNG
    left out, with a note in ``result["notes"]``, when matplotlib is missing)."""
    paths = {"requests": out / REQUESTS_FILE, "json": out / CURVE_JSON, "md": out / CURVE_MD}
    atomic_write(paths["requests"], "".join(jsonl_line({**r, "scores": s}) for r, s in zip(records, scores)))
    if importlib.util.find_spec("matplotlib") is None:
        result["notes"].append("matplotlib is not installed: no stream_curve.png (pip install matplotlib)")
    else:
        paths["png"] = plot_curve(result, out / CURVE_PNG)
    write_json(paths["json"], result)
    atomic_write(paths["md"], markdown(result))
    return paths


# ---------------------------------------------------------------------------------------------------- the run
def run(
    data: str | Path,
    out: str | Path,
    recipe: str | Path | None = None,
    url: str | None = None,
    api_key: str | None = None,
    clients: int = 1,
    limit: int | None = None,
    skip: int = 0,
    max_tokens: int | None = None,
    settle_s: float = 0.0,
    bin_rows: int | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Replay ``data`` against the server (started from ``recipe`` unless ``url`` is given), settle, and write the
    curve into ``out``. Returns (the stream_curve.json document, the paths written). ``ValueError`` for what the user
    can fix (data, recipe, URL, key), ``ServerError`` when the server started here does not come up."""
    checks = (("clients", clients, 1), ("limit", limit, 1), ("skip", skip, 0), ("max-tokens", max_tokens, 1))
    for name, value, low in checks:
        if value is not None and value < low:
            raise ValueError(f"--{name} must be at least {low}")
    if bin_rows is not None and bin_rows < 1:
        raise ValueError("--bin must be at least 1")
    if settle_s < 0:
        raise ValueError("--settle must be 0 or more seconds")
    if url is None and recipe is None:
        raise ValueError("give --recipe (a tlm_mode: serve recipe to start a server from) or --url (a running one)")
    data = Path(data)
    rows = read_rows(data, limit, skip)
    dataset, answer_format = answer_format_of(data)
    recipe_doc = read_recipe(recipe) if recipe is not None else None
    target_url = base_url(url) if url is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    bleu = importlib.util.find_spec("sacrebleu") is not None
    if not bleu:
        notes.append("sacrebleu is not installed: no BLEU (pip install sacrebleu)")

    server = None
    try:
        if target_url is None:
            server = ServerProcess(
                str(recipe), free_port(), env={"API_KEY": api_key} if api_key else {}, log=str(out / SERVER_LOG)
            )
            log(f"adapteval stream: starting the server from {recipe} (log: {out / SERVER_LOG})")
            try:
                server.start().wait_ready(start_timeout)
            except (RuntimeError, TimeoutError) as err:
                raise ServerError(f"the server did not start: {err}") from err
            target_url = server.url
        target = connect(target_url, api_key)
        first = tlm_status(target)
        log(
            f"adapteval stream: {len(rows)} requests from {clients} client(s) to {target.url} (model {target.model}"
            + (f", answering with v{first['current_version']})" if first else ", not a learning server)")
        )
        every = max(1, len(rows) // 10)

        def progress(done: int, total: int, record: dict) -> None:
            if record["ok"] and done % every and done != total:
                return
            what = "?" if record["version"] is None else f"v{record['version']}"
            outcome = f"{what} {record['latency_s']:.2f}s" if record["ok"] else f"failed: {record['error']}"
            log(f"[{done}/{total}] row {record['row']} {outcome}")

        start = time.perf_counter()
        records = replay(target, rows, clients, max_tokens, out / REQUESTS_FILE, progress)
        wall = time.perf_counter() - start
        settled = None
        if settle_s > 0:
            log(f"adapteval stream: waiting up to {settle_s:g} s for the learner to learn what is pending")
            settled = settle(target, settle_s, window_settings(recipe_doc))
            log(f"adapteval stream: {'settled' if settled['settled'] else 'not settled'}: {settled['why']}")
        status = tlm_status(target)
    finally:
        if server is not None:
            log("adapteval stream: stopping the server")
            server.stop()
    if status is None:
        notes.append("the server has no /tlm/status: no probe values, no versions")
    found = curve(records, probe_values(status), bin_rows, answer_format, bleu, version_states(status))
    scores = found.pop("per_request_scores")
    result = {
        "format": FORMAT,
        "data_file": str(data),
        "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
        "dataset": dataset,
        "settings": {
            "clients": clients,
            "limit": limit,
            "skip": skip,
            "max_tokens": max_tokens,
            "settle_s": settle_s,
            "bin_rows": bin_rows,
            "recipe": str(recipe) if recipe is not None else None,
        },
        "server": {
            "url": target.url,
            "started_here": server is not None,
            "model": target.model,
            "log": str(out / SERVER_LOG) if server is not None else None,
            "status": status,
        },
        "wall_s": wall,
        "settle": settled,
        **found,
        "requests_file": REQUESTS_FILE,
        "notes": notes,
    }
    return result, write_outputs(out, result, records, scores)
