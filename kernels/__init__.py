"""Triton kernels and their launchers, installed as ``fastrlhf.kernels``.

Nothing here is imported by ``import fastrlhf``; ``fastrlhf.ops`` imports a kernel
module the first time an op needs it.
"""
