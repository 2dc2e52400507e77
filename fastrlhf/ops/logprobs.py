"""``token_logprobs``: per-token log p(label) (and entropy) from [..., V] logits, fused.

Shapes: N = tokens (the product of the logits' leading dims), V = logits' last dim,
V' = ``vocab_size`` (defaults to V; smaller for an lm_head wider than the tokenizer).

    z = logits[..., :V'] / temperature
    logp[n]    = z[n, label[n]] - logsumexp(z[n])      (0 where label == ignore_index)
    entropy[n] = -sum_v softmax(z[n])_v * log softmax(z[n])_v

Paths (chosen per call, never at import):
- CUDA tensors, or CPU tensors with TRITON_INTERPRET=1: the Triton kernels of
  ``fastrlhf.kernels.logprobs`` (one read of the logits forward; one read and one write
  backward, into a new buffer or, with ``inplace_backward=True``, into the logits).
- otherwise (CPU in production, or float64 logits anywhere): a PyTorch implementation
  that walks the rows in chunks of about 4M elements, so its extra memory is bounded
  and never [N, V]. float64 logits compute in float64 (this is what gradcheck uses).

The op is registered through ``torch.library.custom_op`` (forward, backward and an
in-place backward as three ops), so ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import math

import torch

from fastrlhf.ops._checks import (
    check_labels_in_range,
    check_logits_labels,
    check_positive_float,
)

_CHUNK_ELEMS = 1 << 22  # rows per chunk of the PyTorch path = max(1, this // V)


def _use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA; on CPU only under the interpreter. float64 always takes PyTorch."""
    if t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    import triton

    return t.device.type == "cpu" and triton.knobs.runtime.interpret


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


def _scaled(x: torch.Tensor, compute: torch.dtype, temperature: float) -> torch.Tensor:
    z = x.to(compute)  # a view when x is already float32 / float64
    return z if temperature == 1.0 else z / temperature


def _torch_fwd(logits, layout, labels, temperature, ignore_index, vocab_size, return_entropy):
    n = labels.numel()
    compute = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.empty(n, dtype=compute, device=logits.device)
    lse = torch.empty(n, dtype=compute, device=logits.device)
    entropy = torch.empty(n if return_entropy else 0, dtype=compute, device=logits.device)
    rows = _rows_of(logits, layout, n)  # [B, T, V]
    t_inner = layout[0]
    for b, t0, t1 in _row_chunks(n, vocab_size, t_inner):
        r0, r1 = b * t_inner + t0, b * t_inner + t1
        z = _scaled(rows[b, t0:t1, :vocab_size], compute, temperature)  # [C, V']
        # Shift by the row max first and keep the shifted logits: log p = (z - max) -
        # log sum exp(z - max) rounds each term near its own size. Taking lse from
        # log_softmax at the max column instead carried that element's rounding (4.8e-6
        # at V = 50257, T = 0.7, against 1.0e-6 here) into every p of the backward.
        z_max = z.amax(dim=-1, keepdim=True)  # [C, 1]
        shifted = z - z_max  # [C, V'], chunk-bounded
        e = shifted.exp()  # [C, V']
        total = e.sum(-1)  # [C]
        lse_shift = total.log()
        lab = labels[r0:r1].long()
        ignored = lab == ignore_index
        valid = (lab >= 0) & (lab < vocab_size)
        picked = shifted.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1) - lse_shift
        logp[r0:r1] = torch.where(ignored, 0.0, torch.where(valid, picked, math.nan))
        lse[r0:r1] = z_max.squeeze(1) + lse_shift
        if return_entropy:
            logsm = shifted.sub_(lse_shift.unsqueeze(1))
            p = e.div_(total.unsqueeze(1))
            entropy[r0:r1] = -(
                p * logsm.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=0.0)
            ).sum(-1)
    return logp, lse, entropy


def _torch_bwd(
    logits, layout, out_rows, labels, lse, entropy, grad_logp, grad_entropy, temperature,
    ignore_index, vocab_size,
):  # fmt: skip
    """Write dlogits row chunks into ``out_rows`` ([B, T, V] view; may alias logits)."""
    n = labels.numel()
    compute = lse.dtype
    rows = _rows_of(logits, layout, n)
    t_inner = layout[0]
    v_total = logits.shape[-1]
    for b, t0, t1 in _row_chunks(n, v_total, t_inner):
        r0, r1 = b * t_inner + t0, b * t_inner + t1
        z = _scaled(rows[b, t0:t1, :vocab_size], compute, temperature)  # [C, V']
        log_p = z - lse[r0:r1].unsqueeze(1)  # [C, V'], chunk-bounded
        lab = labels[r0:r1].long()
        ignored = lab == ignore_index
        valid = (lab >= 0) & (lab < vocab_size)
        g = torch.where(ignored, 0.0, torch.where(valid, grad_logp[r0:r1].to(compute), math.nan))
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
        lab_col = torch.where(valid, lab, 0).unsqueeze(1)
        d.scatter_add_(1, lab_col, torch.where(valid, g, 0.0).unsqueeze(1))
        if temperature != 1.0:
            d.div_(temperature)
        out_rows[b, t0:t1, :vocab_size] = d
        if vocab_size < v_total:
            # padded columns get 0, or NaN where the row's gradient is NaN (bad label)
            out_rows[b, t0:t1, vocab_size:] = (g * 0.0).unsqueeze(1)


@torch.library.custom_op("fastrlhf::token_logprobs_fwd", mutates_args=())
def _fwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
    return_entropy: bool,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if labels.numel() == 0:
        dt = torch.promote_types(logits.dtype, torch.float32)
        return (logits.new_empty(0, dtype=dt), logits.new_empty(0, dtype=dt),
                logits.new_empty(0, dtype=dt))  # fmt: skip
    logits, layout = _row_layout(logits)
    if _use_triton(logits):
        from fastrlhf.kernels.logprobs import token_logprobs_fwd

        return token_logprobs_fwd(
            logits, layout, labels, 1.0 / temperature, ignore_index, vocab_size, return_entropy
        )
    return _torch_fwd(logits, layout, labels, temperature, ignore_index, vocab_size, return_entropy)


@_fwd_op.register_fake
def _(logits, labels, temperature, ignore_index, vocab_size, return_entropy, inplace_backward):
    n = labels.numel()
    dt = torch.promote_types(logits.dtype, torch.float32)
    return (
        logits.new_empty(n, dtype=dt),
        logits.new_empty(n, dtype=dt),
        logits.new_empty(n if return_entropy else 0, dtype=dt),
    )


def _backward_into(logits, out, labels, lse, entropy, g_logp, g_ent, temperature, ii, vs):
    if labels.numel() == 0:
        return out
    logits_c, layout = _row_layout(logits)
    if out is logits:
        out_c, out_layout = logits_c, layout
    else:  # a fresh contiguous buffer: address its rows with the logits' [B, T] split
        t_inner, v = layout[0], logits.shape[-1]
        out_c, out_layout = out, (t_inner, t_inner * v, v)
    n = labels.numel()
    if _use_triton(logits_c):
        from fastrlhf.kernels.logprobs import token_logprobs_bwd

        g_logp = g_logp.contiguous()
        g_ent = None if g_ent is None else g_ent.contiguous()
        token_logprobs_bwd(
            logits_c, layout, out_c, out_layout, labels, lse, entropy, g_logp, g_ent,
            1.0 / temperature, ii, vs,
        )  # fmt: skip
    else:
        out_rows = _rows_of(out_c, out_layout, n)
        _torch_bwd(logits_c, layout, out_rows, labels, lse, entropy, g_logp, g_ent,
                   temperature, ii, vs)  # fmt: skip
    return out_c


@torch.library.custom_op("fastrlhf::token_logprobs_bwd", mutates_args=())
def _bwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(logits, out, labels, lse, entropy, grad_logp, grad_entropy, temperature,
                   ignore_index, vocab_size)  # fmt: skip
    return out


@_bwd_op.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ii, vs):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fastrlhf::token_logprobs_bwd_", mutates_args=("logits",))
def _bwd_inplace_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    vocab_size: int,
) -> None:
    out = _backward_into(logits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                         temperature, ignore_index, vocab_size)  # fmt: skip
    if out.data_ptr() != logits.data_ptr():  # _row_layout had to copy: write back
        logits.copy_(out.view(logits.shape))


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, vocab_size, return_entropy, inplace = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.args = (temperature, ignore_index, vocab_size)
    ctx.return_entropy = return_entropy
    ctx.inplace = inplace
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, labels, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.return_entropy:
        grad_entropy = None
    if ctx.inplace:
        # The logits buffer is overwritten with dlogits: the caller promised (by asking
        # for it) that nothing else reads these logits after the forward.
        _bwd_inplace_op(logits, labels, lse, entropy, grad_logp, grad_entropy, *ctx.args)
        grad = logits
    else:
        grad = _bwd_op(logits, labels, lse, entropy, grad_logp, grad_entropy, *ctx.args)
    return grad, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) under softmax(logits / temperature), float32, shaped like ``labels``.

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
        validate: check that labels are in [0, vocab_size) or ignore_index (one device
            sync). Without it a bad label gives NaN at its position, never a bad read.

    Returns:
        logp [...] float32 (float64 for float64 logits), or (logp, entropy).
    """
    v = check_logits_labels(logits, labels)
    check_positive_float("temperature", temperature)
    if vocab_size is None:
        vocab_size = v
    elif not (isinstance(vocab_size, int) and 0 < vocab_size <= v):
        raise ValueError(
            f"vocab_size must be an int in [1, {v}] (logits' last dim); got {vocab_size!r}"
        )
    if validate:
        check_labels_in_range(labels, vocab_size, ignore_index)
    lead = labels.shape
    flat_labels = labels.reshape(-1)
    if not flat_labels.is_contiguous():
        flat_labels = flat_labels.contiguous()
    logp, _, entropy = _fwd_op(
        logits, flat_labels, float(temperature), int(ignore_index), int(vocab_size),
        bool(return_entropy), bool(inplace_backward),
    )  # fmt: skip
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
