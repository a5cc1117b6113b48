"""SGLang plugin: `--kv-cache-dtype int2` with BF16 sink/recent windows over sglang==0.5.17.

Installed through the `sglang.srt.plugins` entry point (`pip install oscar-kv[sglang]`);
SGLang calls `register()` in every process. `env.py` (flags -> config) and `pool_index.py`
(slot bookkeeping) are framework-free; only `hooks.py`, `server_args.py` and `backend.py`
import sglang, lazily, from `register()`.
"""

from __future__ import annotations


def register() -> None:
    """Entry point for `sglang.srt.plugins`: install our hooks (imports sglang)."""
    from oscar_kv.sglang_plugin.hooks import install

    install()


__all__ = ["register"]
