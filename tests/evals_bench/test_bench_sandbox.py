"""Generated code runs isolated: limits, no network, no writes outside its directory."""

from __future__ import annotations

import os
import time

from oscar_kv.evals.bench.sandbox import SandboxLimits, run_python


def test_runs_and_reads_stdin():
    r = run_python("print(input()[::-1])", stdin="abc\n")
    assert r.ok and r.stdout == "cba\n"


def test_infinite_loop_is_killed():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1.0))
    assert r.timed_out and not r.ok and time.monotonic() - t0 < 8


def test_killed_with_children_group(tmp_path):
    # sleeping code (no CPU) is stopped by the wall-time limit too
    r = run_python("import time\ntime.sleep(30)\n", limits=SandboxLimits(timeout_s=0.5))
    assert r.timed_out and r.wall_s < 5


def test_write_outside_dir_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert not r.ok and "PermissionError" in r.stderr and not target.exists()
    r = run_python(f"import os\nos.remove({str(tmp_path)!r})")
    assert not r.ok and "PermissionError" in r.stderr


def test_write_inside_dir_is_allowed_and_cleaned_up():
    r = run_python("import os\nopen('a.txt', 'w').write('hi')\nprint(os.getcwd())")
    assert r.ok and not os.path.exists(r.stdout.strip())


def test_socket_is_blocked():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
    assert not r.ok and "sandbox: socket" in r.stderr


def test_process_spawn_is_blocked():
    for code in ("import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])",
                 "import os\nos.fork()"):
        r = run_python(code)
        assert not r.ok and "not allowed" in r.stderr, code


def test_memory_limit():
    r = run_python("x = bytearray(3 << 30)", limits=SandboxLimits(memory_mb=1024))
    assert not r.ok and "MemoryError" in r.stderr


def test_environment_is_isolated(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "s3cret")
    r = run_python("import os\nprint(os.environ.get('SECRET_TOKEN'))")
    assert r.stdout.strip() == "None"
