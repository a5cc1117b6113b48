"""A local stand-in for an OpenAI-compatible server: canned chat completions on 127.0.0.1.

`FakeServer(responder)` listens on port 0 (a free port) in a thread. The responder gets the
request JSON and the 1-based request count and returns a `Reply` (status, content, reasoning,
delay...). The server records every request body and the peak number in flight, so tests
can assert retries, concurrency and that timed-out requests were not re-sent.

Run as a script (`python bench_fake_server.py --port P --rules rules.json`) it serves the
`canned` responder with [[substring, content], ...] rules, for the serve end-to-end test.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the fake server answers to one request."""

    content: str | None = ""
    reasoning: str | None = None
    status: int = 200
    finish_reason: str = "stop"
    delay: float = 0.0
    raw: bytes | None = None
    headers: dict = field(default_factory=dict)


Responder = Callable[[dict, int], Reply]


def canned(rules: list[tuple[str, str]], default: str = "") -> Responder:
    """Reply with the content of the first rule whose key occurs in the last user message."""

    def respond(body: dict, n: int) -> Reply:
        user = body["messages"][-1]["content"]
        for key, content in rules:
            if key in user:
                return Reply(content)
        return Reply(default)

    return respond


class FakeServer:
    """Threaded HTTP server answering /v1/chat/completions and /health."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict] = []
        self.inflight = self.max_inflight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_GET(self):
                self._send(200 if self.path in ("/health", "/v1/models") else 404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append(body)
                    n = len(outer.requests)
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    rep = outer.responder(body, n)
                    time.sleep(rep.delay)
                    self._send(rep.status, rep.raw if rep.raw is not None else _payload(rep),
                               rep.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer._lock:
                        outer.inflight -= 1

            def _send(self, status: int, data: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _payload(rep: Reply) -> bytes:
    msg = {"role": "assistant", "content": rep.content}
    if rep.reasoning is not None:
        msg["reasoning_content"] = rep.reasoning
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": msg, "finish_reason": rep.finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20}}).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rules", required=True)
    args = ap.parse_args()
    rules = [tuple(r) for r in json.load(open(args.rules))]
    srv = FakeServer(canned(rules))
    srv.httpd.server_close()
    srv.httpd = ThreadingHTTPServer(("127.0.0.1", args.port), srv.httpd.RequestHandlerClass)
    srv.httpd.daemon_threads = True
    srv.httpd.serve_forever()


if __name__ == "__main__":
    main()
