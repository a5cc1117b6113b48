"""Phase 1: capture post-RoPE Q/K and V from a model and reduce them to fp64 statistics.

`stats` and `rawdump` are framework-free; `hooks`, `data` and `calibrate` touch transformers
only inside the functions that need it.
"""
