"""Phase 2: fit per-layer K/V rotations (+ clip ratios) from calibration statistics.

hadamard / bitrev / compose build R = U H P_br from an estimator's covariance (estimators),
clip_search picks per-layer clip ratios on held-out q/k/v, checkpoint reads and writes the
reference schema, pipeline drives it all. Nothing here imports transformers or sglang.
"""

from oscar_kv.fit.bitrev import bit_reversal_indices, bitrev_perm, bitrev_permutation
from oscar_kv.fit.checkpoint import (
    RotationSet,
    hadamard_rotation_set,
    identity_rotation_set,
    load_rotation_set,
    read_rotation_file,
    rotation_filename,
)
from oscar_kv.fit.clip_objectives import K_CLIP_OBJECTIVES, V_CLIP_OBJECTIVES
from oscar_kv.fit.clip_search import (
    DEFAULT_GRID,
    ClipSearchReport,
    search_clip_ratios,
    search_layer_clip,
)
from oscar_kv.fit.compose import COMPOSITIONS, fit_rotation, orthogonality_error
from oscar_kv.fit.estimators import ESTIMATORS, layer_covariance, parse_method
from oscar_kv.fit.hadamard import hadamard_matrix, is_power_of_two
from oscar_kv.fit.pipeline import fit_rotations, load_stats

__all__ = ["bit_reversal_indices", "bitrev_perm", "bitrev_permutation", "RotationSet",
           "hadamard_rotation_set", "identity_rotation_set", "load_rotation_set",
           "read_rotation_file", "rotation_filename", "K_CLIP_OBJECTIVES", "V_CLIP_OBJECTIVES",
           "DEFAULT_GRID", "ClipSearchReport", "search_clip_ratios", "search_layer_clip",
           "COMPOSITIONS", "fit_rotation", "orthogonality_error", "ESTIMATORS",
           "layer_covariance", "parse_method", "hadamard_matrix", "is_power_of_two",
           "fit_rotations", "load_stats"]
