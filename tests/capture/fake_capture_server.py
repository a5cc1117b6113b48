"""A stand-in for `sglang.launch_server` with the capture flags, for server_capture tests:
/health answers 200, /generate records the input ids; once SGLANG_OSCAR_CAPTURE_TOKENS tokens
arrived, every rank writes rank<r>/pass1.pt (a marker) and a spilled-K/V file, as the plugin
does. Usage: python fake_capture_server.py TP --port P"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

TP = int(sys.argv[1])
PORT = int(sys.argv[sys.argv.index("--port") + 1])
OUT = Path(os.environ["SGLANG_OSCAR_CAPTURE_DIR"])
BUDGET = int(os.environ["SGLANG_OSCAR_CAPTURE_TOKENS"])
seen = [0]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":  # a real server generates a token here: must not be used
            (OUT / "health_called").write_text("yes")
        self._reply(200 if self.path in ("/health", "/get_model_info") else 404, {})

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = req["input_ids"]
        with open(OUT / "received.jsonl", "a") as f:
            f.write(json.dumps({"ids": ids, "params": req["sampling_params"]}) + "\n")
        seen[0] += len(ids)
        if seen[0] >= BUDGET:
            for r in range(TP):
                (OUT / f"rank{r}" / "kv").mkdir(parents=True, exist_ok=True)
                (OUT / f"rank{r}" / "kv" / "0.pt").write_text("spill")
                (OUT / f"rank{r}" / "pass1.pt").write_text("pass1")
        self._reply(200, {"text": "x"})


HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
