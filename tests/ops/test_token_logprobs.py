"""token_logprobs against the float64 reference, on both paths.

"triton": the Triton kernels (through the interpreter on CPU, compiled on CUDA);
"torch": the chunked PyTorch path that CPU production runs use (chosen by impl=, so
it is tested on every machine).
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastrlhf.ops.logprobs as lp_mod
from fastrlhf.ops import token_logprobs
from fastrlhf.ops._library import resolve_impl
from fastrlhf.ops.reference import token_logprobs_reference
from tests.helpers import assert_close, assert_close_to_reference

# The interpreter evaluates both branches of tl.where with numpy: -inf - -inf in the
# branch that is thrown away warns, although the result is right.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(params=["triton", "torch"])
def lp_op(request):
    """token_logprobs on one backend, chosen by impl=."""
    return functools.partial(token_logprobs, impl=request.param)


def _inputs(shape, v, dtype, device, *, vocab=None, ignore_frac=0.2):
    logits = (torch.randn(*shape, v, device=device) * 4).to(dtype)
    labels = torch.randint(0, vocab or v, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "v,shape", [(3000, (3, 5)), (32000, (2, 3)), (50257, (3,)), (151936, (2,))]
)
def test_forward_matches_reference(lp_op, device, dtype, v, shape):
    logits, labels = _inputs(shape, v, dtype, device)
    logp, ent = lp_op(logits, labels, temperature=0.7, return_entropy=True)
    ref_lp, ref_h = token_logprobs_reference(logits.double(), labels, 0.7, return_entropy=True)
    same_lp, same_h = token_logprobs_reference(logits, labels, 0.7, return_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_close_to_reference(logp, ref_lp, same_lp, atol=2e-5, name="logp")
    assert_close_to_reference(ent, ref_h, same_h, atol=2e-5, name="entropy")
    assert bool((logp[labels == -100] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [3000, 50257])
def test_backward_matches_reference_on_strided_view(lp_op, device, dtype, v):
    # [B, T + 1, V] -> the usual logits[:, :-1] shift; T = 5 is no block multiple.
    full = (torch.randn(2, 6, v, device=device) * 3).to(dtype)
    labels = torch.randint(0, v, (2, 5), device=device)
    labels[0, 1] = -100
    g_lp = torch.randn(2, 5, device=device)
    g_h = torch.randn(2, 5, device=device)

    def grads(x, fn):
        x = x.detach().requires_grad_(True)
        lp, h = fn(x[:, :-1], labels, 0.7, return_entropy=True)
        ((lp * g_lp).sum() + (h * g_h).sum()).backward()
        return x.grad[:, :-1]

    ours = grads(full, lp_op)
    ref = grads(full.double(), token_logprobs_reference)
    same = grads(full, token_logprobs_reference)
    assert ours.dtype == dtype
    assert_close_to_reference(ours, ref, same, atol=1e-6, name="dlogits")


def test_strided_rows_are_not_copied():
    full = torch.randn(3, 8, 100)
    view = full[:, :-1]
    out, layout = lp_mod._row_layout(view)
    assert out.data_ptr() == full.data_ptr()
    assert layout == (7, 800, 100)
    out, layout = lp_mod._row_layout(full[1:, 2:5].unsqueeze(0))
    assert out.data_ptr() == full[1:, 2:5].data_ptr() and layout == (3, 800, 100)


def test_vocab_size_leaves_padding_out(lp_op, device):
    v, vocab = 3000, 2901
    logits, labels = _inputs((4, 3), v, torch.float32, device, vocab=vocab)
    logits[..., vocab:] = 50.0  # padded columns would dominate the softmax if counted
    x = logits.clone().requires_grad_(True)
    lp, h = lp_op(x, labels, 1.3, return_entropy=True, vocab_size=vocab)
    (lp.sum() + h.sum()).backward()
    x64 = logits.double().requires_grad_(True)
    rlp, rh = token_logprobs_reference(x64, labels, 1.3, return_entropy=True, vocab_size=vocab)
    (rlp.sum() + rh.sum()).backward()
    assert_close(lp, rlp, atol=2e-5, name="logp")
    assert_close(h, rh, atol=2e-5, name="entropy")
    assert_close(x.grad, x64.grad, atol=1e-6, name="dlogits")
    assert bool((x.grad[..., vocab:] == 0).all())
    # without vocab_size the padded columns are real logits
    lp_all = lp_op(logits, labels, 1.3)
    assert_close(lp_all, token_logprobs_reference(logits.double(), labels, 1.3), atol=2e-5)


def test_masked_vocabulary_gives_no_nan(lp_op, device):
    v = 5000
    logits, labels = _inputs((6,), v, torch.float32, device, ignore_frac=0.0)
    logits[:, ::3] = float("-inf")
    logits[0, :4999] = float("-inf")  # a row with a single finite logit
    labels[0] = 4999
    labels[1] = 3  # a label on a masked logit: log p = -inf, gradient still finite
    x = logits.clone().requires_grad_(True)
    lp, h = lp_op(x, labels, 0.9, return_entropy=True)
    (lp[2:].sum() + lp[0] + h.sum()).backward()
    x64 = logits.double().requires_grad_(True)
    rlp, rh = token_logprobs_reference(x64, labels, 0.9, return_entropy=True)
    (rlp[2:].sum() + rlp[0] + rh.sum()).backward()
    assert lp[1].item() == float("-inf")
    assert bool(torch.isfinite(h).all()) and bool(torch.isfinite(x.grad).all())
    assert abs(lp[0].item()) < 1e-6 and abs(h[0].item()) < 1e-6
    # rtol > 0: tests.helpers.assert_close forms atol + rtol * |ref|, which is NaN for an
    # infinite reference when rtol == 0.
    assert_close(lp, rlp, atol=2e-5, rtol=1e-7, name="logp")
    assert_close(h, rh, atol=2e-5, name="entropy")
    assert_close(x.grad, x64.grad, atol=5e-6, name="dlogits")


def test_nan_logits_propagate(lp_op, device):
    logits, labels = _inputs((4,), 3000, torch.float32, device, ignore_frac=0.0)
    logits[2, 1234] = float("nan")
    lp, h = lp_op(logits, labels, return_entropy=True)
    assert torch.isnan(lp[2]) and torch.isnan(h[2])
    assert bool(torch.isfinite(lp[[0, 1, 3]]).all())


def test_bad_label_is_nan_or_raises(lp_op, device):
    logits, labels = _inputs((2, 4), 3000, torch.float32, device, ignore_frac=0.0)
    labels[1, 2] = 3000
    labels[0, 3] = -7
    with pytest.raises(ValueError, match=r"labels\[0, 3\] = -7 is outside \[0, 3000\)"):
        lp_op(logits, labels)
    labels[0, 3] = 10**12  # far out: must not be read
    x = logits.clone().requires_grad_(True)
    lp = lp_op(x, labels, validate=False)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    bad[1, 2] = bad[0, 3] = True
    assert bool(torch.isnan(lp[bad]).all()) and bool(torch.isfinite(lp[~bad]).all())
    lp.nan_to_num().sum().backward()  # the loss is finite; the bad rows' gradient is NaN
    assert bool(torch.isnan(x.grad[bad]).all()) and bool(torch.isfinite(x.grad[~bad]).all())
    # vocab_size narrows the valid range
    with pytest.raises(ValueError, match="outside"):
        lp_op(logits, labels.clamp(0, 2999), vocab_size=2000)


def test_inplace_backward_writes_into_the_logits(lp_op, device):
    # As in a trainer: logits are an lm_head output (not a leaf), shifted by a view.
    hidden = torch.randn(2, 6, 16, device=device)
    weight = torch.randn(3000, 16, device=device)
    labels = torch.randint(0, 3000, (2, 5), device=device)
    g = torch.randn(2, 5, device=device)

    def run(inplace):
        h = hidden.clone().requires_grad_(True)
        logits = h @ weight.T  # [2, 6, V]
        lp = lp_op(logits[:, :-1], labels, 0.8, inplace_backward=inplace)
        last = logits[:, -1].clone()
        (lp * g).sum().backward()
        return h.grad, logits.detach(), last

    expected_grad, expected_logits, _ = run(False)
    grad, buf, last = run(True)
    assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5, name="dhidden")
    x = expected_logits.requires_grad_(True)
    (lp_op(x[:, :-1], labels, 0.8) * g).sum().backward()
    assert_close(buf[:, :-1], x.grad[:, :-1], atol=1e-7, name="dlogits in the logits buffer")
    assert torch.equal(buf[:, -1], last)  # the unused last position is left alone


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0), interpreter
@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_all_inf_row_raises_naming_it(impl, device):
    logits, labels = _inputs((2, 3), 3000, torch.float32, device, ignore_frac=0.0)
    logits[1, 2] = float("-inf")
    logits[0, 1, 7] = float("nan")  # a NaN row is not an all -inf row: it propagates
    with pytest.raises(ValueError, match=r"logits\[1, 2\] is -inf in all of its 3000 columns"):
        token_logprobs(logits, labels, impl=impl)
    # only the columns in use count: -inf there, finite padding after them
    logits[1, 2, 2900:] = 1.0
    with pytest.raises(ValueError, match=r"logits\[1, 2\] is -inf in all of its 2900 columns"):
        token_logprobs(logits, labels.clamp(max=2899), vocab_size=2900, impl=impl)
    lp = token_logprobs(logits, labels.clamp(max=2899), vocab_size=2900, validate=False, impl=impl)
    assert torch.isnan(lp[1, 2]) and torch.isnan(lp[0, 1])
    assert bool(torch.isfinite(lp[0, 0]))


def test_impl_is_checked(device):
    logits, labels = _inputs((3,), 50, torch.float64, device)
    with pytest.raises(ValueError, match="token_logprobs: impl must be one of"):
        token_logprobs(logits, labels, impl="cuda")
    with pytest.raises(TypeError, match="impl='triton' does not support float64"):
        token_logprobs(logits, labels, impl="triton")
    # auto: Triton only for CUDA tensors that are not float64; never the CPU interpreter
    assert resolve_impl("op", "auto", logits.float()) == ("triton" if logits.is_cuda else "torch")
    assert resolve_impl("op", "auto", logits) == "torch"


def test_gradcheck_float64(device):
    # float64 always runs the PyTorch path: this checks the autograd formula (logp and
    # entropy, temperature, padded vocab) through the same custom op and Function.
    logits = torch.randn(3, 2, 7, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([[1, -100], [5, 0], [2, 4]], device=device)

    def fn(x):
        lp, h = token_logprobs(x, labels, 0.7, return_entropy=True, vocab_size=6)
        return lp, h

    assert torch.autograd.gradcheck(fn, (logits,))


def test_leading_shapes_and_empty(lp_op, device):
    logits, labels = _inputs((2, 2, 3), 300, torch.float32, device)
    lp = lp_op(logits.transpose(0, 1), labels.transpose(0, 1))
    assert_close(lp, token_logprobs_reference(logits.double(), labels).transpose(0, 1), atol=2e-5)
    empty = lp_op(torch.randn(0, 5, device=device), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)
    one = lp_op(torch.randn(300, device=device), torch.tensor(7, device=device))
    assert one.shape == ()


def test_int32_labels_and_fp16(lp_op, device):
    logits, labels = _inputs((3, 4), 3000, torch.float16, device)
    lp = lp_op(logits, labels.int(), 1.5)
    assert_close_to_reference(
        lp, token_logprobs_reference(logits.double(), labels, 1.5),
        token_logprobs_reference(logits, labels, 1.5), atol=2e-5,
    )  # fmt: skip


def test_bad_inputs_raise_before_launch(device):
    logits = torch.randn(2, 3, 10, device=device)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="leading shape"):
        token_logprobs(logits, labels[:, :2])
    with pytest.raises(TypeError, match="logits must have dtype"):
        token_logprobs(logits.int(), labels)
    with pytest.raises(TypeError, match="labels must have dtype"):
        token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="one device"):
        token_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs(logits, labels, vocab_size=11)


def test_offsets_beyond_int32(lp_op):
    # Two rows 2^31 elements apart in one (lazily allocated, never touched) buffer: the
    # row offset overflows int32. Only the two rows' pages are ever written.
    v = 1000
    stride = (1 << 31) + 64
    try:
        buf = torch.empty(stride + v, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space here")
    rows = buf.as_strided((2, v), (stride, 1))
    rows.copy_(torch.randn(2, v) * 3)
    labels = torch.tensor([3, 997])
    x = rows.detach().requires_grad_(True)
    lp = lp_op(x, labels)
    lp.sum().backward()
    ref = rows.double().requires_grad_(True)
    token_logprobs_reference(ref, labels).sum().backward()
    assert_close(lp, token_logprobs_reference(rows.double(), labels), atol=2e-5)
    assert_close(x.grad, ref.grad, atol=1e-2, name="dlogits (bf16)")


@pytest.mark.gpu
def test_large_bf16_rows_beyond_int32_on_gpu():
    # N * V > 2^31 in one contiguous tensor, as in production (bf16 [14200, 151936]).
    n, v = 14200, 151936
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    logp, h = token_logprobs(logits, labels, return_entropy=True)
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    ref_lp, ref_h = token_logprobs_reference(
        logits[rows].double(), labels[rows], return_entropy=True
    )
    assert_close(logp[rows], ref_lp, atol=2e-5)
    assert_close(h[rows], ref_h, atol=2e-4)


@pytest.mark.gpu
def test_forward_allocates_no_vocab_sized_tensor_on_gpu():
    n, v = 1024, 151936
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    # warm-up with the measured call itself: autotuning (its key includes the entropy
    # flag) allocates, and must not depend on which test ran before
    token_logprobs(logits, labels, return_entropy=True, validate=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    token_logprobs(logits, labels, return_entropy=True, validate=False)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 20


# Post-head transforms (HF's order: scale, then softcap * tanh(. / softcap), then the
# temperature): Gemma2/3's final soft-cap, Cohere's logit_scale, Granite's 1/logits_scaling.
HEADS = [(30.0, 1.0), (None, 0.125), (5.0, 2.0)]


@pytest.mark.parametrize("softcap,scale", HEADS)
@pytest.mark.parametrize(
    "v,shape,dtype",
    [(3000, (3, 5), torch.bfloat16), (50257, (3,), torch.float32), (151936, (2,), torch.float32)],
)
def test_softcap_and_scale_match_reference(lp_op, device, softcap, scale, v, shape, dtype):
    # logits of size ~40: the cap bends them (tanh(40/30) = 0.87), unlike random-init ones
    logits = (torch.randn(*shape, v, device=device) * 40).to(dtype)
    labels = torch.randint(0, v, shape, device=device)
    labels.view(-1)[0] = -100
    head = dict(softcap=softcap, logit_scale=scale)
    g_lp, g_h = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def run(x, fn):
        x = x.detach().requires_grad_(True)
        lp, h = fn(x, labels, 0.7, return_entropy=True, **head)
        ((lp * g_lp).sum() + (h * g_h).sum()).backward()
        return lp, h, x.grad

    ours = run(logits, lp_op)
    ref = run(logits.double(), token_logprobs_reference)
    same = run(logits, token_logprobs_reference)
    for name, o, r, s in zip(("logp", "entropy", "dlogits"), ours, ref, same):
        assert_close_to_reference(o, r, s, atol=2e-5 if name != "dlogits" else 1e-6, name=name)
    # the transform matters: without it the log-probs differ
    plain = token_logprobs_reference(logits.double(), labels, 0.7)
    assert (plain - ref[0]).abs().max() > 1e-2


def test_softcap_reference_is_hf_formula(device):
    # the float64 reference against the transform written out (HF's Gemma2 / Cohere code)
    x = torch.randn(4, 50, dtype=torch.float64, device=device) * 30
    labels = torch.randint(0, 50, (4,), device=device)
    z = torch.tanh(x * 0.5 / 7.0) * 7.0 / 0.8
    want = torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    got = token_logprobs_reference(x, labels, 0.8, softcap=7.0, logit_scale=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_softcap_gradcheck_float64(device):
    logits = torch.randn(3, 2, 7, dtype=torch.float64, device=device) * 5
    logits.requires_grad_(True)
    labels = torch.tensor([[1, -100], [5, 0], [2, 4]], device=device)

    def fn(x):
        return token_logprobs(x, labels, 0.7, return_entropy=True, vocab_size=6,
                              softcap=3.0, logit_scale=1.5)  # fmt: skip

    assert torch.autograd.gradcheck(fn, (logits,))


def test_softcap_masked_vocabulary_and_padding(lp_op, device):
    # a -inf logit becomes -softcap (as in HF); padded columns stay out of the softmax
    logits = torch.randn(3, 40, device=device) * 10
    logits[0, 5:] = float("-inf")
    labels = torch.tensor([2, 7, -100], device=device)
    lp, h = lp_op(logits, labels, return_entropy=True, vocab_size=30, softcap=4.0)
    ref_lp, ref_h = token_logprobs_reference(
        logits.double(), labels, return_entropy=True, vocab_size=30, softcap=4.0
    )
    assert_close(lp, ref_lp, atol=1e-5)
    assert_close(h, ref_h, atol=1e-5)


def test_bad_softcap_or_scale_raises(device):
    logits = torch.randn(2, 10, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="softcap"):
        token_logprobs(logits, labels, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        token_logprobs(logits, labels, logit_scale=-1.0)
    with pytest.raises(TypeError, match="softcap"):
        token_logprobs(logits, labels, softcap="30")
