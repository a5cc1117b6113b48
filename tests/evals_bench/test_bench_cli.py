"""CLIs end to end: the bench CLI, serve (with a fake server process), scripts, bash phases."""

from __future__ import annotations

import json
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bench_fake_server import FakeServer, canned

from oscar_kv.evals.bench.__main__ import main as bench_main
from oscar_kv.evals.bench.serve import main as serve_main
from oscar_kv.evals.bench.serve import server_command, server_env

REPO = Path(__file__).resolve().parents[2]
FIX = Path(__file__).parent / "fixtures"
SCRIPTS = sorted((REPO / "rotation").rglob("*.sh"))


def test_bench_cli_runs_and_prints_table(tmp_path, capsys):
    rules = [("6 times 7", "\\boxed{42}"), ("2025", "\\boxed{25}")]
    with FakeServer(canned(rules)) as srv:
        rc = bench_main(["--task", "aime25", "--base-url", srv.base_url, "--model", "m",
                         "--out", str(tmp_path), "--n", "2", "--data", str(FIX / "aime25.jsonl"),
                         "--method", "oscar", "--model-label", "tiny"])
    assert rc == 0
    m = json.loads((tmp_path / "aime25" / "metrics.json").read_text())
    assert m["scores"] == [100.0, 100.0] and m["method"] == "oscar"
    assert bench_main(["--table", str(tmp_path)]) == 0
    assert "| OSCAR | 100.00 (1/5) |" in capsys.readouterr().out


def test_bench_cli_user_errors_exit_2(tmp_path):
    assert bench_main(["--task", "nope", "--model", "m", "--out", str(tmp_path)]) == 2
    assert bench_main(["--task", "gpqa", "--model", "m", "--out", str(tmp_path),
                       "--data", str(tmp_path / "missing.csv")]) == 2
    assert bench_main(["--task", "gpqa"]) == 2


def test_server_env_and_command():
    env = server_env("oscar", "/r", 0.96, 0.92, base={"SGLANG_OSCAR_K_CLIP_RATIO": "0.5",
                                                     "HF_HOME": "/hf"})
    assert env["SGLANG_OSCAR_K_ROTATION_PATH"] == "/r/k_rotation_qqt_r_h_pbr.pt"
    assert (env["SGLANG_OSCAR_K_CLIP_RATIO"], env["SGLANG_OSCAR_V_CLIP_RATIO"]) == ("0.96", "0.92")
    assert env["HF_HOME"] == "/hf" and env["SGLANG_ENABLE_MIXED_KV_WINDOWS"] == "1"
    naive = server_env("naive", "/r", 0.96, 0.92, base={})
    assert naive["SGLANG_OSCAR_K_CLIP_RATIO"] == "0.0"
    assert naive["SGLANG_OSCAR_V_ROTATION_PATH"].endswith("v_rotation_identity.pt")
    bf16 = server_env("bf16", None, 0.96, 0.92, base={"SGLANG_ENABLE_MIXED_KV_WINDOWS": "1"})
    assert "SGLANG_ENABLE_MIXED_KV_WINDOWS" not in bf16
    cmd = server_command("Qwen/Qwen3-8B", "oscar", 4, 31057, reasoning_parser="qwen3")
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and "int2" in cmd
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4" and "qwen3" in cmd
    assert "int2" not in server_command("m", "bf16", 1, 1)
    assert "--decode-attention-backend" not in cmd  # int2 uses the plugin's own backend
    # no clip arguments: the plugin reads the ratios fitted into the checkpoint
    fitted = server_env("oscar", "/r", None, None, base={"SGLANG_OSCAR_K_CLIP_RATIO": "0.5"})
    assert "SGLANG_OSCAR_K_CLIP_RATIO" not in fitted and "SGLANG_OSCAR_V_CLIP_RATIO" not in fitted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_launches_waits_runs_and_stops(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([["6 times 7", "\\boxed{42}"], ["2025", "\\boxed{7}"]]))
    fake = f"{sys.executable} {Path(__file__).parent / 'bench_fake_server.py'} --rules {rules}"
    rc = serve_main(["--model-path", "m", "--method", "bf16", "--server-cmd", fake,
                     "--port", str(_free_port()), "--health-poll", "0.1",
                     "--health-timeout", "20", "--task", "aime25", "--out", str(tmp_path / "o"),
                     "--data", str(FIX / "aime25.jsonl")])
    assert rc == 0
    m = json.loads((tmp_path / "o" / "aime25" / "metrics.json").read_text())
    assert m["scores"] == [50.0] and m["method"] == "bf16"


def test_serve_reports_missing_rotations_and_dead_servers(tmp_path):
    assert serve_main(["--model-path", "m", "--method", "oscar", "--rot-dir", str(tmp_path),
                       "--out", str(tmp_path / "o")]) == 2
    assert serve_main(["--model-path", "m", "--method", "bf16", "--out", str(tmp_path / "o"),
                       "--server-cmd", f"{sys.executable} -c 'raise SystemExit(3)'",
                       "--health-poll", "0.05", "--health-timeout", "20"]) == 2


def test_rotation_scripts_parse():
    assert len(SCRIPTS) >= 5 * 6 + 1
    for s in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"
    models = {p.parent.name for p in SCRIPTS
              if p.name == "run_table.sh" and p.parent.name != "phases"}
    assert models == {"qwen3-4B-thinking-2507", "qwen3-8B", "qwen3-32B", "MiniMax-M2.7",
                      "GLM-4.7"}


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_rotation_scripts_shellcheck():
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True,
                       cwd=REPO / "rotation")
    assert r.returncode == 0, r.stdout


def test_tp_models_calibrate_inside_sglang_and_fit_fixed_clips(tmp_path):
    """GLM-4.7 (TP_DUMP 8): save_qkv.sh runs the SGLang server capture, compute_rotation.sh
    (no holdout.pt) fits with the model's fixed clips; a 1-GPU model keeps the HF capture."""
    r = subprocess.run(["bash", str(REPO / "rotation" / "GLM-4.7" / "save_qkv.sh")],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "CALIB_DATA" in r.stderr
    csv = tmp_path / "gpqa.csv"
    csv.write_text("x")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "CALIB_DATA": str(csv),
           "STATS_DIR": str(tmp_path / "stats"), "ROT_DIR": str(tmp_path / "rot")}
    run = lambda model, script: subprocess.run(
        ["bash", str(REPO / "rotation" / model / script)], capture_output=True, text=True,
        env=env)
    r = run("GLM-4.7", "save_qkv.sh")
    assert r.returncode == 0 and "-m oscar_kv.capture.server_capture" in r.stdout
    assert "--tp 8" in r.stdout
    r = run("GLM-4.7", "compute_rotation.sh")
    assert r.returncode == 0 and "--clip-k" in r.stdout and "--model" not in r.stdout
    r = run("qwen3-8B", "save_qkv.sh")
    assert r.returncode == 0 and "-m oscar_kv calibrate" in r.stdout
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "holdout.pt").write_text("x")
    r = run("qwen3-8B", "compute_rotation.sh")
    assert r.returncode == 0 and "--model Qwen/Qwen3-8B" in r.stdout
    env["FIT_METHOD"] = "identity"
    r = run("qwen3-8B", "compute_rotation.sh")
    assert r.returncode == 0 and "--no-fit-clip" in r.stdout and "--model" not in r.stdout


def test_scripts(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_rotations.py"),
                        "--dry-run", "--model", "qwen3-8B", "--dest", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "seq20000_prompt83_group128/rotations" in r.stdout
    assert not any(tmp_path.iterdir())
    table = runpy.run_path(str(REPO / "scripts" / "results_table.py"), run_name="not_main")
    assert table["main"]([str(tmp_path)]) == 0 and "no metrics.json" in capsys.readouterr().out
    assert table["main"]([str(tmp_path / "missing")]) == 2


def test_published_rotations_without_clips_are_never_served_unclipped(tmp_path):
    """A RotationZoo pair (no clip_ratio) takes --clip-if-missing, or is refused; fitted
    files keep their own ratios (None: the plugin reads them from the checkpoint)."""
    import torch

    from oscar_kv.errors import OscarError
    from oscar_kv.evals.bench.serve import resolve_clips
    from oscar_kv.fit.checkpoint import build_checkpoint

    r = torch.eye(8).expand(2, 8, 8).contiguous()
    ev = torch.ones(2, 8)
    for clips, d in ((None, tmp_path / "zoo"), ([0.95, 0.95], tmp_path / "fit")):
        d.mkdir()
        torch.save(build_checkpoint(r, ev, "qqt_r_h_pbr", clips), d / "k_rotation_qqt_r_h_pbr.pt")
    assert resolve_clips("oscar", str(tmp_path / "zoo"), None, None, "0.96,0.92") == (0.96, 0.92)
    with pytest.raises(OscarError, match="no fitted clip ratios"):
        resolve_clips("oscar", str(tmp_path / "zoo"), None, None)
    with pytest.raises(OscarError, match="needs 'K,V'"):
        resolve_clips("oscar", str(tmp_path / "zoo"), None, None, "0.9")
    assert resolve_clips("oscar", str(tmp_path / "fit"), None, None, "0.96,0.92") == (None, None)
    assert resolve_clips("oscar", str(tmp_path / "zoo"), 0.9, 0.8) == (0.9, 0.8)
    assert resolve_clips("naive", str(tmp_path / "zoo"), None, None) == (None, None)
