"""vocab_kl and linear_vocab_kl against float64 references that hold the full logits.

The torch paths run in float32 on CPU; blocks are shrunk in some tests so several row /
vocabulary blocks (and a partial last one) are exercised on small shapes.
"""

from __future__ import annotations

import pytest
import torch

import fastrlhf.ops.divergence as vk
from fastrlhf.ops import linear_vocab_kl, vocab_kl
from fastrlhf.ops.reference import linear_vocab_kl_reference, vocab_kl_reference
from tests.helpers import assert_close, assert_close_to_reference

DIRS = ["ref||policy", "policy||ref"]


def _logits(n, v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen) * 2, torch.randn(n, v, generator=gen) * 2


def _grad(fn, x, coef, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, **kw)
    (out * coef).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_kl_matches_float64(direction, temperature, monkeypatch):
    monkeypatch.setattr(vk, "_BLOCK_ELEMS", 3 * 50)  # 3 rows per block, a partial last one
    x, r = _logits(10, 50)
    x = x.reshape(2, 5, 50)
    r = r.reshape(2, 5, 50)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False
    coef = torch.rand(2, 5) + 0.5
    kw = dict(temperature=temperature, direction=direction, mask=mask)
    ours, g = _grad(lambda t, **k: vocab_kl(t, r, impl="torch", **k), x, coef, **kw)
    ref, g64 = _grad(lambda t, **k: vocab_kl_reference(t, r.double(), **k), x.double(), coef, **kw)
    assert ours.dtype == torch.float32
    assert float(ref.detach()[mask].min()) > 0
    assert_close(ours, ref, atol=2e-5, rtol=1e-5, name="kl")
    # float32 rounding of log p - log q: relative to the largest gradient
    assert_close(g, g64, atol=5e-6 * max(float(g64.abs().max()), 1.0), name="dlogits")
    assert float(g[1, 3].abs().max()) == 0.0  # masked position: no gradient


def test_vocab_kl_gives_no_gradient_to_the_reference():
    x, r = _logits(4, 30)
    r = r.requires_grad_()
    vocab_kl(x.requires_grad_(), r).sum().backward()
    assert r.grad is None and x.grad is not None


def test_vocab_kl_zero_for_equal_inputs_and_gradcheck():
    x, _ = _logits(3, 20)
    assert float(vocab_kl(x, x.clone()).abs().max()) < 1e-6
    x64, r64 = (t.double() for t in _logits(3, 7))
    for d in DIRS:
        fn = lambda t: vocab_kl(t, r64, direction=d, temperature=0.9, impl="torch")  # noqa: B023
        assert torch.autograd.gradcheck(fn, (x64.requires_grad_(),))


def test_vocab_kl_bad_input_is_named():
    x, r = _logits(3, 20)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        vocab_kl(x, r[:, :10])
    with pytest.raises(ValueError, match="direction"):
        vocab_kl(x, r, direction="forward")
    with pytest.raises(ValueError, match="mask must have shape"):
        vocab_kl(x, r, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="ref_logits must have dtype"):
        vocab_kl(x, r.double())
    with pytest.raises(ValueError, match="temperature"):
        vocab_kl(x, r, temperature=0.0)
    r[1, 2] = float("nan")
    with pytest.raises(ValueError, match="ref_logits has non-finite"):
        vocab_kl(x, r)


# ------------------------------------------------------------------ linear_vocab_kl


def _linear_inputs(n, h, v, *, shared=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=gen)
    w = torch.randn(v, h, generator=gen) * (3.0 / h**0.5)
    b = torch.randn(v, generator=gen) * 0.5
    if shared:
        return hid, w, b, hid, w, b
    hid_r = hid + 0.5 * torch.randn(n, h, generator=gen)
    w_r = w + 0.3 * torch.randn(v, h, generator=gen) / h**0.5
    b_r = torch.randn(v, generator=gen) * 0.5
    return hid, w, b, hid_r, w_r, b_r


def _linear_run(fn, inputs, coef, up=False, **kw):
    hid, w, b, hid_r, w_r, b_r = (t.double() if up else t for t in inputs)
    leaves = [t.detach().clone().requires_grad_() for t in (hid, w, b)]
    out = fn(*leaves[:2], hid_r, w_r, bias=leaves[2], ref_bias=b_r, **kw)
    (out * coef).sum().backward()
    return out, [t.grad for t in leaves]


def _compare(inputs, coef, **kw):
    """The project's rule: err(ours) <= 2 * err(the float32 reference) + atol vs float64."""
    ours, g = _linear_run(linear_vocab_kl, inputs, coef, impl="torch", **kw)
    same, g32 = _linear_run(linear_vocab_kl_reference, inputs, coef, **kw)
    ref, g64 = _linear_run(linear_vocab_kl_reference, inputs, coef, up=True, **kw)
    assert ours.dtype == torch.float32
    assert_close_to_reference(ours.detach(), ref.detach(), same.detach(), atol=2e-5, name="kl")
    for name, a, b, c in zip(("dhidden", "dweight", "dbias"), g, g64, g32):
        atol = 2e-6 * max(float(b.abs().max()), 1.0)
        assert_close_to_reference(a, b, c, atol=atol, name=name)


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_linear_vocab_kl_matches_float64(direction, softcap, monkeypatch):
    monkeypatch.setattr(vk, "_BLOCK_ELEMS", 12 * 64)  # Vb = 64 over V = 300: 5 blocks
    inputs = _linear_inputs(12, 16, 300)
    coef = torch.rand(12, generator=torch.Generator().manual_seed(3)) + 0.5
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    kw = dict(direction=direction, softcap=softcap, temperature=0.8, mask=mask, logit_scale=1.3)
    _compare(inputs, coef, **kw)


@pytest.mark.parametrize("direction", DIRS)
def test_linear_vocab_kl_shared_reference(direction):
    """A reference that is the policy's own tensors: KL 0, gradient 0, nothing aliased."""
    inputs = _linear_inputs(6, 16, 200, shared=True)
    coef = torch.ones(6)
    hid, w, b = (t.detach().clone().requires_grad_() for t in inputs[:3])
    out = linear_vocab_kl(hid, w, hid, w, bias=b, ref_bias=b, direction=direction)
    out.sum().backward()
    assert float(out.detach().abs().max()) < 1e-5
    assert float(hid.grad.abs().max()) < 1e-5 and float(w.grad.abs().max()) < 1e-5
    # the same tensors, one step apart: matches float64
    pol = [inputs[0] + 0.1, inputs[1], inputs[2]]
    _compare((*pol, *inputs[3:]), coef, direction=direction)


def test_linear_vocab_kl_full_vocabulary():
    """V = 151,936 (Qwen's vocabulary) at small N, several default-size vocabulary blocks."""
    inputs = _linear_inputs(4, 8, 151936, seed=1)
    coef = torch.tensor([1.0, 0.5, 2.0, 1.5])
    _compare(inputs, coef)


def test_linear_vocab_kl_bad_input_is_named():
    hid, w, b, hid_r, w_r, b_r = _linear_inputs(4, 8, 30)
    with pytest.raises(ValueError, match="weight and ref_weight"):
        linear_vocab_kl(hid, w, hid_r, w_r[:, :4])
    with pytest.raises(ValueError, match="ref_hidden must have the shape"):
        linear_vocab_kl(hid, w, hid_r[:2], w_r)
    with pytest.raises(ValueError, match="softcap"):
        linear_vocab_kl(hid, w, hid_r, w_r, softcap=-1.0)
    with pytest.raises(ValueError, match="ref_bias must be"):
        linear_vocab_kl(hid, w, hid_r, w_r, ref_bias=b_r[:3])
    with pytest.raises(ValueError, match="impl"):
        linear_vocab_kl(hid, w, hid_r, w_r, impl="triton")


def test_ops_trace_with_fullgraph_compile():
    """Both ops are torch.library custom ops with fakes: aot_eager traces forward and
    backward through them without a graph break (validate=False: no host reads)."""
    hid, w, b, hid_r, w_r, b_r = _linear_inputs(5, 8, 70)

    def step(h, w):
        kl = linear_vocab_kl(h, w, hid_r, w_r, bias=b, ref_bias=b_r, validate=False, softcap=3.0)
        kl2 = vocab_kl(h @ w.t(), hid_r @ w_r.t(), direction="policy||ref", validate=False)
        return (kl + kl2).sum()

    def grads(fn):
        h, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(h, ww)
        out.backward()
        return out.detach(), h.grad, ww.grad

    compiled = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    eager = grads(step)
    for name, c, e in zip(("loss", "dhidden", "dweight"), compiled, eager):
        assert_close(c, e, atol=1e-5, rtol=1e-5, name=name)


def test_opcheck():
    x, r = _logits(4, 30)
    torch.library.opcheck(vk._vocab_kl_op, (x.requires_grad_(), r, 0.9, True))
    hid, w, b, hid_r, w_r, b_r = _linear_inputs(4, 8, 40)
    args = (hid.requires_grad_(), w.requires_grad_(), hid_r, w_r, b.requires_grad_(), b_r,
            1.1, False, 2.0, 1.5)  # fmt: skip
    torch.library.opcheck(vk._linear_op, args)
