"""Start a learning server as a user does (``llamafactory-cli api recipe.yaml``) and talk to it: for ``adapteval
stream``, the serving benchmark and the tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``llamafactory-cli api`` process on 127.0.0.1:``port`` (its own process group, so a kill takes its
    learner too)."""

    recipe: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, args: list[str] | None = None) -> "ServerProcess":
        cli = Path(sys.executable).with_name("llamafactory-cli")
        env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(self.port), **self.env}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(cli), "api", self.recipe, *(args or [])],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.log:
            out.close()
        return self

    def wait_ready(self, timeout: float = 600.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: {self.tail()}")
            try:
                get(self.url + "/health", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise TimeoutError(f"the server did not answer within {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 4000) -> str:
        if not self.log or not os.path.isfile(self.log):
            return ""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # uvicorn shuts down, the server stops its learner
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the server and its learner at once (a crash, ``kill -9``)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def request(url: str, body: dict | None = None, key: str | None = None, timeout: float = 600.0, method=None):
    """(status, headers, parsed JSON body) of one HTTP call; 4xx / 5xx are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), _parse(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), _parse(err.read())


def get(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return _parse(resp.read())


def chat(base: str, messages: list[dict], key: str | None = None, model: str = "gpt-3.5-turbo", **extra):
    """One chat completion: (status, parsed body)."""
    code, _, body = request(f"{base}/v1/chat/completions", {"model": model, "messages": messages, **extra}, key)
    return code, body


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")
