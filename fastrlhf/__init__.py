"""fastrlhf: kernel-optimized RLHF.

``fastrlhf.ops`` is the dependency-light public API (torch + triton only). The
trainers, models and data layers live beside it and are imported on demand: this
module imports nothing heavy and has no side effects.
"""

__version__ = "0.1.0"
