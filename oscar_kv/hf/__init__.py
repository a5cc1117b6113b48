"""HF transformers integration: mixed KV cache, attention functions, V absorption, methods.

Importing this package imports transformers and registers the "oscar" / "oscar_sim" attention
implementations.
"""

from oscar_kv.hf.absorb import absorb_v_rotation, restore_weights
from oscar_kv.hf.attention import (
    GENERATE_IMPL,
    SIMULATE_IMPL,
    oscar_attention,
    oscar_sim_attention,
    register_attention_functions,
)
from oscar_kv.hf.cache import DECODE_BACKENDS, OscarCache, OscarKV, OscarLayer
from oscar_kv.hf.methods import (
    METHODS,
    OscarHandle,
    check_rotation_geometry,
    model_geometry,
    prepare_model,
)
from oscar_kv.hf.plan import LayerPlan, rotate

__all__ = ["absorb_v_rotation", "restore_weights", "GENERATE_IMPL", "SIMULATE_IMPL",
           "oscar_attention", "oscar_sim_attention", "register_attention_functions",
           "DECODE_BACKENDS", "OscarCache", "OscarKV", "OscarLayer", "METHODS", "OscarHandle",
           "check_rotation_geometry", "model_geometry", "prepare_model", "LayerPlan", "rotate"]
