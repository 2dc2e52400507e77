"""torch.compile(fullgraph=True) traces every fused op (they are torch.library custom ops).

On CPU this runs Inductor (C++ codegen through gcc) around the ops, which run their
Triton kernels through the interpreter; on CUDA the same test compiles for the GPU.
Kept tiny: compile time dominates.
"""

from __future__ import annotations

import pytest
import torch

from fastrlhf.ops import dpo_loss, kl_penalty, ppo_policy_loss, token_logprobs, value_loss
from tests.helpers import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _step(logits, labels, old, adv, ref, mask, cu):
    # impl="triton": the custom ops (their Triton kernels run through the interpreter on
    # CPU); validate=False: the checks read tensors on the host, a graph break.
    lp, h = token_logprobs(
        logits[:, :-1], labels, 0.8, return_entropy=True, validate=False, impl="triton"
    )
    kl = kl_penalty(lp, ref, "k3+st", impl="triton")
    loss, met = ppo_policy_loss(
        lp, old, adv, mask, dual_clip=3.0, ref_logp=ref, kl_coef=0.1, entropy=h,
        entropy_coef=0.01, agg="seq-mean-token-mean", impl="triton",
    )  # fmt: skip
    vl, _ = value_loss(lp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1),
                       cu_seqlens=cu, validate=False, impl="triton")  # fmt: skip
    dl, dmet = dpo_loss(lp.sum(1), old.sum(1), ref.sum(1), adv.sum(1), 0.1, "sigmoid")
    return loss + vl + dl + kl.mean(), met["clip_frac"], dmet["reward_accuracy"]


@pytest.mark.slow  # cold Inductor compile through gcc: ~75 s on a busy 2-core machine
@pytest.mark.parametrize("backend", ["inductor"])
def test_fullgraph_compile_gives_the_same_numbers(device, backend):
    b, t, v = 2, 5, 301
    logits = torch.randn(b, t + 1, v, device=device) * 2
    labels = torch.randint(0, v, (b, t), device=device)
    labels[0, 0] = -100
    old = -torch.rand(b, t, device=device) * 3
    adv = torch.randn(b, t, device=device)
    ref = -torch.rand(b, t, device=device) * 3
    mask = torch.rand(b, t, device=device) > 0.2
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)

    def run(fn):
        x = logits.clone().requires_grad_(True)
        out = fn(x, labels, old, adv, ref, mask, cu)
        out[0].backward()
        return [o.detach() for o in out], x.grad

    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    (c_loss, c_clip, c_acc), c_grad = run(compiled)
    (e_loss, e_clip, e_acc), e_grad = run(_step)
    assert_close(c_loss, e_loss, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(c_clip, e_clip, atol=0.0, name="clip_frac")
    assert_close(c_acc, e_acc, atol=0.0, name="reward_accuracy")
    assert_close(c_grad, e_grad, atol=1e-6, rtol=1e-5, name="dlogits")


def test_opcheck_every_fused_op(device):
    """torch.library.opcheck on each op ops/_library generated: schema, fake, autograd."""
    import fastrlhf.ops.logprobs  # noqa: F401  (registers the ops)
    import fastrlhf.ops.losses  # noqa: F401

    n = 7
    x = torch.randn(n, device=device, requires_grad=True)
    r = torch.randn(n, device=device)
    mask = (torch.rand(n, device=device) > 0.3).view(torch.uint8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    ent = torch.rand(n, device=device, requires_grad=True)
    logits = torch.randn(2, 4, 50, device=device, requires_grad=True)
    labels = torch.randint(0, 45, (8,), device=device)
    ops = torch.ops.fastrlhf
    cases = [
        (ops.kl_penalty.default, (x, r, "k3")),
        (ops.ppo_policy_loss.default,
         (x, r, r, mask, r, ent, cu, 0, 2, 0.2, 0.2, 3.0, 0.1, "k2", 0.01, 1)),
        (ops.value_loss.default, (x, r, r, mask, None, 7, 1, 0.2, 0)),
    ]  # fmt: skip
    for impl in ("triton", "torch"):
        for softcap, scale in ((None, 1.0), (5.0, 0.5)):  # no head transform; cap and scale
            args = (logits, labels, 0.7, -100, 45, True, False, impl, softcap, scale)
            cases.append((ops.token_logprobs.default, args))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_impl_of_the_losses_traces_fullgraph(device):
    """impl="torch" (the reference, which CPU "auto" runs) has no host sync: one graph."""
    n = 40
    x = torch.randn(n, device=device, requires_grad=True)
    r = torch.randn(n, device=device)
    m = torch.rand(n, device=device) > 0.3
    cu = torch.tensor([0, 10, 25, 40], dtype=torch.int32, device=device)

    def f(x):
        kw = dict(cu_seqlens=cu, validate=False, impl="torch")
        loss, met = ppo_policy_loss(
            x, r, r, m, ref_logp=r, kl_coef=0.1, entropy=r, agg="seq-mean-token-mean", **kw
        )
        vl, _ = value_loss(x, r, r, m, **kw)
        return loss + vl + kl_penalty(x, r, impl="torch").mean(), met["ratio_max"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (c_loss, c_max), (e_loss, e_max) = compiled(x), f(x)
    assert_close(c_loss, e_loss, atol=1e-6, name="loss")
    assert_close(c_max, e_max, atol=0.0, name="ratio_max")
    c_grad, e_grad = (torch.autograd.grad(v, x)[0] for v in (c_loss, e_loss))
    assert_close(c_grad, e_grad, atol=1e-7, name="dx")
