"""scoped_environ: flags for an in-process engine, restored exactly, also on error."""

from __future__ import annotations

import os

import pytest

from oscar_kv.server_process import scoped_environ


def test_scoped_environ_restores_set_and_unset_variables(monkeypatch):
    monkeypatch.setenv("OSCAR_T_SET", "before")
    monkeypatch.delenv("OSCAR_T_UNSET", raising=False)
    with pytest.raises(RuntimeError), scoped_environ({"OSCAR_T_SET": "x", "OSCAR_T_UNSET": "y"}):
        assert (os.environ["OSCAR_T_SET"], os.environ["OSCAR_T_UNSET"]) == ("x", "y")
        raise RuntimeError("engine failed")
    assert os.environ["OSCAR_T_SET"] == "before" and "OSCAR_T_UNSET" not in os.environ
