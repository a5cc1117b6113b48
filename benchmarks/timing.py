"""Shared by the kernel benchmarks: the environment record and CUDA-graph timing."""

from __future__ import annotations

import datetime as dt
import platform
import time

import torch


def environment(device: str) -> dict:
    """GPU name, versions and date for the JSON record."""
    import triton

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "host": platform.node(),
           "device": "cpu (Triton interpreter)"}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env |= {"device": p.name, "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}"}
    return env


def bench(fn, device: str, graph: bool, reps: int) -> float:
    """Median milliseconds per call of fn (CUDA graph replay on a GPU)."""
    fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    import triton

    torch.cuda.synchronize()
    run = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
