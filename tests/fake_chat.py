"""A loopback OpenAI-compatible chat endpoint for tests of the VLM captioner and the MLLM judge."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


class FakeChatEndpoint:
    """Records each POST ({path, auth, json}); subclasses say what to answer in `reply(auth)`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                fake.requests.append({"path": self.path, "auth": auth, "json": data})
                status, body = fake.reply(str(auth))
                reply = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reply(self, auth: str) -> tuple[int, str]:
        raise NotImplementedError


@contextmanager
def serving(fake: FakeChatEndpoint, monkeypatch) -> Iterator[FakeChatEndpoint]:
    """Run `fake` on a thread with proxies cleared (so urllib talks to 127.0.0.1 directly)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
