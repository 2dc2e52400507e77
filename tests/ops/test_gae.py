"""Tests of fastrlhf.ops.packed_gae (the fastrlhf::packed_gae op and its torch path).

Ground truth: the float64 Python loop ``packed_gae_reference``. Tolerance (as in
tests/helpers.py): err(ours) <= 2 * err(PyTorch's padded loop in float32) + atol.
Every CPU test runs on both paths, chosen by impl=: the compiled C++ kernel
("extension") and the PyTorch padded loop ("torch"). CUDA tests (marked gpu)
compare the CUDA kernel with the C++ CPU kernel, which accumulates in float64.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

import fastrlhf.ops.advantages as adv_mod
from fastrlhf._ext import extension_available
from fastrlhf.ops import packed_gae
from fastrlhf.ops.reference import packed_gae_reference, padded_gae_reference
from tests.helpers import assert_close, assert_close_to_reference

HAS_EXT = extension_available()


@pytest.fixture(params=["extension", "torch"])
def gae(request):
    """packed_gae on the compiled op and on the PyTorch padded loop."""
    if request.param == "extension" and not HAS_EXT:
        pytest.skip("fastrlhf._C is not built")
    return functools.partial(packed_gae, impl=request.param)


def make_batch(lengths, dtype=torch.float32, device="cpu", mask_p=None, bootstrap=False):
    """Random packed batch: rewards, values [N], cu_seqlens [B+1], mask [N], bootstrap [B]."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    n = int(cu[-1])
    rewards = torch.randn(n, dtype=torch.float64).to(dtype)
    values = torch.randn(n, dtype=torch.float64).to(dtype)
    mask = None if mask_p is None else torch.rand(n) >= mask_p
    boot = torch.randn(len(lengths)).to(dtype) if bootstrap else None
    to = lambda t: None if t is None else t.to(device)
    return to(rewards), to(values), to(cu), to(mask), to(boot)


def padded_loop_fp32(rewards, values, cu, gamma, lam, mask, boot):
    """PyTorch's own float32 answer (the trainers' padded loop), packed back: [N]."""
    keep = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    pad = lambda x, fill: adv_mod.unpack_to_padded(x, cu, fill)
    adv, _ = padded_gae_reference(
        pad(rewards.float(), 0.0), pad(values.float(), 0.0), pad(keep, False), gamma, lam, boot
    )
    seq, pos = adv_mod._token_coords(cu, rewards.numel())
    return adv[seq, pos]


LENGTHS = {
    "mixed": [0, 1, 7, 0, 33, 2, 129, 1, 0, 300],
    "one_long": [3001],
    "all_empty": [0, 0, 0],
    "singles": [1] * 17,
}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("boot", [False, True], ids=["terminal", "bootstrap"])
def test_matches_reference(gae, lengths, masked, boot):
    gamma, lam = 0.99, 0.95
    r, v, cu, m, b = make_batch(lengths, mask_p=0.3 if masked else None, bootstrap=boot)
    adv, ret = gae(r, v, cu, gamma, lam, mask=m, bootstrap=b)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == r.shape
    ref_adv, ref_ret = packed_gae_reference(r, v, cu, gamma, lam, m, b)
    torch_adv = padded_loop_fp32(r, v, cu, gamma, lam, m, b)
    assert_close_to_reference(adv, ref_adv, torch_adv, atol=1e-6, name="advantages")
    assert_close_to_reference(ret, ref_ret, torch_adv + v, atol=1e-6, name="returns")
    if m is not None:
        assert bool((adv[~m] == 0).all()), "masked tokens must get advantage 0"
    assert_close(ret, adv + v, atol=1e-6, name="returns = advantages + values")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.0), (0.0, 0.7)])
def test_dtypes_and_coefficients(gae, dtype, gamma, lam):
    r, v, cu, m, b = make_batch([5, 0, 64, 1, 200], dtype, mask_p=0.2, bootstrap=True)
    adv, ret = gae(r, v, cu, gamma, lam, mask=m, bootstrap=b)
    assert adv.dtype == torch.float32
    # the reference sees the same (rounded) inputs, in float64
    ref_adv, ref_ret = packed_gae_reference(r, v, cu, gamma, lam, m, b)
    torch_adv = padded_loop_fp32(r, v, cu, gamma, lam, m, b)
    assert_close_to_reference(adv, ref_adv, torch_adv, atol=1e-5, name="advantages")
    assert_close_to_reference(ret, ref_ret, torch_adv + v.double(), atol=1e-5, name="returns")


def test_masked_tokens_are_skipped_by_hand(gae):
    # one sequence [u0, m1, m2, u3] (m = masked): u0 bootstraps from u3, across m1, m2
    r = torch.tensor([0.5, 9.0, -7.0, 1.0])
    v = torch.tensor([0.2, 4.0, 5.0, 0.3])
    mask = torch.tensor([1, 0, 0, 1])  # integers: nonzero = keep
    cu = torch.tensor([0, 4], dtype=torch.int32)
    g, lam = 0.9, 0.8
    a3 = 1.0 - 0.3  # terminal: next value 0
    a0 = 0.5 + g * 0.3 - 0.2 + g * lam * a3
    adv, ret = gae(r, v, cu, g, lam, mask=mask)
    assert_close(adv, torch.tensor([a0, 0.0, 0.0, a3]), atol=1e-6)
    assert_close(ret, torch.tensor([a0 + 0.2, 4.0, 5.0, a3 + 0.3]), atol=1e-6)


def test_bootstrap_and_boundaries_by_hand(gae):
    # sequences: [x], [], [y, z]; bootstrap only matters at each sequence's end
    r = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([0.5, 0.25, 0.75])
    cu = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    boot = torch.tensor([10.0, -5.0, 4.0])
    g, lam = 0.5, 0.5
    a0 = 1.0 + g * 10.0 - 0.5
    a2 = 3.0 + g * 4.0 - 0.75
    a1 = 2.0 + g * 0.75 - 0.25 + g * lam * a2
    adv, _ = gae(r, v, cu, g, lam, bootstrap=boot)
    assert_close(adv, torch.tensor([a0, a1, a2]), atol=1e-6)
    # a masked last token passes the bootstrap value through to the one before it
    adv, _ = gae(r, v, cu, g, lam, mask=torch.tensor([True, True, False]), bootstrap=boot)
    assert_close(adv, torch.tensor([a0, 2.0 + g * 4.0 - 0.25, 0.0]), atol=1e-6)


def test_empty_batch(gae):
    for cu in (torch.zeros(1, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)):
        adv, ret = gae(torch.empty(0), torch.empty(0), cu)
        assert adv.shape == ret.shape == (0,) and adv.dtype == torch.float32


def test_many_sequences_parallel(gae):
    # enough sequences that at::parallel_for splits them across threads
    rng = random.Random(0)
    lengths = [rng.choice([0, 1, 2, 3, 9, 30]) for _ in range(1500)]
    r, v, cu, m, b = make_batch(lengths, mask_p=0.1, bootstrap=True)
    adv, _ = gae(r, v, cu, 0.97, 0.9, mask=m, bootstrap=b)
    ref_adv, _ = packed_gae_reference(r, v, cu, 0.97, 0.9, m, b)
    torch_adv = padded_loop_fp32(r, v, cu, 0.97, 0.9, m, b)
    assert_close_to_reference(adv, ref_adv, torch_adv, atol=1e-6)


def _bad_inputs():
    r, v = torch.randn(6), torch.randn(6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32)
    return [
        ("cu int64", (r, v, cu.long()), {}, TypeError, "cu_seqlens must be int32"),
        ("cu strided", (r, v, i32(0, 9, 2, 9, 6)[::2]), {}, ValueError, "contiguous"),
        ("cu 2-D", (r, v, cu[None]), {}, ValueError, "cu_seqlens must be 1-D"),
        ("cu start", (r, v, i32(1, 2, 6)), {}, ValueError, "start at 0"),
        ("cu decreasing", (r, v, i32(0, 4, 3, 6)), {}, ValueError, r"cu_seqlens\[1\] = 4"),
        ("cu end", (r, v, i32(0, 2, 5)), {}, ValueError, "end at total_tokens = 6"),
        ("dtype mismatch", (r, v.double(), cu), {}, TypeError, "values must have the dtype"),
        ("int rewards", (r.int(), v.int(), cu), {}, TypeError, "rewards must be"),
        ("2-D rewards", (r[None], v[None], cu), {}, ValueError, "rewards must be 1-D"),
        ("values shape", (r, v[:5], cu), {}, ValueError, "values must have the shape"),
        ("mask shape", (r, v, cu), {"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask"),
        ("boot size", (r, v, cu), {"bootstrap": torch.randn(3)}, ValueError, "bootstrap must be"),
        ("boot dtype", (r, v, cu), {"bootstrap": torch.ones(2, dtype=torch.int64)}, TypeError,
         "bootstrap must be a float"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise(gae, case):
    _, args, kwargs, exc, msg = case
    with pytest.raises(exc, match=msg):
        gae(*args, **kwargs)


@pytest.mark.skipif(not HAS_EXT, reason="fastrlhf._C is not built")
def test_op_checks_mask_dtype():
    r, v = torch.randn(4), torch.randn(4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="mask must be bool"):
        torch.ops.fastrlhf.packed_gae(r, v, cu, 1.0, 0.95, torch.ones(4))


@pytest.mark.skipif(not HAS_EXT, reason="fastrlhf._C is not built")
def test_torch_compile_fullgraph():
    r, v, cu, m, b = make_batch([3, 0, 11], mask_p=0.3, bootstrap=True)

    def step(r, v, cu, m, b):
        adv, ret = packed_gae(r, v, cu, 0.99, 0.9, mask=m, bootstrap=b)
        return adv * 2.0, ret.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got, want = compiled(r, v, cu, m, b), step(r, v, cu, m, b)
    assert_close(got[0], want[0], atol=0.0)
    assert_close(got[1], want[1], atol=1e-5)


def test_impl_choices():
    r, v, cu, m, b = make_batch([4, 0, 5], mask_p=0.3, bootstrap=True)
    want = packed_gae_reference(r, v, cu, 0.9, 0.8, m, b)
    got = packed_gae(r, v, cu, 0.9, 0.8, m, b, impl="reference")
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0].float()) and torch.equal(got[1], want[1].float())
    with pytest.raises(ValueError, match="packed_gae: impl must be one of"):
        packed_gae(r, v, cu, impl="cuda")
    with pytest.raises(ValueError, match="cu_seqlens must end at total_tokens = 9"):
        packed_gae(r, v, cu[:-1], impl="reference")
    if not HAS_EXT:
        with pytest.raises(ValueError, match="impl='extension' needs fastrlhf._C"):
            packed_gae(r, v, cu, impl="extension")


# ----------------------------------------------------------------------------- CUDA


def _cuda_vs_cpu(lengths, dtype=torch.float32, mask_p=0.25, bootstrap=True, gamma=0.999,
                 lam=0.95, rel=2e-5):  # fmt: skip
    r, v, cu, m, b = make_batch(lengths, dtype, "cuda", mask_p=mask_p, bootstrap=bootstrap)
    adv, ret = packed_gae(r, v, cu, gamma, lam, mask=m, bootstrap=b)
    cpu = lambda t: None if t is None else t.cpu()
    want_adv, want_ret = packed_gae(cpu(r), cpu(v), cpu(cu), gamma, lam, cpu(m), cpu(b))
    # the CPU kernel accumulates in float64: the difference is the CUDA scan's float32
    # rounding, which grows with the magnitude of the running sums
    atol = rel * max(1.0, float(want_adv.abs().max()) if want_adv.numel() else 1.0)
    assert_close(adv.cpu(), want_adv, atol=atol, name="advantages")
    assert_close(ret.cpu(), want_ret, atol=atol, name="returns")
    if m is not None:
        assert bool((adv[~m] == 0).all())


@pytest.mark.gpu
def test_cuda_kernel_is_built():
    # without it CUDA inputs take the fallback, and the tests below would not test the kernel
    assert "cuda" in adv_mod._EXTENSION_DEVICES, "fastrlhf._C was built without CUDA kernels"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask_p", [None, 0.3])
def test_cuda_matches_cpu_mixed(dtype, mask_p):
    rng = random.Random(1)
    lengths = [rng.choice([0, 1, 2, 7, 31, 255, 2047, 2048, 2049, 5000]) for _ in range(300)]
    _cuda_vs_cpu(lengths, dtype, mask_p=mask_p)
    _cuda_vs_cpu(lengths, dtype, mask_p=mask_p, bootstrap=False, gamma=0.9, lam=0.0)


@pytest.mark.gpu
def test_cuda_both_carry_paths():
    # <= 1024 tiles of 2048 tokens: each tile composes the maps to its right itself;
    # beyond, the separate carry launch (the two paths must agree with the CPU kernel)
    rng = random.Random(2)
    for total in (1024 * 2048 - 5, 1024 * 2048 + 1, 2_600_000):
        lengths = []
        while sum(lengths) < total:
            lengths.append(rng.choice([1, 9, 300, 2048, 6000]))
        lengths[-1] -= sum(lengths) - total
        _cuda_vs_cpu(lengths, mask_p=0.2)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [131_072, 1_000_003])
def test_cuda_long_single_sequence(length):
    _cuda_vs_cpu([length])
    _cuda_vs_cpu([length], mask_p=None, bootstrap=False, gamma=1.0, lam=1.0, rel=1e-4)


@pytest.mark.gpu
def test_cuda_many_sequences():
    rng = random.Random(2)
    _cuda_vs_cpu([rng.choice([0, 1, 3, 16, 40]) for _ in range(65_536)])
    _cuda_vs_cpu([16] * 65_536, mask_p=None)


@pytest.mark.gpu
def test_cuda_empty_and_tiny():
    _cuda_vs_cpu([0, 0, 0])
    _cuda_vs_cpu([1])
    _cuda_vs_cpu([0, 1, 0, 2])


@pytest.mark.gpu
def test_cuda_validate_is_opt_in():
    r, v = torch.randn(6, device="cuda"), torch.randn(6, device="cuda")
    bad = torch.tensor([0, 4, 3, 6], dtype=torch.int32, device="cuda")
    packed_gae(r, v, bad)  # unchecked: wrong numbers, but no fault
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="must not decrease"):
        packed_gae(r, v, bad, validate=True)
    with pytest.raises(ValueError, match="end at total_tokens"):
        packed_gae(r, v, torch.tensor([0, 2, 5], dtype=torch.int32, device="cuda"), validate=True)


@pytest.mark.gpu
def test_cuda_device_mismatch_raises():
    r, v = torch.randn(6, device="cuda"), torch.randn(6, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        packed_gae(r, v, torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises((ValueError, RuntimeError), match="device"):
        packed_gae(r, v.cpu(), torch.tensor([0, 6], dtype=torch.int32, device="cuda"))


@pytest.mark.gpu
def test_cuda_torch_compile():
    r, v, cu, m, b = make_batch([3, 0, 4000, 1], device="cuda", mask_p=0.3, bootstrap=True)
    f = lambda r, v, cu, m, b: packed_gae(r, v, cu, 0.99, 0.9, mask=m, bootstrap=b)[0] + 1.0
    assert_close(torch.compile(f, fullgraph=True)(r, v, cu, m, b), f(r, v, cu, m, b), atol=0.0)
