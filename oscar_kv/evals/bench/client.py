"""Minimal OpenAI-compatible chat client (stdlib `http.client`, no dependency).

Retry policy, built so that a request the server may still be generating is never re-sent:
- failures *before the request was accepted* (connect refused/timeout, DNS, a broken pipe
  while sending) are retried with exponential backoff and jitter;
- HTTP 429/500/502/503 (the server answered, so nothing is in flight) are retried likewise,
  honouring `Retry-After`;
- a read timeout or a dropped connection *after* the request was sent is not re-sent unless
  `resend_after_send=True` (the server may still be generating it; re-sending doubles the
  load and was a failure mode of the reference, spec §11.1.9). 504 is treated the same way;
- HTTP 400 is final and scored as no answer (prompt + max_tokens over the context, say);
- an empty answer with `finish_reason == "stop"` is re-asked up to `empty_retries` times
  (the generation is finished, so nothing is duplicated); truncation (`length`) is a result.

Timeouts: `connect_timeout` for the TCP connect, `read_timeout` (default 7200 s, sized for
32K-token generations) for each socket read while waiting for the answer.
Requests never raise: the returned `Completion` carries `error` instead.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

RETRY_STATUSES = frozenset({429, 500, 502, 503})


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. GPQA defaults follow the reference sampler (spec §9.1)."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 32768
    seed: int | None = None

    def to_body(self) -> dict:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        if self.top_k is not None and self.top_k <= 0:
            body.pop("top_k")
        return body


@dataclass(frozen=True)
class ClientConfig:
    """Where to send requests and how patiently."""

    base_url: str
    model: str
    api_key: str | None = None
    connect_timeout: float = 30.0
    read_timeout: float = 7200.0
    max_retries: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    resend_after_send: bool = False
    empty_retries: int = 2
    extra_body: dict = field(default_factory=dict)


@dataclass
class Completion:
    """One chat completion (or the reason there is none)."""

    content: str = ""
    reasoning_content: str = ""
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    attempts: int = 0
    latency_s: float = 0.0
    status: int | None = None
    error: str | None = None


class _NotAccepted(Exception):
    """The request did not reach the server intact: safe to send again."""


class _InFlight(Exception):
    """Sent, then the wait failed: the server may still be generating it."""


def _parse_base(base_url: str) -> tuple[str, str, int, str]:
    u = urllib.parse.urlsplit(base_url.rstrip("/"))
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--base-url must look like http://HOST:PORT/v1, got {base_url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    return u.scheme, u.hostname, port, u.path


class ChatClient:
    """`complete(messages, params) -> Completion` against `{base_url}/chat/completions`."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.scheme, self.host, self.port, self.prefix = _parse_base(cfg.base_url)
        self._sleep = time.sleep

    def _post(self, path: str, body: bytes) -> tuple[int, bytes, dict]:
        cls = (http.client.HTTPSConnection if self.scheme == "https"
               else http.client.HTTPConnection)
        conn = cls(self.host, self.port, timeout=self.cfg.connect_timeout)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        try:
            try:
                conn.connect()
                conn.sock.settimeout(self.cfg.read_timeout)
                conn.request("POST", path, body=body, headers=headers)
            except (OSError, http.client.HTTPException) as e:
                raise _NotAccepted(f"{type(e).__name__}: {e}") from e
            try:
                resp = conn.getresponse()
                data = resp.read()
            except TimeoutError as e:
                raise _InFlight("read_timeout") from e
            except (OSError, http.client.HTTPException) as e:
                raise _InFlight(f"connection_lost: {type(e).__name__}") from e
            return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (attempt - 1))
        delay *= 0.5 + random.random() / 2
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.cfg.backoff_max))
            except ValueError:
                pass
        self._sleep(delay)

    def request_body(self, messages: list[dict], params: SamplingParams) -> dict:
        """The JSON body sent for `messages` (exposed for logging and tests)."""
        return {"model": self.cfg.model, "messages": messages, "stream": False,
                **params.to_body(), **self.cfg.extra_body}

    def complete(self, messages: list[dict], params: SamplingParams) -> Completion:
        """Send one chat request with the retry policy of the module docstring."""
        body = json.dumps(self.request_body(messages, params)).encode()
        path = f"{self.prefix}/chat/completions"
        out, t0, empties, attempt = Completion(), time.monotonic(), 0, 0
        while True:
            attempt += 1
            out.attempts = attempt
            can_retry = attempt <= self.cfg.max_retries
            try:
                status, data, headers = self._post(path, body)
            except _NotAccepted as e:
                if can_retry:
                    self._backoff(attempt)
                    continue
                out.error = f"not_accepted: {e}"
                break
            except _InFlight as e:
                if self.cfg.resend_after_send and can_retry:
                    self._backoff(attempt)
                    continue
                out.error = str(e)
                break
            out.status = status
            if status == 200:
                if self._fill(out, data) and out.finish_reason != "length" and not (
                        out.content.strip() or out.reasoning_content.strip()):
                    if empties < self.cfg.empty_retries:
                        empties += 1
                        continue
                    out.error = "empty_response"
                break
            if status == 400:
                out.error = "bad_request"
                break
            if can_retry and (status in RETRY_STATUSES
                              or (status == 504 and self.cfg.resend_after_send)):
                self._backoff(attempt, headers.get("retry-after"))
                continue
            out.error = f"http_{status}: {data[:200].decode('utf-8', 'replace')}"
            break
        out.latency_s = time.monotonic() - t0
        return out

    @staticmethod
    def _fill(out: Completion, data: bytes) -> bool:
        """Parse a 200 body into `out`; False (and `error`) when it is not a completion."""
        try:
            obj = json.loads(data)
            choice = obj["choices"][0]
            msg = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            out.error = "malformed_response"
            return False
        out.content = msg.get("content") or ""
        out.reasoning_content = msg.get("reasoning_content") or msg.get("reasoning") or ""
        out.finish_reason = choice.get("finish_reason")
        out.usage = obj.get("usage") or {}
        out.error = None
        return True

    def health(self, path: str = "/health", timeout: float = 5.0) -> bool:
        """GET `path` on the server root; True on HTTP 200 (used while waiting for startup)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
