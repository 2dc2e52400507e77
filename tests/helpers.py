"""Shared assertions for op tests.

The rule (as in flash-attention's tests): compute a float64 reference, the op's
output, and PyTorch's own output at the op's dtype; then require

    max|ours - ref64| <= rtol_factor * max|torch_same_dtype - ref64| + atol

so the tolerance tracks the dtype's real rounding error instead of a guessed
constant. On failure the worst elements are printed (index, ours, reference).
"""

from __future__ import annotations

import torch


def _worst(ours: torch.Tensor, ref: torch.Tensor, k: int = 5) -> str:
    diff = (ours.double() - ref.double()).abs().flatten()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    k = min(k, diff.numel())
    vals, idx = diff.topk(k)
    shape = tuple(ours.shape)
    lines = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        pos = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), shape)) if shape else ()
        o = ours.flatten()[i].item()
        r = ref.flatten()[i].item()
        lines.append(f"  at {pos}: ours={o!r} ref={r!r} |diff|={v:.3e}")
    return "\n".join(lines)


def assert_close(
    ours: torch.Tensor,
    ref: torch.Tensor,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    name: str = "output",
) -> None:
    """Plain closeness with NaN positions required to match; prints the worst elements."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    o, r = ours.double(), ref.double()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    if not torch.equal(nan_o, nan_r):
        bad = (nan_o != nan_r).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN positions differ, e.g. at {bad}")
    o = torch.where(nan_o, 0.0, o)
    r = torch.where(nan_r, 0.0, r)
    # equal infinities are close; inf - inf would be NaN
    same_inf = torch.isinf(o) & (o == r)
    err = torch.where(same_inf, 0.0, (o - r).abs())
    # rtol * |inf| would be NaN; infinities are compared by the same_inf rule above
    tol = atol + rtol * torch.where(torch.isinf(r), 0.0, r.abs())
    if not bool((err <= tol).all()):
        raise AssertionError(
            f"{name}: max |diff| {err.max().item():.3e} exceeds atol={atol} rtol={rtol}\n"
            + _worst(torch.where(same_inf, r, o), r)
        )


def assert_close_to_reference(
    ours: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    *,
    atol: float,
    factor: float = 2.0,
    name: str = "output",
) -> None:
    """err(ours) <= factor * err(PyTorch at the same dtype) + atol, both against ref64."""
    assert ref64.dtype == torch.float64, f"{name}: the reference must be float64"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    finite = torch.isfinite(ref64)
    o, t, r = ours.double(), torch_same_dtype.double(), ref64
    if not torch.equal(torch.isfinite(o), finite):
        bad = (torch.isfinite(o) != finite).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite positions differ from the reference at {bad}")
    err_ours = torch.where(finite, (o - r).abs(), 0.0).max().item() if o.numel() else 0.0
    err_torch = torch.where(finite, (t - r).abs(), 0.0).max().item() if t.numel() else 0.0
    bound = factor * err_torch + atol
    if not err_ours <= bound:
        raise AssertionError(
            f"{name}: max err {err_ours:.3e} > {factor} * torch err {err_torch:.3e} + atol {atol}"
            f" = {bound:.3e}\n" + _worst(torch.where(finite, o, r), r)
        )
