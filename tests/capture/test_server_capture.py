"""Calibration inside an SGLang server (`capture.server_capture`), against a fake server that
speaks the same HTTP and writes per-rank capture files the way the plugin does."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oscar_kv.capture import server_capture
from oscar_kv.capture.data import load_calibration_data
from oscar_kv.errors import OscarError

FAKE = Path(__file__).with_name("fake_capture_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tokens(tmp_path) -> str:
    path = tmp_path / "tok.npy"
    np.save(path, np.arange(5000, dtype=np.int32) % 997)
    return str(path)


def _fake_merge(merged: list, extra_tokens: int = 0):
    """Stands in for the plugin's merge: a stats.pt with the counts of what the server saw."""
    def merge(d):
        d = Path(d)
        got = [json.loads(line)["ids"] for line in (d / "received.jsonl").read_text().splitlines()]
        torch.save({"format": "oscar-kv-stats", "version": 1, "num_sequences": len(got),
                    "num_tokens": sum(map(len, got)) + extra_tokens}, d / "stats.pt")
        merged.append(d)
        return d
    return merge


def test_sends_exactly_the_calibration_sequences_then_merges(tmp_path, tokens, monkeypatch):
    merged = []
    monkeypatch.setattr("oscar_kv.sglang_plugin.capture.merge_capture", _fake_merge(merged))
    out = tmp_path / "stats"
    server_capture.run_server_capture(
        "unused-model", tokens, str(out), tp=2, max_tokens=1000, seq_len=256,
        port=_free_port(), server_cmd=f"{sys.executable} {FAKE} 2", health_timeout=30,
        capture_timeout=30)
    want = load_calibration_data(tokens, seq_len=256, max_tokens=1000).sequences
    got = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
    assert [g["ids"] for g in got] == [w.tolist() for w in want]
    assert all(g["params"] == {"max_new_tokens": 1, "temperature": 0.0} for g in got)
    assert merged == [out]
    assert sorted(p.parent.name for p in out.glob("rank*/pass1.pt")) == ["rank0", "rank1"]
    assert not list(out.glob("rank*/kv"))  # spills removed after the merge
    assert not (out / "health_called").exists()  # readiness without a generation


def test_extra_captured_tokens_are_reported(tmp_path, tokens, monkeypatch):
    """e.g. a warmup or health request recorded by the server's capture."""
    monkeypatch.setattr("oscar_kv.sglang_plugin.capture.merge_capture", _fake_merge([], 13))
    with pytest.raises(OscarError, match="tokens in .* sequences were sent"):
        server_capture.run_server_capture(
            "unused-model", tokens, str(tmp_path / "s"), tp=1, max_tokens=600, seq_len=256,
            port=_free_port(), server_cmd=f"{sys.executable} {FAKE} 1", health_timeout=30,
            capture_timeout=30)


def test_missing_ranks_time_out_with_a_clear_message(tmp_path, tokens, monkeypatch):
    monkeypatch.setattr("oscar_kv.sglang_plugin.capture.merge_capture", lambda d: d)
    with pytest.raises(OscarError, match="waiting until all 2 ranks wrote"):
        server_capture.run_server_capture(
            "unused-model", tokens, str(tmp_path / "s"), tp=2, max_tokens=600, seq_len=256,
            port=_free_port(), server_cmd=f"{sys.executable} {FAKE} 1", health_timeout=30,
            capture_timeout=3)


def test_refuses_a_non_empty_output_and_a_dead_server(tmp_path, tokens):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OscarError, match="is not empty"):
        server_capture.run_server_capture("m", tokens, str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(OscarError, match="exited with code 3"):
        server_capture.run_server_capture(
            "m", tokens, str(tmp_path / "dead"), max_tokens=600, seq_len=256,
            port=_free_port(), server_cmd=f"{sys.executable} -c 'import sys; sys.exit(3)'",
            health_timeout=30)


def test_launch_command_disables_the_radix_cache_and_fits_a_sequence():
    cmd = server_capture.server_command("M", 4, 31000, 16384, "--mem-fraction-static 0.8")
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert "--disable-radix-cache" in cmd and "--skip-server-warmup" in cmd
    assert cmd[cmd.index("--chunked-prefill-size") + 1] == "16384"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[-2:] == ["--mem-fraction-static", "0.8"]
