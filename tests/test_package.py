"""The package installs as designed: layout, extension, no import-time side effects."""

import subprocess
import sys

import torch


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_kernels_installed_under_fastrlhf_only():
    # `kernels` as a top-level name belongs to another package that transformers probes.
    out = _run(
        "import importlib.util as u; import fastrlhf.kernels as k;"
        "print(k.__name__, u.find_spec('kernels') is None or 'fastrlhf' not in "
        "(u.find_spec('kernels').origin or ''))"
    )
    assert out == "fastrlhf.kernels True"


def test_import_has_no_heavy_side_effects():
    out = _run(
        "import sys, fastrlhf, fastrlhf.ops;"
        "print(sorted(m for m in ('triton', 'transformers', 'fastrlhf._C') if m in sys.modules))"
    )
    assert out == "[]"


def test_extension_registers_the_library():
    from fastrlhf._ext import extension_available

    assert extension_available(), "fastrlhf._C must be built for the test suite (make build)"
    assert hasattr(torch.ops, "fastrlhf")
