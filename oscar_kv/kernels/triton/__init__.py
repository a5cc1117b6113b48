"""`@triton.jit` bodies only; imported lazily by the wrappers in `oscar_kv.kernels`."""
