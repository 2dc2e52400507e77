"""Build of fastrlhf and its compiled extension ``fastrlhf._C``.

The C++ (CPU) sources in ``csrc/*.cpp`` are always built. The CUDA sources
(``csrc/cuda/*.cu`` plus the ``csrc/cuda/*.cpp`` launchers that bind them) are built
when torch is a CUDA build and a CUDA toolkit is found; ``FASTRLHF_BUILD_CUDA=0``
skips them and ``FASTRLHF_BUILD_CUDA=1`` makes their absence an error.

``kernels/`` (Triton kernels) is installed as ``fastrlhf.kernels``; there is never a
top-level ``kernels`` module (that import name belongs to another package).
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - only hit on a machine without torch
    raise SystemExit(
        "fastrlhf builds its extension against the installed torch, and none was found "
        f"({e}). Install torch first (CPU machines: pip install torch==2.13.0), then "
        "pip install --no-build-isolation -e ."
    ) from e

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_cuda() -> bool:
    flag = os.environ.get("FASTRLHF_BUILD_CUDA", "")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise SystemExit(
            "FASTRLHF_BUILD_CUDA=1 but torch is not a CUDA build "
            f"(torch.version.cuda={torch.version.cuda}) or no CUDA toolkit was found "
            f"(CUDA_HOME={CUDA_HOME})."
        )
    return available


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def extensions():
    cpp = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    # -fopenmp: at::parallel_for expands an OpenMP pragma in our translation unit.
    # No -std flag: torch.utils.cpp_extension adds the C++ standard its headers need (C++20).
    cxx = ["-O3", "-fopenmp"]
    if _build_cuda():
        cuda = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        cuda += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        return [
            CUDAExtension(
                "fastrlhf._C",
                cpp + cuda,
                define_macros=[("FASTRLHF_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastrlhf._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    ]


# kernels/ and examples/ live at the top of the tree (the layout of the design card) but
# install inside the package: ``fastrlhf.kernels``, and ``fastrlhf.examples`` so that
# ``fastrlhf demo`` finds its config in an installed wheel, not only in a checkout.
packages = find_packages(include=["fastrlhf", "fastrlhf.*"])
packages += ["fastrlhf.kernels", "fastrlhf.examples"]

setup(
    packages=packages,
    package_dir={"fastrlhf.kernels": "kernels", "fastrlhf.examples": "examples"},
    package_data={"fastrlhf": ["data/assets/**/*"], "fastrlhf.examples": ["*.yaml"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
