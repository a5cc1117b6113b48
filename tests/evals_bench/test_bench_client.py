"""Retry policy of the chat client against the local fake server."""

from __future__ import annotations

import socket
import time

from bench_fake_server import FakeServer, Reply

from oscar_kv.evals.bench.client import ChatClient, ClientConfig, SamplingParams

MSG = [{"role": "user", "content": "hi"}]


def _client(url: str, **kw) -> ChatClient:
    cfg = dict(base_url=url, model="m", backoff_base=0.01, backoff_max=0.05)
    return ChatClient(ClientConfig(**{**cfg, **kw}))


def test_503_then_success_is_retried():
    with FakeServer(lambda b, n: Reply("ok") if n >= 3 else Reply(status=503)) as srv:
        out = _client(srv.base_url).complete(MSG, SamplingParams())
    assert out.error is None and out.content == "ok" and out.attempts == 3
    assert len(srv.requests) == 3


def test_400_is_final_and_not_retried():
    with FakeServer(lambda b, n: Reply(status=400, raw=b'{"error":"too long"}')) as srv:
        out = _client(srv.base_url).complete(MSG, SamplingParams())
    assert out.error == "bad_request" and len(srv.requests) == 1


def test_read_timeout_is_not_resent():
    with FakeServer(lambda b, n: Reply("late", delay=1.5)) as srv:
        out = _client(srv.base_url, read_timeout=0.3).complete(MSG, SamplingParams())
        time.sleep(0.2)
        assert out.error == "read_timeout" and len(srv.requests) == 1


def test_read_timeout_resent_only_when_asked():
    with FakeServer(lambda b, n: Reply("ok", delay=1.0 if n == 1 else 0.0)) as srv:
        out = _client(srv.base_url, read_timeout=0.3, resend_after_send=True).complete(
            MSG, SamplingParams())
    assert out.content == "ok" and len(srv.requests) == 2


def test_connection_refused_is_retried_then_reported():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    out = _client(f"http://127.0.0.1:{port}/v1", max_retries=2).complete(MSG, SamplingParams())
    assert out.error.startswith("not_accepted") and out.attempts == 3


def test_empty_answer_is_reasked_but_truncation_is_a_result():
    with FakeServer(lambda b, n: Reply("" if n == 1 else "fine")) as srv:
        out = _client(srv.base_url).complete(MSG, SamplingParams())
    assert out.content == "fine" and len(srv.requests) == 2
    with FakeServer(lambda b, n: Reply(None, reasoning="thinking...", finish_reason="length")
                    ) as srv:
        out = _client(srv.base_url).complete(MSG, SamplingParams())
    assert out.error is None and out.finish_reason == "length" and len(srv.requests) == 1
    assert out.reasoning_content == "thinking..."


def test_malformed_body_is_an_error_not_a_crash():
    with FakeServer(lambda b, n: Reply(raw=b"not json")) as srv:
        out = _client(srv.base_url).complete(MSG, SamplingParams())
    assert out.error == "malformed_response"


def test_request_body_carries_sampling_params():
    with FakeServer(lambda b, n: Reply("x")) as srv:
        _client(srv.base_url).complete(MSG, SamplingParams(0.6, 0.9, 20, 128, seed=7))
    body = srv.requests[0]
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"],
            body["seed"], body["model"]) == (0.6, 0.9, 20, 128, 7, "m")
    assert "top_k" not in SamplingParams(top_k=0).to_body()
