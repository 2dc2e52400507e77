"""kl_penalty, ppo_policy_loss, value_loss and dpo_loss against the float64 references.

"triton": the fused kernels (interpreter on CPU); "torch": the path CPU runs take (the
reference on float32-upcast inputs, behind the op's validation and output format).
"""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import dpo_loss, kl_penalty, ppo_policy_loss, value_loss
from fastrlhf.ops.reference import (
    dpo_loss_reference,
    kl_penalty_reference,
    ppo_policy_loss_reference,
    value_loss_reference,
)
from tests.helpers import assert_close, assert_close_to_reference

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
# Packed layout: 6 sequences incl. an empty one.
CU = [0, 5, 42, 42, 100, 171, 180]
N_PACKED = 180


@pytest.fixture(params=["triton", "torch"])
def impl(request):
    return request.param


def _batch(layout, device, dtype=torch.float32):
    """logp, old, adv, ref, entropy, mask, cu_seqlens for a padded or a packed batch."""
    shape = (5, 37) if layout == "padded" else (N_PACKED,)
    logp = -torch.rand(shape, device=device) * 3
    old = logp + torch.randn(shape, device=device) * 0.3
    old.view(-1)[:3] += 25.0  # log-ratio beyond the +-20 clamp
    adv = torch.randn(shape, device=device)
    ref = logp + torch.randn(shape, device=device) * 0.5
    ent = torch.rand(shape, device=device) * 2
    mask = torch.rand(shape, device=device) > 0.3
    old.view(-1)[3:9] -= 2.0  # ratio e^2 > dual_clip...
    adv.view(-1)[3:9] = -adv.view(-1)[3:9].abs()  # ...with negative advantages
    mask.view(-1)[3:9] = True
    cu = None
    if layout == "padded":
        mask[2] = False  # a fully masked sequence
    else:
        cu = torch.tensor(CU, dtype=torch.int32, device=device)
        mask[CU[4] : CU[5]] = False
    cast = lambda t: t.to(dtype)
    return cast(logp), cast(old), cast(adv), cast(ref), cast(ent), mask, cu


def _ppo_both(args, impl, **kw):
    """(loss, metrics, dlogp, dentropy) of ours and of the reference in float64."""
    logp, old, adv, ref, ent, mask, cu = args
    x = logp.detach().clone().requires_grad_(True)
    e = ent.detach().clone().requires_grad_(True)
    loss, met = ppo_policy_loss(
        x, old, adv, mask, ref_logp=ref, entropy=e, cu_seqlens=cu, impl=impl, **kw
    )
    loss.backward()
    x64 = logp.detach().double().requires_grad_(True)
    e64 = ent.detach().double().requires_grad_(True)
    loss64, met64 = ppo_policy_loss_reference(
        x64, old.double(), adv.double(), mask, ref_logp=ref.double(), entropy=e64,
        cu_seqlens=cu, **kw,
    )  # fmt: skip
    loss64.backward()
    return (loss, met, x.grad, e.grad), (loss64, met64, x64.grad, e64.grad)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ppo_matches_reference(impl, device, agg, layout):
    args = _batch(layout, device)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k3",
              entropy_coef=0.01, agg=agg)  # fmt: skip
    (loss, met, dx, de), (loss64, met64, dx64, de64) = _ppo_both(args, impl, **kw)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(dx, dx64, atol=1e-6, rtol=1e-5, name="dlogp")
    assert_close(de, de64, atol=1e-7, rtol=1e-5, name="dentropy")
    assert set(met) == set(met64)
    for k in met64:
        assert not met[k].requires_grad
        assert_close(met[k], met64[k], atol=1e-5, rtol=1e-5, name=k)
    assert 0 < met["clip_frac"].item() < 1 and met["dual_clip_frac"].item() > 0


@pytest.mark.parametrize("kl_kind", ["k1", "abs", "k2", "k1+st", "k3+st"])
def test_ppo_kl_kinds_and_bf16(impl, device, kl_kind):
    args = _batch("padded", device, torch.bfloat16)
    kw = dict(clip_low=0.1, clip_high=0.3, kl_coef=0.5, kl_kind=kl_kind, entropy_coef=0.02,
              agg="seq-mean-token-mean")  # fmt: skip
    (loss, met, dx, _), (loss64, met64, dx64, _) = _ppo_both(args, impl, **kw)
    assert dx.dtype == torch.bfloat16
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss")
    # bf16 gradients: within one bf16 rounding of the float64 gradient
    assert_close(dx, dx64, atol=1e-6, rtol=2**-8, name="dlogp")
    assert_close(met["kl"], met64["kl"], atol=1e-5, rtol=1e-5, name="kl")


def test_ppo_without_options_and_all_masked(impl, device):
    logp, old, adv, _, _, mask, _ = _batch("padded", device)
    x = logp.clone().requires_grad_(True)
    loss, met = ppo_policy_loss(x, old, adv, mask, impl=impl)
    x64 = logp.double().requires_grad_(True)
    loss64, met64 = ppo_policy_loss_reference(x64, old.double(), adv.double(), mask)
    loss.backward()
    loss64.backward()
    assert_close(loss, loss64, atol=1e-6, rtol=1e-5)
    assert_close(x.grad, x64.grad, atol=1e-7, rtol=1e-5)
    assert "kl" not in met and "entropy" not in met
    # nothing selected: the loss is 0 (not NaN) and so is every gradient
    x = logp.clone().requires_grad_(True)
    for agg in AGGS:
        loss, met = ppo_policy_loss(x, old, adv, torch.zeros_like(mask), agg=agg, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and met["ratio_max"].item() == 0.0
        assert bool((x.grad == 0).all())


def test_ppo_ignores_garbage_at_masked_positions(impl, device):
    logp, old, adv, _, _, mask, _ = _batch("padded", device)
    logp2 = torch.where(mask, logp, float("nan"))
    loss, _ = ppo_policy_loss(logp2, old, adv, mask, impl=impl)
    assert_close(loss, ppo_policy_loss(logp, old, adv, mask, impl=impl)[0], atol=1e-6)
    # ...but a NaN at a selected position propagates
    logp2[mask.nonzero()[0].tolist()] = float("nan")
    assert torch.isnan(ppo_policy_loss(logp2, old, adv, mask, impl=impl)[0])


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_value_loss_matches_reference(impl, device, agg, layout):
    v, old, ret, _, _, mask, cu = _batch(layout, device)
    old = v + torch.randn_like(v) * 0.3
    for clip in (0.2, None):
        x = v.clone().requires_grad_(True)
        loss, met = value_loss(x, old, ret, mask, clip=clip, agg=agg, cu_seqlens=cu, impl=impl)
        loss.backward()
        x64 = v.double().requires_grad_(True)
        loss64, met64 = value_loss_reference(x64, old.double(), ret.double(), mask, clip, agg, cu)
        loss64.backward()
        assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss")
        assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-5, name="dvalues")
        for k in met64:
            assert_close(met[k], met64[k], atol=1e-5, rtol=1e-5, name=k)
    assert met["clip_frac"].item() == 0.0  # clip=None never clips


def test_gradcheck_float64(device):
    # float64 runs the reference path in float64 (Triton has no float64): its autograd
    # through the op's wrapper, on every aggregation and KL kind.
    logp, old, adv, ref, ent, mask, _ = _batch("padded", device, torch.float64)
    sl = (slice(0, 3), slice(0, 6))
    logp, old, adv, ref, ent, mask = (t[sl] for t in (logp, old, adv, ref, ent, mask))
    x = logp.clone().requires_grad_(True)
    e = ent.clone().requires_grad_(True)
    for agg in AGGS:
        f = lambda x, e, agg=agg: ppo_policy_loss(
            x, old, adv, mask, dual_clip=2.0, ref_logp=ref, kl_coef=0.3, entropy=e,
            entropy_coef=0.1, agg=agg,
        )[0]  # fmt: skip
        assert torch.autograd.gradcheck(f, (x, e))
        g = lambda x, agg=agg: value_loss(x, old, adv, mask, clip=0.1, agg=agg)[0]
        assert torch.autograd.gradcheck(g, (x,))
    r = ref.clone().requires_grad_(True)
    # (the straight-through kinds have, by design, a gradient that is not their value's)
    for kind in ("k1", "abs", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda a, b, kind=kind: kl_penalty(a, b, kind), (x, r))


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "k1+st", "abs+st", "k2+st", "k3+st"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty_matches_reference(impl, device, kind, dtype):
    logp = (-torch.rand(7, 33, device=device) * 5).to(dtype)
    ref = (logp.float() + torch.randn(7, 33, device=device) * 2).to(dtype)
    ref[0, :3] = logp[0, :3] + 30.0  # beyond the k3 clamps
    g = torch.randn(7, 33, device=device)
    x, r = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    out = kl_penalty(x, r, kind, impl=impl)
    (out * g).sum().backward()
    x64, r64 = logp.double().requires_grad_(True), ref.double().requires_grad_(True)
    out64 = kl_penalty_reference(x64, r64, kind)
    (out64 * g.double()).sum().backward()
    xs, rs = logp.float().requires_grad_(True), ref.float().requires_grad_(True)
    same = kl_penalty_reference(xs, rs, kind)
    (same * g).sum().backward()
    assert out.dtype == torch.float32
    assert_close_to_reference(out, out64, same, atol=1e-6, name="kl")
    rtol = 2**-8 if dtype == torch.bfloat16 else 0.0
    assert_close(x.grad, x64.grad, atol=1e-5, rtol=rtol, name="dlogp")
    assert_close(r.grad, r64.grad, atol=1e-5, rtol=rtol, name="dref")


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_dpo_loss_matches_reference(device, kind):
    b = 9
    lengths_c = torch.randint(5, 40, (b,), device=device)
    lengths_r = torch.randint(5, 40, (b,), device=device)
    pc = -torch.rand(b, device=device, dtype=torch.float64) * lengths_c * 2
    pr = -torch.rand(b, device=device, dtype=torch.float64) * lengths_r * 2
    rc = pc + torch.randn(b, device=device, dtype=torch.float64)
    rr = pr + torch.randn(b, device=device, dtype=torch.float64)
    beta = 0.3 if kind != "ipo" else 0.5
    ls = 0.1 if kind in ("sigmoid", "simpo") else 0.0
    refs = (None, None) if kind in ("simpo", "orpo") else (rc, rr)
    x, y = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    loss, met = dpo_loss(x, y, *refs, beta, kind, label_smoothing=ls, gamma=0.7,
                         chosen_lengths=lengths_c, rejected_lengths=lengths_r)  # fmt: skip
    loss.backward()
    x2, y2 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    loss2 = dpo_loss_reference(x2, y2, *refs, beta, kind, ls, lengths_c, lengths_r, gamma=0.7)
    loss2.backward()
    assert_close(loss, loss2, atol=1e-10, rtol=1e-10)
    assert_close(x.grad, x2.grad, atol=1e-10, rtol=1e-8, name="d chosen")
    assert_close(y.grad, y2.grad, atol=1e-10, rtol=1e-8, name="d rejected")
    if kind in ("simpo", "orpo"):
        chosen, rejected = beta * pc / lengths_c, beta * pr / lengths_r
    else:
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    assert_close(met["chosen_rewards"], chosen.mean(), atol=1e-12)
    assert_close(met["rejected_rewards"], rejected.mean(), atol=1e-12)
    assert_close(met["margins"], (chosen - rejected).mean(), atol=1e-12)
    assert_close(met["reward_accuracy"], (chosen > rejected).double().mean(), atol=0.0)
    assert not any(m.requires_grad for m in met.values())


def test_bad_inputs_raise(device):
    logp, old, adv, ref, _, mask, _ = _batch("padded", device)
    with pytest.raises(ValueError, match="needs ref_logp"):
        ppo_policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="agg must be one of"):
        ppo_policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="kl_kind must be one of"):
        ppo_policy_loss(logp, old, adv, mask, ref_logp=ref, kl_kind="k4")
    with pytest.raises(ValueError, match=r"advantages must have the shape of logp \(5, 37\)"):
        ppo_policy_loss(logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"logp must be \[B, T\]"):
        ppo_policy_loss(logp.view(-1), old.view(-1), adv.view(-1), mask.view(-1))
    with pytest.raises(ValueError, match="with cu_seqlens, values must be packed"):
        value_loss(logp, old, adv, mask, cu_seqlens=torch.tensor([0, 5], device=device))
    with pytest.raises(TypeError, match="logp must have dtype"):
        kl_penalty(logp.long(), ref)
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_penalty(logp, ref, "k5")
    with pytest.raises(ValueError, match="needs ref_chosen_logp"):
        dpo_loss(logp[:, 0], old[:, 0], None, None, 0.1, "sigmoid")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(logp[:, 0], old[:, 0], kind="simpo")


# cu_seqlens that are not a packed layout of N = 180 tokens, with packed_gae's message
_END = r"cu_seqlens must end at total_tokens = 180 \(len\(\w+\)\); got cu_seqlens\[2\] = "
BAD_LAYOUTS = [
    ([2, 5, 180], r"cu_seqlens must start at 0; got cu_seqlens\[0\] = 2"),
    ([0, 50, 40, 180], r"cu_seqlens must not decrease; got cu_seqlens\[1\] = 50 > cu_seqlens\[2\]"),
    ([0, 5, 170], _END + "170"),
    ([0, 5, 1000], _END + "1000"),
]


def _loss_ops(impl, device, cu, validate=True):
    """ppo_policy_loss and value_loss on one packed batch: [(name, loss, grad)]."""
    torch.manual_seed(0)
    logp, old, adv, ref, ent, mask, _ = _batch("packed", device)
    cu = torch.tensor(cu, dtype=torch.int32, device=device)
    out = []
    for name in ("ppo_policy_loss", "value_loss"):
        x = logp.clone().requires_grad_(True)
        if name == "ppo_policy_loss":
            loss, _ = ppo_policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy=ent,
                                      cu_seqlens=cu, validate=validate, impl=impl)  # fmt: skip
        else:
            loss, _ = value_loss(x, old, adv, mask, cu_seqlens=cu, validate=validate, impl=impl)
        loss.backward()
        out.append((name, loss, x.grad))
    return out


@pytest.mark.parametrize("cu,message", BAD_LAYOUTS)
def test_packed_layout_is_validated_like_packed_gae(impl, device, cu, message):
    x = torch.zeros(180, device=device)
    bad = torch.tensor(cu, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=f"ppo_policy_loss: {message}"):
        ppo_policy_loss(x, x, x, x > -1, cu_seqlens=bad, impl=impl)
    with pytest.raises(ValueError, match=f"value_loss: {message}"):
        value_loss(x, x, x, x > -1, cu_seqlens=bad, impl=impl)


@pytest.mark.parametrize("cu,_", BAD_LAYOUTS)
def test_unvalidated_bad_layout_stays_in_bounds(impl, device, cu, _):
    """validate=False: wrong sums, but finite, and offsets act as if clamped into [0, N]."""
    results = _loss_ops(impl, device, cu, validate=False)
    for name, loss, grad in results:
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()), name
    if impl == "triton" and cu[-1] > N_PACKED:  # the kernels clamp the last offset to N
        clamped = [min(max(c, 0), N_PACKED) for c in cu]
        for (name, loss, grad), (_, loss_c, grad_c) in zip(
            results, _loss_ops(impl, device, clamped, validate=False)
        ):
            assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c), name


@pytest.mark.gpu
def test_ppo_and_value_do_not_sync_on_gpu():
    logp, old, adv, ref, ent, mask, cu = _batch("packed", "cuda")
    x = logp.clone().requires_grad_(True)
    # validate=False: the layout check is a host sync (it reads cu_seqlens)
    ppo_policy_loss(x, old, adv, mask, ref_logp=ref, entropy=ent, cu_seqlens=cu, validate=False)
    value_loss(x, old, adv, mask, cu_seqlens=cu, validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, met = ppo_policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy=ent,
                                    entropy_coef=0.01, cu_seqlens=cu, validate=False)  # fmt: skip
        vl, vm = value_loss(x, old, adv, mask, cu_seqlens=cu, validate=False)
        (loss + vl).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    loss64, _ = ppo_policy_loss_reference(x.double(), old.double(), adv.double(), mask,
                                    ref_logp=ref.double(), kl_coef=0.1, entropy=ent.double(),
                                    entropy_coef=0.01, cu_seqlens=cu)  # fmt: skip
    assert_close(loss, loss64, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_ppo_large_batch_on_gpu():
    # Many programs race for the last ticket: the two-level reduction must still be exact.
    b, t = 2048, 513
    logp = -torch.rand(b, t, device="cuda") * 3
    old = logp + torch.randn_like(logp) * 0.2
    adv = torch.randn_like(logp)
    mask = torch.rand(b, t, device="cuda") > 0.1
    for agg in AGGS:
        x = logp.clone().requires_grad_(True)
        loss, met = ppo_policy_loss(x, old, adv, mask, agg=agg)
        loss.backward()
        x64 = logp.double().requires_grad_(True)
        loss64, met64 = ppo_policy_loss_reference(x64, old.double(), adv.double(), mask, agg=agg)
        loss64.backward()
        assert_close(loss, loss64, atol=1e-5, rtol=1e-4)
        assert_close(x.grad, x64.grad, atol=1e-9, rtol=1e-4)
        assert_close(met["ratio_max"], met64["ratio_max"], rtol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_two_level_reduction_with_many_groups(device, layout, monkeypatch):
    """Groups of 2 sequences (the GPU picks ~sqrt(S)): the per-group reductions, a
    partial last group, the max metric across groups and the final reduction."""
    import fastrlhf.kernels.losses as kls

    blocks = kls._blocks
    monkeypatch.setattr(kls, "_blocks", lambda n, s: (blocks(n, s)[0], 2, blocks(n, s)[2]))
    args = _batch(layout, device)
    for agg in AGGS:
        kw = dict(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, agg=agg)
        (loss, met, dx, _), (loss64, met64, dx64, _) = _ppo_both(args, "triton", **kw)
        assert_close(loss, loss64, atol=1e-5, rtol=1e-5, name="loss")
        assert_close(dx, dx64, atol=1e-6, rtol=1e-5, name="dlogp")
        for k in met64:
            assert_close(met[k], met64[k], atol=1e-5, rtol=1e-5, name=k)
        logp, old, adv, ref, ent, mask, cu = args
        v, _ = value_loss(logp, old, adv, mask, clip=0.2, agg=agg, cu_seqlens=cu, impl="triton")
        v64, _ = value_loss_reference(logp.double(), old.double(), adv.double(), mask, 0.2, agg, cu)
        assert_close(v, v64, atol=1e-5, rtol=1e-5, name="value loss")


def test_backward_materializes_no_zero_gradient_for_partials(impl, device):
    """The per-sequence partials are an output without a gradient: the backward must not
    get (allocate and fill) an [S, K] zero tensor for them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    logp, old, adv, _, _, mask, cu = _batch("packed", device)
    s = len(CU) - 1

    class Shapes(TorchDispatchMode):
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # views (the saved partials unpacked by autograd) allocate nothing
            if func.is_view:
                return out
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == s:
                self.made.append(str(func))
            return out

    for fn in (ppo_policy_loss, value_loss):
        x = logp.clone().requires_grad_(True)
        loss, _ = fn(x, old, adv, mask, cu_seqlens=cu, impl=impl)
        with Shapes() as mode:
            (dx,) = torch.autograd.grad(loss, x)
        assert mode.made == [], f"{fn.__name__} backward made [S, K] tensors: {mode.made}"
        assert bool(torch.isfinite(dx).all())
