"""An OpenAI-compatible chat server for tests (``from openai_server import OpenAIServer``).

``GET <url>/models`` lists one model; every ``POST`` (``<url>/chat/completions``) is answered with the same reply
and recorded in ``requests`` (its path, its ``Authorization`` header and its JSON body). The server runs in a
thread of the test process on a free port of 127.0.0.1 until ``close()`` (or the end of a ``with`` block).
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OpenAIServer:
    def __init__(self, reply: str, model: str = "teacher") -> None:
        self.reply, self.model = reply, model
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": server.model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                message = {"role": "assistant", "content": server.reply}
                self._send({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
