"""``token_logprobs``: per-token log p(label) (and entropy) from [..., V] logits, fused.

Shapes: N = tokens (the product of the logits' leading dims), V = logits' last dim,
V' = ``vocab_size`` (defaults to V; smaller for an lm_head wider than the tokenizer).

    z = head(logits[..., :V']) / temperature   head: * logit_scale, then softcap * tanh(. / softcap)
    logp[n]    = z[n, label[n]] - logsumexp(z[n])      (0 where label == ignore_index)
    entropy[n] = -sum_v softmax(z[n])_v * log softmax(z[n])_v

Backends (``impl=``; "auto" is Triton for CUDA tensors that are not float64):
- "triton": the kernels of ``fastrlhf.kernels.logprobs`` (one read of the logits
  forward; one read and one write backward, into a new buffer or, with
  ``inplace_backward=True``, into the logits).
- "torch": walks the rows in chunks of about 4M elements, so its extra memory is
  bounded and never [N, V]; float64 logits compute in float64 (gradcheck uses it).
- "reference": ``fastrlhf.ops.reference.token_logprobs_reference`` (materializes a
  float32 [N, V] log_softmax).

``softcap`` / ``logit_scale`` are the model's own post-head transform, in HF's order
(scale, then cap; the temperature divides the result); the backward goes through the
tanh: d z / d logits = logit_scale * (1 - tanh^2) / T.

"triton" and "torch" are one ``fastrlhf::token_logprobs`` op (``ops._library``), so
``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import math

import torch

from fastrlhf.ops._checks import (
    check_head,
    check_labels_in_range,
    check_logits_labels,
    check_positive_float,
)
from fastrlhf.ops._labels import entropy_of, label_masks, masked_logp
from fastrlhf.ops._library import fused_op, resolve_impl
from fastrlhf.ops.reference.logprobs import (
    head_slope,
    head_transform,
    token_logprobs_reference,
)

_CHUNK_ELEMS = 1 << 22  # rows per chunk of the PyTorch path = max(1, this // V)


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Express the leading dims as [B, T] with strides, without copying when possible.

    Returns (logits, (T, stride_B, stride_T)); the tensor is copied only if its last
    dim is not contiguous or its leading dims do not collapse to two strided dims.
    """
    if logits.dim() > 1 and logits.stride(-1) != 1 or logits.dim() == 1:
        logits = logits.contiguous()
    dims = [(s, st) for s, st in zip(logits.shape[:-1], logits.stride()[:-1]) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:  # outer to inner: merge into the previous dim when dense
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        logits = logits.contiguous()
        v = logits.shape[-1]
        return logits, (max(1, math.prod(logits.shape[:-1])), 0, v)
    if not merged:
        return logits, (1, 0, 0)
    if len(merged) == 1:
        return logits, (merged[0][0], 0, merged[0][1])
    return logits, (merged[1][0], merged[0][1], merged[1][1])


def _rows_of(logits: torch.Tensor, layout: tuple[int, int, int], n: int) -> torch.Tensor:
    """The [B, T, V] strided view of the rows (no copy)."""
    t_inner, s_outer, s_inner = layout
    v = logits.shape[-1]
    return logits.as_strided((n // t_inner, t_inner, v), (s_outer, s_inner, 1))


def _row_chunks(n: int, v: int, t_inner: int):
    """(b, t0, t1) chunks of at most ~_CHUNK_ELEMS elements, never crossing a B row."""
    step = max(1, _CHUNK_ELEMS // max(v, 1))
    for b in range(n // t_inner):
        for t0 in range(0, t_inner, step):
            yield b, t0, min(t0 + step, t_inner)


def _scaled(x: torch.Tensor, compute: torch.dtype, temperature: float, head) -> torch.Tensor:
    z = head_transform(x.to(compute), *head)  # a view when x is float32 / float64, no head
    return z if temperature == 1.0 else z / temperature


def _head_grad(x: torch.Tensor, compute: torch.dtype, head) -> torch.Tensor | float:
    """d(head(x)) / dx: scale, or scale * (1 - tanh^2) with a cap (``head_slope``)."""
    softcap, scale = head
    return scale if softcap is None else head_slope(x.to(compute), softcap, scale)


def _torch_fwd(logits, layout, labels, temperature, ignore_index, vocab_size, return_entropy,
               head):  # fmt: skip
    n = labels.numel()
    compute = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.empty(n, dtype=compute, device=logits.device)
    lse = torch.empty(n, dtype=compute, device=logits.device)
    entropy = torch.empty(n if return_entropy else 0, dtype=compute, device=logits.device)
    rows = _rows_of(logits, layout, n)  # [B, T, V]
    t_inner = layout[0]
    for b, t0, t1 in _row_chunks(n, vocab_size, t_inner):
        r0, r1 = b * t_inner + t0, b * t_inner + t1
        z = _scaled(rows[b, t0:t1, :vocab_size], compute, temperature, head)  # [C, V']
        # Shift by the row max first and keep the shifted logits: log p = (z - max) -
        # log sum exp(z - max) rounds each term near its own size. Taking lse from
        # log_softmax at the max column instead carried that element's rounding (4.8e-6
        # at V = 50257, T = 0.7, against 1.0e-6 here) into every p of the backward.
        z_max = z.amax(dim=-1, keepdim=True)  # [C, 1]
        shifted = z - z_max  # [C, V'], chunk-bounded
        lse_shift = shifted.exp().sum(-1).log()  # [C]
        ignored, bad, safe = label_masks(labels[r0:r1], ignore_index, vocab_size)
        picked = shifted.gather(1, safe.unsqueeze(1)).squeeze(1) - lse_shift
        logp[r0:r1] = masked_logp(picked, ignored, bad)
        lse[r0:r1] = z_max.squeeze(1) + lse_shift
        if return_entropy:
            entropy[r0:r1] = entropy_of(shifted.sub_(lse_shift.unsqueeze(1)))
    return logp, lse, entropy


def _torch_bwd(
    logits, layout, out_rows, labels, lse, entropy, grad_logp, grad_entropy, temperature,
    ignore_index, vocab_size, head,
):  # fmt: skip
    """Write dlogits row chunks into ``out_rows`` ([B, T, V] view; may alias logits)."""
    n = labels.numel()
    compute = lse.dtype
    rows = _rows_of(logits, layout, n)
    t_inner = layout[0]
    v_total = logits.shape[-1]
    for b, t0, t1 in _row_chunks(n, v_total, t_inner):
        r0, r1 = b * t_inner + t0, b * t_inner + t1
        z = _scaled(rows[b, t0:t1, :vocab_size], compute, temperature, head)  # [C, V']
        head_grad = _head_grad(rows[b, t0:t1, :vocab_size], compute, head)
        log_p = z - lse[r0:r1].unsqueeze(1)  # [C, V'], chunk-bounded
        ignored, bad, safe = label_masks(labels[r0:r1], ignore_index, vocab_size)
        g = masked_logp(grad_logp[r0:r1].to(compute), ignored, bad)
        if grad_entropy is not None:
            p = log_p.exp()
            # d = -g p - g_H p (log p + H): reuse log_p's buffer, in place
            gh = grad_entropy[r0:r1].to(compute).unsqueeze(1)
            d = log_p.add_(entropy[r0:r1].unsqueeze(1)).mul_(gh).add_(g.unsqueeze(1))
            d = d.mul_(p).neg_()
            # p == 0 (a -inf logit) would give 0 * -inf: its gradient is -g * 0 (NaN only
            # where the row's gradient is NaN)
            d = torch.where(p > 0, d, -g.unsqueeze(1) * p)
        else:
            d = log_p.exp_().mul_(-g.unsqueeze(1))
        d.scatter_add_(1, safe.unsqueeze(1), torch.where(ignored | bad, 0.0, g).unsqueeze(1))
        if temperature != 1.0:
            d.div_(temperature)
        if not isinstance(head_grad, float) or head_grad != 1.0:
            d.mul_(head_grad)
        out_rows[b, t0:t1, :vocab_size] = d
        if vocab_size < v_total:
            # padded columns get 0, or NaN where the row's gradient is NaN (bad label)
            out_rows[b, t0:t1, vocab_size:] = (g * 0.0).unsqueeze(1)


def _fake(logits, labels, temperature, ignore_index, vocab_size, return_entropy, inplace, impl,
          softcap, logit_scale):  # fmt: skip
    n = labels.numel()
    dt = torch.promote_types(logits.dtype, torch.float32)
    entropy = logits.new_empty(n if return_entropy else 0, dtype=dt)
    return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), entropy


def _backward(a, outputs, grads, needs, into=None):
    """dlogits into a new buffer, or into the logits themselves (``into``)."""
    _, lse, entropy = outputs
    g_logp = grads[0] if grads[0] is not None else torch.zeros_like(lse)
    g_ent = grads[2] if a.return_entropy else None
    out = torch.empty(a.logits.shape, dtype=a.logits.dtype, device=a.logits.device)
    out = into if into is not None else out
    if a.labels.numel() == 0:
        return [out.zero_()]
    logits_c, layout = _row_layout(a.logits)
    if out is a.logits:
        out_c, out_layout = logits_c, layout
    else:  # a fresh contiguous buffer: address its rows with the logits' [B, T] split
        t_inner, v = layout[0], a.logits.shape[-1]
        out_c, out_layout = out, (t_inner, t_inner * v, v)
    args = (a.labels, lse, entropy)
    if a.impl == "triton":
        from fastrlhf.kernels.logprobs import token_logprobs_bwd

        g_ent = None if g_ent is None else g_ent.contiguous()
        token_logprobs_bwd(logits_c, layout, out_c, out_layout, *args, g_logp.contiguous(), g_ent,
                           1.0 / a.temperature, a.ignore_index, a.vocab_size, a.softcap,
                           a.logit_scale)  # fmt: skip
    else:
        out_rows = _rows_of(out_c, out_layout, a.labels.numel())
        _torch_bwd(logits_c, layout, out_rows, *args, g_logp, g_ent, a.temperature,
                   a.ignore_index, a.vocab_size, (a.softcap, a.logit_scale))  # fmt: skip
    if out_c.data_ptr() != out.data_ptr():  # _row_layout had to copy the logits: write back
        out.copy_(out_c.view(out.shape))
    return [out]


@fused_op(
    "token_logprobs",
    fake=_fake,
    backward=_backward,
    differentiable=("logits",),
    inplace=("logits", "inplace_backward"),
)
def _op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
    return_entropy: bool,
    inplace_backward: bool,
    impl: str,
    softcap: float | None,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], lse [N], entropy [N] or [0]) in float32 (float64 for float64 logits)."""
    if labels.numel() == 0:
        return _fake(logits, labels, temperature, ignore_index, vocab_size, return_entropy,
                     inplace_backward, impl, softcap, logit_scale)  # fmt: skip
    logits, layout = _row_layout(logits)
    if impl == "triton":
        from fastrlhf.kernels.logprobs import token_logprobs_fwd

        return token_logprobs_fwd(logits, layout, labels, 1.0 / temperature, ignore_index,
                                  vocab_size, return_entropy, softcap, logit_scale)  # fmt: skip
    return _torch_fwd(logits, layout, labels, temperature, ignore_index, vocab_size, return_entropy,
                      (softcap, logit_scale))  # fmt: skip


def _check_rows_defined(lse: torch.Tensor, logits: torch.Tensor, vocab_size: int) -> None:
    """ValueError naming the first logits row that is -inf in every used column.

    Only rows whose lse is not finite are read again (NaN logits also give one; they
    propagate by design), in small groups, so this never touches [N, V] at once.
    """
    lead = logits.shape[:-1]
    suspects = (~torch.isfinite(lse)).nonzero().squeeze(1)
    for group in suspects.split(64):
        rows = torch.unravel_index(group, lead)
        dead = torch.isneginf(logits[rows][..., :vocab_size]).all(-1)
        if bool(dead.any()):
            at = [int(r[dead.nonzero()[0, 0]]) for r in rows]
            raise ValueError(
                f"logits[{', '.join(map(str, at))}] is -inf in all of its {vocab_size} "
                f"columns: softmax, log p and entropy are undefined there; logits have "
                f"shape {tuple(logits.shape)}"
            )


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    *,
    vocab_size: int | None = None,
    validate: bool = True,
    impl: str = "auto",
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) under softmax(head(logits) / temperature), float32, shaped like ``labels``.

    Args:
        logits: [..., V] float16 / bfloat16 / float32 (float64 runs the PyTorch path).
            Rows may be strided (a ``logits[:, :-1]`` view is read in place); the last dim
            must be contiguous or it is copied.
        labels: [...] int32 / int64, the logits' leading shape. ``ignore_index`` gives 0.
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy of softmax(logits / T) at every position.
        inplace_backward: write dlogits into the logits buffer (saves an [N, V] allocation;
            the logits must not be used again after this op's backward). Tested in eager
            mode; under torch.compile prefer the default.
        vocab_size: columns >= vocab_size (lm_head padding) are left out of the softmax and
            get a zero gradient. Default: all V columns count.
        validate: check that labels are in [0, vocab_size) or ignore_index, and that no
            row is -inf in every column (a device sync). Without it a bad label gives NaN
            at its position, never a bad read, and such a row gives NaN.
        impl: "auto", "triton", "torch" or "reference" (the module docstring).
        softcap, logit_scale: the model's post-head transform, applied before the
            temperature as HF does: ``softcap * tanh(logits * logit_scale / softcap)``
            (no cap: ``logits * logit_scale``). Gradients are w.r.t. the raw logits.

    Returns:
        logp [...] float32 (float64 for float64 logits), or (logp, entropy).
    """
    v = check_logits_labels(logits, labels)
    check_positive_float("temperature", temperature)
    softcap, logit_scale = check_head(softcap, logit_scale)
    if vocab_size is None:
        vocab_size = v
    elif not (isinstance(vocab_size, int) and 0 < vocab_size <= v):
        raise ValueError(
            f"vocab_size must be an int in [1, {v}] (logits' last dim); got {vocab_size!r}"
        )
    impl = resolve_impl("token_logprobs", impl, logits)
    if validate:
        check_labels_in_range(labels, vocab_size, ignore_index)
    if impl == "reference":
        if validate:
            no_finite = torch.isneginf(logits[..., :vocab_size]).all(-1).reshape(-1)
            _check_rows_defined(torch.where(no_finite, -math.inf, 0.0), logits, vocab_size)
        return token_logprobs_reference(
            logits, labels, temperature, ignore_index, return_entropy, vocab_size,
            softcap=softcap, logit_scale=logit_scale,
        )  # fmt: skip
    lead = labels.shape
    flat_labels = labels.reshape(-1)
    if not flat_labels.is_contiguous():
        flat_labels = flat_labels.contiguous()
    logp, lse, entropy = _op(
        logits, flat_labels, float(temperature), int(ignore_index), int(vocab_size),
        bool(return_entropy), bool(inplace_backward), impl, softcap, logit_scale,
    )  # fmt: skip
    if validate:
        _check_rows_defined(lse, logits, vocab_size)
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
