"""oscar-kv: OSCAR 2-bit KV-cache quantization (calibrate -> fit -> serve -> evaluate).

Importing the package touches neither CUDA, transformers, sglang nor triton.
"""

from oscar_kv.config import ModelGeometry, QuantSpec, WindowSpec
from oscar_kv.errors import OscarError

__version__ = "0.1.0"
__all__ = ["ModelGeometry", "QuantSpec", "WindowSpec", "OscarError", "__version__"]
