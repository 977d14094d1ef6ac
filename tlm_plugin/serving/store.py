"""What a learning server keeps in ``output_dir``, and the rules that make a kill at any moment lose nothing.

- ``tlm_stream.jsonl``: every chat request received, one line each (``seq`` = its line number), written with one
  ``write`` before the answer is returned. The learner's only input. A torn last line (a kill during the write: that
  request was never answered) is cut off when the server starts.
- ``tlm_versions/v<N>/``: adapter version N, a normal LoRA adapter (``adapter_model.safetensors``,
  ``adapter_config.json``) plus the learner's state after the window that made it (``learner_state.pt``: optimizer,
  LR schedule, selector state with the running P0, RNG) and ``tlm_version.json`` (the window, its records, the probe
  metric). It is written under a hidden name and renamed in one step: a version is on disk whole or not at all.
  v0 is the adapter before any learning.
- ``tlm_versions/v<N>.rejected.json``: a window whose version the drift guard refused (its records and metric).
- ``tlm_serve_control.json``: what the operator decided (versions rolled back, the drift guard's pause lifted).

Everything else is derived from these: the current version is the newest version that was not rolled back; the
stream position the learner continues from is the end of the last window that has an outcome on disk (published or
rejected), so a prompt is learned once, and a window cut short by a kill is learned again from the current
version's saved state (so the result equals an uninterrupted run's).
"""

import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from typing import Any

from tlm_plugin.train import outputs


VERSION_FILE = "tlm_version.json"
STATE_FILE = "learner_state.pt"
_PUBLISHED = re.compile(r"^v(\d+)$")
_REJECTED = re.compile(r"^v(\d+)\.rejected\.json$")


def fingerprint(version: int) -> str:
    """The ``system_fingerprint`` of answers given by adapter version ``version``."""
    return f"tlm-v{version}"


class Store:
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.versions_dir = os.path.join(output_dir, outputs.VERSIONS_DIR)
        self.stream_path = os.path.join(output_dir, outputs.STREAM_FILE)
        self.control_path = os.path.join(output_dir, outputs.SERVE_CONTROL_FILE)
        self.status_path = os.path.join(output_dir, outputs.LEARNER_STATUS_FILE)
        self.scores_path = os.path.join(output_dir, outputs.SCORES_FILE)
        self._stream_lock = threading.Lock()
        self._stream_fd: int | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self.received = 0

    # ------------------------------------------------------------------ the stream
    def open_stream(self) -> int:
        """Open the stream for appending (cutting a torn last line); returns the number of complete lines."""
        os.makedirs(self.output_dir, exist_ok=True)
        if os.path.isfile(self.stream_path):
            with open(self.stream_path, "rb") as f:
                data = f.read()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                with open(self.stream_path, "r+b") as f:
                    f.truncate(complete)
            self.received = data[:complete].count(b"\n")
        self._stream_fd = os.open(self.stream_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self.received

    def append(self, record: dict[str, Any]) -> int:
        """Append one request (one ``write`` call: the line is in the file, whole, when this returns); its seq."""
        with self._stream_lock:
            seq = self.received
            line = outputs.jsonl_line({"seq": seq, **record}).encode("utf-8")
            written = os.write(self._stream_fd, line)
            if written != len(line):  # a short write (disk full): cut it back, the request fails
                os.ftruncate(self._stream_fd, os.lseek(self._stream_fd, 0, os.SEEK_END) - written)
                raise OSError(f"could not append to {self.stream_path} (disk full?)")
            self.received += 1
            return seq

    def close_stream(self) -> None:
        if self._stream_fd is not None:
            os.close(self._stream_fd)
            self._stream_fd = None

    def read_stream(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Complete lines from byte ``offset``: (records, the offset after the last complete line)."""
        if not os.path.isfile(self.stream_path):
            return [], offset
        with open(self.stream_path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return records, offset + end

    # ------------------------------------------------------------------ versions
    def version_dir(self, n: int) -> str:
        return os.path.join(self.versions_dir, f"v{n}")

    def published(self) -> list[int]:
        """Numbers of the complete versions on disk, ascending."""
        if not os.path.isdir(self.versions_dir):
            return []
        found = []
        for name in os.listdir(self.versions_dir):
            m = _PUBLISHED.match(name)
            if m and os.path.isfile(os.path.join(self.versions_dir, name, VERSION_FILE)):
                found.append(int(m.group(1)))
        return sorted(found)

    def rejected(self) -> list[int]:
        if not os.path.isdir(self.versions_dir):
            return []
        return sorted(int(m.group(1)) for m in map(_REJECTED.match, os.listdir(self.versions_dir)) if m)

    def meta(self, n: int) -> dict[str, Any]:
        return self._read_once(os.path.join(self.version_dir(n), VERSION_FILE))

    def rejected_meta(self, n: int) -> dict[str, Any]:
        return self._read_once(os.path.join(self.versions_dir, f"v{n}.rejected.json"))

    def _read_once(self, path: str) -> dict[str, Any]:
        """A version's record: written once, never changed, so read from disk once."""
        if path not in self._records:
            with open(path, encoding="utf-8") as f:
                self._records[path] = json.load(f)
        return self._records[path]

    def remove_partial(self) -> None:
        """Versions a kill left half-written (hidden ``.v<N>.partial`` folders)."""
        if os.path.isdir(self.versions_dir):
            for name in os.listdir(self.versions_dir):
                if name.startswith(".") and name.endswith(".partial"):
                    shutil.rmtree(os.path.join(self.versions_dir, name), ignore_errors=True)

    def publish(self, n: int, write: Callable[[str], None], meta: dict[str, Any]) -> str:
        """Write version ``n``: ``write(folder)`` fills a hidden folder, the metadata goes last, one rename makes it
        visible. Returns its folder."""
        os.makedirs(self.versions_dir, exist_ok=True)
        tmp = os.path.join(self.versions_dir, f".v{n}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        outputs.atomic_write(os.path.join(tmp, VERSION_FILE), json.dumps(outputs.clean(meta), indent=1) + "\n")
        for name in os.listdir(tmp):  # every file on disk before the rename makes the version visible
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        final = self.version_dir(n)
        os.rename(tmp, final)
        _fsync_dir(self.versions_dir)
        return final

    def reject(self, n: int, meta: dict[str, Any]) -> None:
        os.makedirs(self.versions_dir, exist_ok=True)
        path = os.path.join(self.versions_dir, f"v{n}.rejected.json")
        outputs.atomic_write(path, json.dumps(outputs.clean(meta), indent=1) + "\n")

    def outcomes(self) -> list[dict[str, Any]]:
        """Every window's outcome on disk (published versions after v0, rejected ones), by version number."""
        found = [{**self.meta(n), "status": "published"} for n in self.published() if n > 0]
        found += [{**self.rejected_meta(n), "status": "rejected"} for n in self.rejected()]
        return sorted(found, key=lambda m: m["version"])

    # ------------------------------------------------------------------ control (the server writes it)
    def control(self) -> dict[str, Any]:
        if not os.path.isfile(self.control_path):
            return {"rolled_back": [], "guard_reset_after": -1, "rollbacks": []}
        with open(self.control_path, encoding="utf-8") as f:
            return json.load(f)

    def write_control(self, control: dict[str, Any]) -> None:
        outputs.atomic_write(self.control_path, json.dumps(control, indent=1) + "\n")

    def current(self) -> int | None:
        """The version answers use: the newest published one that was not rolled back (None before v0)."""
        rolled_back = set(self.control()["rolled_back"])
        candidates = [n for n in self.published() if n not in rolled_back]
        return candidates[-1] if candidates else None

    def next_number(self) -> int:
        used = self.published() + self.rejected()
        return (max(used) + 1) if used else 0

    def rejections_in_a_row(self) -> int:
        """Rejected versions after the newest published one (and after the last guard reset)."""
        control = self.control()
        published = [n for n in self.published() if n not in set(control["rolled_back"])]
        after = max([control.get("guard_reset_after", -1), *published]) if published else -1
        return sum(1 for n in self.rejected() if n > after)

    def learner_status(self) -> dict[str, Any]:
        if not os.path.isfile(self.status_path):
            return {}
        try:
            with open(self.status_path, encoding="utf-8") as f:
                return json.load(f)
        except ValueError:
            return {}

    def write_learner_status(self, status: dict[str, Any]) -> None:
        outputs.atomic_write(self.status_path, json.dumps(outputs.clean(status)) + "\n")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
