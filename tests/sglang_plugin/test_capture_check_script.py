"""scripts/sglang_capture_check.py: every step's command parses with the real CLIs (a flag typo
would only show on the device), the HF steps drop the overlay, the perplexity reader."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("scripts/sglang_capture_check.py")


class _Calls(list):
    def append_args(self, *a):
        self.append(a)


def test_step_commands_parse_with_the_real_parsers(script, tmp_path, monkeypatch):
    from oscar_kv.capture import compare, server_capture
    from oscar_kv.cli import build_parser

    args = script.parse_args(["--model", "/m", "--out", str(tmp_path), "--tp", "2"])
    cmds = script.commands(args, tmp_path)
    assert set(cmds) == {"hf_calibrate", "sglang_capture", "compare", "fit_hf", "fit_sglang",
                         "eval_hf", "eval_sglang"}
    for name, cmd in cmds.items():
        assert cmd[0] == sys.executable
        if cmd[2] == "oscar_kv":
            ns = build_parser().parse_args(cmd[3:])
            if name == "hf_calibrate":
                assert ns.holdout_seqs == 0 and ns.dtype == "bfloat16"
                assert ns.max_tokens == 16384 and ns.data == "/m/heldout_tokens.npy"
            if name.startswith("fit"):
                assert (ns.clip_k, ns.clip_v) == (0.96, 0.92)
        elif cmd[2] == "oscar_kv.capture.server_capture":
            seen = _Calls()  # parse only: the real run would start a server
            monkeypatch.setattr(server_capture, "run_server_capture", seen.append_args)
            assert server_capture.main(cmd[3:]) == 0
            model, data, out, tp, max_tokens, _seq_len, _gpqa, _port, server_args = seen[0][:9]
            assert (model, tp, max_tokens) == ("/m", 2, 16384)
            assert data == "/m/heldout_tokens.npy" and out == str(tmp_path / "sglang")
            assert "--attention-backend triton" in server_args
        else:
            assert cmd[2] == "oscar_kv.capture.compare"
            assert compare.main.__module__ == "oscar_kv.capture.compare"


def test_hf_env_drops_the_overlay(script, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/ov:/tmp/site:/repo")
    assert script.hf_env(None)["PYTHONPATH"] == "/tmp/site:/repo"
    assert script.hf_env(["/tmp/site"])["PYTHONPATH"] == "/tmp/ov:/repo"


def test_oscar_ppl_reads_eval_json(script, tmp_path):
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"results": [{"method": "bf16", "ppl": 4.6},
                                         {"method": "oscar", "ppl": 4.7}], "config": {}}))
    assert script.oscar_ppl(p) == 4.7
