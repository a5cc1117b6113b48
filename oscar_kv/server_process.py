"""A server's lifecycle and environment, shared by the evaluation launcher (`evals.bench.serve`) and
the in-server calibration (`capture.server_capture`): start it in its own process group with
its output in a log, wait for a condition while watching that it is alive, stop it always."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from oscar_kv.errors import OscarError


@contextlib.contextmanager
def scoped_environ(updates: dict[str, str]) -> Iterator[None]:
    """os.environ with `updates` for the with-block, then exactly as before (also on error):
    for in-process engines that read flags from the environment."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def launched(cmd: list[str], env: dict[str, str], log_path: str | Path
             ) -> Iterator[subprocess.Popen]:
    """Run cmd (stdout+stderr appended to log_path) for the duration of the with-block."""
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            raise OscarError(f"cannot start the server ({e}); check the command: "
                             f"{' '.join(cmd[:3])} ...") from None
        try:
            yield proc
        finally:
            stop_server(proc)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout_s: float,
               poll_s: float, what: str, log_path: str | Path = "") -> None:
    """Poll ready() until True; raise if the process exits first or timeout_s passes."""
    where = f"see {log_path}" if log_path else "see its log"
    t0 = time.monotonic()
    while True:
        if ready():
            return
        if proc.poll() is not None:
            raise OscarError(f"the server exited with code {proc.returncode} before {what}; "
                             f"{where}")
        if time.monotonic() - t0 > timeout_s:
            raise OscarError(f"timed out after {timeout_s:.0f} s waiting until {what}; {where}")
        time.sleep(poll_s)


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
