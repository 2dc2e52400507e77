"""``linear_token_logprobs``: log p(label) (and entropy) straight from hidden states and the
lm_head weight, without ever holding the [N, V] logits.

Shapes: N = tokens (leading dims of ``hidden`` / ``labels`` flattened), H = hidden size,
V = vocabulary in use (``vocab_size`` <= weight rows; extra rows of a padded lm_head are
never read and get a zero gradient), Vb = one vocabulary block.

    z        = head(hidden @ weight[:V].T + bias[:V]) / T   # float32 accumulation
    head(x)  = softcap * tanh(x * logit_scale / softcap)     (x * logit_scale without a cap)
    logp     = z[label] - logsumexp(z)   (0 at ignore_index, NaN for an out-of-range label)
    entropy  = logsumexp(z) - sum softmax(z) * z           (every row)

Forward: an online logsumexp over vocabulary tiles (Triton) or blocks (PyTorch); only
O(N) statistics survive: lse, and the entropy when asked. Backward: for each block of
Vb vocabulary columns, the logits are recomputed and turned into
``dlogits = (g * (onehot - p) - g_ent * p * (log p + entropy)) / T`` in a bounded
[N, Vb] buffer of the model dtype (as an unfused backward rounds them), then

    dW[block] = dlogits.T @ hidden      one matmul over all N: float32 accumulation,
                                        rounded once, no float32 [V, H] buffer
    dH       += dlogits @ W[block]      in place into a float32 [N, H] accumulator
    db[block] = dlogits.sum(0)

With a soft-cap, dlogits is further multiplied by d head / dx = logit_scale * (1 - tanh^2)
(head_slope: 4t / (1 + t)^2, no cancellation where tanh saturates), so dH / dW are
w.r.t. the raw logits.

Exact up to rounding (no gradient filtering). Extra memory: O(N * H) float32 for dH and
one [N, Vb] block, with Vb chosen so the block stays near a fixed size whatever V is.

Backends (``impl=``), the first two behind one ``fastrlhf::linear_token_logprobs`` op
(``ops._library``; torch.compile traces callers): "triton" (``tl.dot`` kernels in
fastrlhf.kernels.linear_logprobs, the "auto" choice for CUDA tensors that are not
float64; on CPU tensors only under TRITON_INTERPRET=1, for tests), "torch" (the same
blocks with torch.mm, the "auto" choice otherwise) and "reference"
(``fastrlhf.ops.reference.linear_token_logprobs_reference``, which holds [N, V]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastrlhf.ops._checks import (
    check_head,
    check_labels_in_range,
    check_logits_labels,
    check_positive_float,
    check_same_device,
    check_tensor,
    describe,
)
from fastrlhf.ops._labels import label_masks
from fastrlhf.ops._library import fused_op, resolve_impl
from fastrlhf.ops.reference.linear_logprobs import linear_token_logprobs_reference
from fastrlhf.ops.reference.logprobs import head_slope

_LOW = (torch.float16, torch.bfloat16)
# Elements of one [N, Vb] block. torch path: float32 logits plus ~3 temporaries of that
# size (64 MB each). Triton backward: the dlogits buffer in the model dtype (64 MB at
# bf16) – large enough that the two cuBLAS matmuls per block run near peak.
_TORCH_BLOCK_ELEMS = 1 << 24
_TRITON_BLOCK_ELEMS = 1 << 25


def _vocab_block(n: int, v: int, elems: int) -> int:
    """Vocabulary columns per block: ~``elems / n``, a multiple of 256, at most V."""
    vb = max(256, elems // max(n, 1) // 256 * 256)
    return max(1, min(vb, v))


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with float32 accumulation and a float32 (float64 for float64) result."""
    if a.dtype in _LOW or b.dtype in _LOW:
        if a.is_cuda and a.dtype == b.dtype:
            return torch.mm(a, b, torch.float32)  # cuBLAS, float32 output: no bf16 rounding
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b, accumulated in float32 and rounded once to out.dtype."""
    if out.dtype == a.dtype == b.dtype and (a.is_cuda or a.dtype not in _LOW):
        torch.mm(a, b, out=out)  # cuBLAS accumulates bf16 products in float32
    else:
        out.copy_(_mm_f32(a, b))


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place, acc float32 (float64): no [rows(a), cols(b)] temporary."""
    if a.dtype in _LOW and acc.dtype == torch.float32:
        if a.is_cuda and a.dtype == b.dtype:
            # cuBLAS: low-precision operands, C read and written in float32 (beta = 1)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        a, b = a.float(), b.float()  # CPU: block-sized upcasts ([N, Vb], [Vb, H])
    acc.addmm_(a, b)


def _mm_operand(hidden: Tensor) -> Tensor:
    # CPU has no bf16 x bf16 -> float32 matmul: upcast hidden once, not once per block.
    return hidden.float() if hidden.dtype in _LOW and not hidden.is_cuda else hidden


def _head(
    inv_temp: float, softcap: float | None, scale: float
) -> tuple[float, float | None, float]:
    """(inv_temp, cap, pre) as the kernels take them (kernels.logprobs.head_args): without a
    cap the scale joins inv_temp; with one, x -> cap * tanh(x * pre), pre = scale / cap."""
    if softcap is None:
        return inv_temp * scale, None, 1.0
    return inv_temp, softcap, scale / softcap


def _block_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, v_lo: int, v_hi: int, head: tuple
) -> Tensor:
    inv_temp, cap, pre = head
    z = _mm_f32(h, weight[v_lo:v_hi].t())  # [N, Vb]
    if bias is not None:
        z += bias[v_lo:v_hi]
    if cap is not None:
        z = z.mul_(pre).tanh_().mul_(cap)
    return z.mul_(inv_temp)


# ---------------------------------------------------------------------------- torch path


def _fwd_torch(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    head: tuple,
    v: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(z[label] - lse, entropy or [0], lse) by an online logsumexp over vocabulary blocks."""
    n = hidden.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    h = _mm_operand(hidden)
    m = torch.full((n,), -math.inf, device=hidden.device, dtype=acc)  # running max
    s = torch.zeros_like(m)  # running sum exp(z - m)
    t = torch.zeros_like(m)  # running sum exp(z - m) * z
    y = torch.zeros_like(m)  # z[label]
    vb = _vocab_block(n, v, _TORCH_BLOCK_ELEMS)
    for v_lo in range(0, v, vb):
        v_hi = min(v_lo + vb, v)
        z = _block_logits(h, weight, bias, v_lo, v_hi, head)  # [N, Vb]
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)  # 0 on the first block, where m = -inf
        e = torch.sub(z, m_new[:, None]).exp_()  # [N, Vb]
        s = s * alpha + e.sum(1)
        if with_entropy:
            t = t * alpha + e.mul_(z).sum(1)
        m = m_new
        in_block = (labels >= v_lo) & (labels < v_hi)
        idx = (labels - v_lo).clamp(0, v_hi - v_lo - 1)
        y = torch.where(in_block, z.gather(1, idx[:, None]).squeeze(1), y)
    lse = m + torch.log(s)
    entropy = lse - t / s if with_entropy else lse.new_empty(0)
    return y - lse, entropy, lse


def _dlogits_torch(
    h: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    g: Tensor,
    g_ent: Tensor | None,
    head: tuple,
    v_lo: int,
    v_hi: int,
    out: Tensor,
) -> Tensor:
    # In place where possible: on CPU each pass over [N, Vb] costs about as much as the
    # matmul. Scaling g (O(N)) by 1/T up front makes dz below dlogits directly.
    inv_temp, cap, pre = head
    g = g * inv_temp
    head_grad = None
    if cap is None:
        z = _block_logits(h, weight, bias, v_lo, v_hi, head)  # [N, Vb]
    else:  # d head / dx = scale * (1 - tanh^2), from the raw logits (head_slope)
        x = _block_logits(h, weight, bias, v_lo, v_hi, (1.0, None, 1.0))  # [N, Vb] raw
        head_grad = head_slope(x, cap, cap * pre)
        z = x.mul_(pre).tanh_().mul_(cap * inv_temp)
    logp = z.sub_(lse[:, None])  # [N, Vb]
    p = logp.exp()  # [N, Vb]
    if g_ent is not None:
        # dz = -g p - g_ent p (log p + entropy), as d entropy / dz = -p (log p + entropy)
        coeff = logp.add_(entropy[:, None]).mul_((g_ent * inv_temp)[:, None]).add_(g[:, None])
        dz = p.mul_(coeff).neg_()
    else:
        dz = p.mul_(-g[:, None])
    in_block = (labels >= v_lo) & (labels < v_hi)
    idx = (labels - v_lo).clamp(0, v_hi - v_lo - 1)
    dz.scatter_add_(1, idx[:, None], torch.where(in_block, g, 0.0)[:, None])  # + g * onehot
    if head_grad is not None:
        dz.mul_(head_grad)
    return out.copy_(dz)


# ------------------------------------------------------------------- backward, the op


def _backward(
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
    needs: tuple[bool, bool, bool],
    use_triton: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    need_h, need_w, need_b = needs
    n, _ = hidden.shape
    v, inv_temp, acc = vocab_size, 1.0 / temperature, lse.dtype
    ignored, bad, _ = label_masks(labels, ignore_index, v)
    # An ignored row has no log-prob gradient; an out-of-range label gets NaN gradients,
    # as its forward value is NaN.
    g = grad_logprobs.to(acc).masked_fill(ignored, 0.0).masked_fill(bad, math.nan)
    # contiguous(): the gradient of a .sum() arrives as an expanded, stride-0 tensor
    g_ent = grad_entropy.to(acc).contiguous() if grad_entropy is not None else None
    # A gradient not asked for is an empty tensor; each a distinct one, as a custom op's
    # outputs may not alias each other.
    empty = lambda: hidden.new_empty(0)
    dh = torch.zeros(hidden.shape, device=hidden.device, dtype=acc) if need_h else None
    dw = torch.empty_like(weight) if need_w else empty()  # every block writes its rows
    if need_w:
        dw[v:].zero_()  # rows of a padded lm_head past vocab_size
    db = torch.zeros_like(bias) if need_b and bias is not None else empty()
    if not (need_h or need_w or need_b):
        return empty(), dw, db
    h = hidden if use_triton else _mm_operand(hidden)
    vb = _vocab_block(n, v, _TRITON_BLOCK_ELEMS if use_triton else _TORCH_BLOCK_ELEMS)
    buf = hidden.new_empty((n, vb))  # dlogits in the model dtype, as an unfused backward
    for v_lo in range(0, v, vb):
        v_hi = min(v_lo + vb, v)
        dl = buf[:, : v_hi - v_lo]  # [N, Vb]
        if use_triton:
            from fastrlhf.kernels.linear_logprobs import linear_logprobs_dlogits

            linear_logprobs_dlogits(
                hidden, weight, labels, bias, lse, entropy, g, g_ent, inv_temp, v, v_lo, v_hi, dl,
                softcap, logit_scale,
            )  # fmt: skip
        else:
            head = _head(inv_temp, softcap, logit_scale)
            _dlogits_torch(h, weight, labels, bias, lse, entropy, g, g_ent, head, v_lo, v_hi, dl)
        if need_w:
            _mm_into(dw[v_lo:v_hi], dl.t(), hidden)  # [Vb, H]
        if need_h:
            _addmm_f32_(dh, dl, weight[v_lo:v_hi])  # [N, H] += [N, Vb] @ [Vb, H]
        if need_b and bias is not None:
            db[v_lo:v_hi] = dl.sum(0, dtype=acc)
    return (dh.to(hidden.dtype) if need_h else empty()), dw, db


# ---------------------------------------------------------------- torch.library op


def _fake(
    hidden, weight, labels, bias, temperature, ignore_index, vocab_size, ret_ent, impl, softcap,
    logit_scale,
):  # fmt: skip
    n = hidden.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    entropy = hidden.new_empty((n if ret_ent else 0,), dtype=acc)
    return hidden.new_empty((n,), dtype=acc), entropy, hidden.new_empty((n,), dtype=acc)


def _op_backward(a, outputs, grads, needs):
    _, entropy, lse = outputs
    grad_logprobs = grads[0] if grads[0] is not None else torch.zeros_like(lse)
    grad_entropy = grads[1] if a.return_entropy else None
    dh, dw, db = _backward(
        grad_logprobs, grad_entropy, a.hidden, a.weight, a.labels, a.bias, lse, entropy,
        a.temperature, a.ignore_index, a.vocab_size, tuple(needs), use_triton=a.impl == "triton",
        softcap=a.softcap, logit_scale=a.logit_scale,
    )  # fmt: skip
    return [g if need else None for g, need in zip((dh, dw, db), needs)]


@fused_op(
    "linear_token_logprobs",
    fake=_fake,
    backward=_op_backward,
    differentiable=("hidden", "weight", "bias"),
)
def _op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
    return_entropy: bool,
    impl: str,
    softcap: float | None,
    logit_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs [N], entropy [N] or [0], lse [N])."""
    if impl == "triton":
        from fastrlhf.kernels.linear_logprobs import linear_logprobs_fwd

        raw, entropy, lse = linear_logprobs_fwd(
            hidden, weight, labels, bias, 1.0 / temperature, vocab_size, return_entropy,
            softcap=softcap, logit_scale=logit_scale,
        )  # fmt: skip
    else:
        head = _head(1.0 / temperature, softcap, logit_scale)
        raw, entropy, lse = _fwd_torch(
            hidden, weight, labels, bias, head, vocab_size, return_entropy
        )
    ignored, bad, _ = label_masks(labels, ignore_index, vocab_size)
    return raw.masked_fill(bad, math.nan).masked_fill(ignored, 0.0), entropy, lse


# ---------------------------------------------------------------------- public API


def _check_inputs(
    hidden: object,
    weight: object,
    labels: object,
    bias: object,
    temperature: object,
    vocab_size: object,
) -> int:
    """Raise a clear error for bad input (the same ones as token_logprobs, with hidden in
    the place of logits); return the vocabulary size in use."""
    check_logits_labels(hidden, labels, logits_name="hidden")
    check_positive_float("temperature", temperature)
    weight = check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    if bias is not None:
        bias = check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}; "
            f"weight has {describe(weight)}"
        )
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"bias must be [V] with V = weight.shape[0] = {weight.shape[0]}; "
            f"bias has {describe(bias)}"
        )
    v = weight.shape[0]
    if vocab_size is None:
        vocab_size = v
    elif isinstance(vocab_size, bool) or not (isinstance(vocab_size, int) and 0 < vocab_size <= v):
        raise ValueError(
            f"vocab_size must be an int in [1, {v}] (weight.shape[0]); got {vocab_size!r}"
        )
    return vocab_size


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    *,
    vocab_size: int | None = None,
    validate: bool = True,
    impl: str = "auto",
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(labels | hidden) under the lm_head ``weight`` [V, H] (and ``bias`` [V]).

    hidden [..., H] and labels [...] (int32/int64) give float32 log-probs [...] (float64
    for float64 inputs), and with ``return_entropy`` also the entropy [...] of
    softmax(logits / temperature). Positions labelled ``ignore_index`` get log-prob 0
    and no gradient. ``vocab_size`` uses only the first rows of a padded lm_head.
    Differentiable in hidden, weight and bias: pass an embedding matrix as ``weight``
    for tied embeddings and its gradient accumulates there.

    ``validate=True`` checks that labels are in [0, vocab_size) (one device sync); with
    ``validate=False`` a bad label gives NaN at its position, never an out-of-bounds read.
    ``softcap`` / ``logit_scale``: the model's post-head transform, in HF's order and
    before the temperature: logits -> ``softcap * tanh(logits * logit_scale / softcap)``
    (no cap: ``logits * logit_scale``); gradients flow through it.
    ``impl``: "auto" (Triton on CUDA, PyTorch blocks otherwise), "triton", "torch" or
    "reference" (see the module docstring).
    """
    v = _check_inputs(hidden, weight, labels, bias, temperature, vocab_size)
    softcap, logit_scale = check_head(softcap, logit_scale)
    impl = resolve_impl("linear_token_logprobs", impl, hidden)
    if validate:
        check_labels_in_range(labels, v, ignore_index)
    if impl == "reference":
        return linear_token_logprobs_reference(
            hidden, weight, labels, bias, temperature, ignore_index, return_entropy, v,
            softcap=softcap, logit_scale=logit_scale,
        )  # fmt: skip
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    if h.stride(-1) != 1:
        h = h.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    logprobs, entropy, _ = _op(
        h, weight, labels.reshape(-1).contiguous(), bias, float(temperature), int(ignore_index), v,
        bool(return_entropy), impl, softcap, logit_scale,
    )  # fmt: skip
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs
