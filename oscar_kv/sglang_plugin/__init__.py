"""SGLang plugin: `--kv-cache-dtype int2` with BF16 sink/recent windows over sglang==0.5.17.

Installed through the `sglang.srt.plugins` entry point (`pip install oscar-kv[sglang]`);
SGLang calls `register()` in every process. The framework-free modules (env, pool_index,
planner, storage, numerics, attention, capture) hold all the logic and are tested without
sglang; hooks, backend, pool, glue and absorb are thin adapters that import sglang lazily
(only from `register()` / inside their class factories). See README.md.
"""

from __future__ import annotations


def register() -> None:
    """Entry point for `sglang.srt.plugins`: install our hooks (imports sglang)."""
    from oscar_kv.sglang_plugin.hooks import install

    install()


__all__ = ["register"]
