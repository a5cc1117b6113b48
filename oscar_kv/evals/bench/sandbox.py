"""Run untrusted generated Python in a separate, limited process.

Each call gets a fresh temporary working directory, a child `python -I` (isolated mode: no
user site, no PYTHON* variables, script dir not on sys.path) in its own session, and a guard
script that runs *inside* the child before the generated code:

- kernel limits (`resource.setrlimit`): address space (RLIMIT_AS, default 4 GiB), CPU seconds,
  size of any written file (RLIMIT_FSIZE, also caps stdout/stderr, which go to files), no core
  dumps;
- an audit hook (`sys.addaudithook`, cannot be removed from Python) that refuses socket
  creation (no network), process creation (fork/exec/spawn/subprocess/os.system), signals to
  other processes, `ctypes` library loading, and any write, delete, rename, chmod or mkdir
  outside the working directory.

The wall-time limit is enforced from the parent: on expiry the whole process group is killed
with SIGKILL. This is a guard against accidents (runaway loops, memory blow-ups, stray writes,
network calls) by model-written code, not a security boundary against deliberate escapes
(e.g. via a C extension already loaded): run the evaluator as an unprivileged user or inside
a container when that matters.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

GUARD_SOURCE = r'''
import os, resource, sys

_WORK = os.path.realpath(sys.argv[2])
_MAIN = sys.argv[1]
_MEM, _CPU, _FSIZE = (int(x) for x in sys.argv[3:6])
for _lim, _val in ((resource.RLIMIT_AS, _MEM), (resource.RLIMIT_CPU, _CPU),
                   (resource.RLIMIT_FSIZE, _FSIZE), (resource.RLIMIT_CORE, 0)):
    if _val >= 0:
        try:
            resource.setrlimit(_lim, (_val, _val))
        except (ValueError, OSError):
            pass

_BLOCKED = frozenset((
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "os.startfile",
    "pty.spawn", "os.chroot", "os.setuid", "os.setgid", "webbrowser.open",
))
_PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.mkdir": 1, "os.rmdir": 1,
                "os.symlink": 2, "os.link": 2, "os.chmod": 1, "os.chown": 1,
                "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.chflags": 1,
                "os.lchown": 1, "os.mkfifo": 1, "os.mknod": 1}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(p):
    if isinstance(p, int) or p is None:
        return True
    try:
        rp = os.path.realpath(os.fsdecode(p))
    except (TypeError, ValueError):
        return False
    return rp == _WORK or rp.startswith(_WORK + os.sep)


def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError("sandbox: %s is not allowed" % event)
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, 0))[:3]
        writing = bool(mode and any(c in str(mode) for c in "wax+")) or bool(
            (flags or 0) & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError("sandbox: writing %r outside the work dir" % (path,))
    elif event in _PATH_EVENTS:
        for p in args[:_PATH_EVENTS[event]]:
            if not _inside(p):
                raise PermissionError("sandbox: %s on %r outside the work dir" % (event, p))


sys.addaudithook(_hook)
del _hook
import runpy
runpy.run_path(_MAIN, run_name="__main__")
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `memory_mb` is RLIMIT_AS (virtual address space, not RSS)."""

    timeout_s: float = 10.0
    memory_mb: int = 4096
    file_size_mb: int = 64
    max_output_chars: int = 1 << 20


@dataclass(frozen=True)
class RunResult:
    """What happened: exit code (None when killed on timeout), captured output, wall time."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _child_env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "no_proxy": "*", "NO_PROXY": "*"}


def _read(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_python(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               files: dict[str, str] | None = None) -> RunResult:
    """Run `code` as `__main__` in a fresh temp dir under `limits`; never raises on bad code.

    `files` are extra text files written into the working directory first (e.g. test cases).
    """
    work = os.path.realpath(tempfile.mkdtemp(prefix="oscar-bench-"))
    try:
        main, guard = os.path.join(work, "main.py"), os.path.join(work, "_guard.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        with open(guard, "w", encoding="utf-8") as f:
            f.write(GUARD_SOURCE)
        for name, text in (files or {}).items():
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        in_path, out_path, err_path = (os.path.join(work, n) for n in
                                       ("_stdin", "_stdout", "_stderr"))
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        mem = int(limits.memory_mb) << 20 if limits.memory_mb > 0 else -1
        cpu = int(limits.timeout_s) + 1
        fsize = int(limits.file_size_mb) << 20 if limits.file_size_mb > 0 else -1
        cmd = [sys.executable, "-I", guard, main, work, str(mem), str(cpu), str(fsize)]
        t0 = time.monotonic()
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                    env=_child_env(work), start_new_session=True)
            timed_out = False
            try:
                rc: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
                kill_group(proc)
        wall = time.monotonic() - t0
        return RunResult(rc, _read(out_path, limits.max_output_chars),
                         _read(err_path, limits.max_output_chars), timed_out, wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group led by `proc` (started with start_new_session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
