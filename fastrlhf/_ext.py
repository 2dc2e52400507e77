"""Loading the compiled extension ``fastrlhf._C``, lazily and at most once.

If it is missing (not built, or built against another torch), every op that has
a compiled kernel falls back to its PyTorch path, and one warning says how to
build it.
"""

from __future__ import annotations

import functools
import warnings

BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation -e .` in the "
    "repository), against the torch you run with"
)


@functools.cache
def extension_available() -> bool:
    """Import ``fastrlhf._C`` (registering ``torch.ops.fastrlhf.*``); False if absent."""
    import torch  # noqa: F401  (loads libtorch, which the extension links against)

    try:
        import fastrlhf._C  # noqa: F401
    except ImportError as e:
        warnings.warn(
            f"fastrlhf._C could not be loaded ({e}); fastrlhf ops fall back to their "
            f"PyTorch paths, which are slower. To get the compiled kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
