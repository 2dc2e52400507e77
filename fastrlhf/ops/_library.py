"""How every fused op is defined: its signature is written once, on its forward.

``fused_op`` turns a typed forward implementation into four ``torch.library`` entries,
so that ``torch.compile(fullgraph=True)`` traces callers and autograd differentiates
them:

    fastrlhf::<name>         the forward; its schema is inferred from the annotations
    its fake                 ``fake(*inputs)``: empty outputs of the right shapes
    fastrlhf::<name>_bwd     the backward; its schema is generated: the forward's inputs,
                             its outputs, one optional gradient per output and
                             ``bool[] needs`` (one flag per differentiable input), and it
                             returns one gradient per differentiable input
    its fake                 generated: a gradient has its input's shape and dtype, and
                             an input that needs none gets an empty [0] placeholder

``backward(a, outputs, grads, needs, into=None)`` is plain Python: ``a`` holds the
forward's inputs by name, ``grads`` may hold None (an output that got no gradient),
and it returns one tensor (contiguous, the input's shape and dtype) or None per
differentiable input. With ``inplace=(input, flag)``, a forward called with that flag
true gets a third op, ``fastrlhf::<name>_bwd_``, which writes the input's gradient
into the input itself (``into``) instead of a new buffer.

``resolve_impl`` is the one backend choice of the public ops.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from fastrlhf.ops._checks import describe

IMPLS = ("auto", "triton", "torch", "reference")


def resolve_impl(op: str, impl: object, t: Tensor, impls: Sequence[str] = IMPLS) -> str:
    """The backend an op runs: "auto" is Triton for non-float64 CUDA tensors, else torch.

    On CPU "auto" never picks Triton's interpreter (that is for tests, by impl="triton").
    """
    if impl not in impls:
        raise ValueError(f"{op}: impl must be one of {tuple(impls)}; got {impl!r}")
    if impl == "auto":
        return "triton" if t.is_cuda and t.dtype != torch.float64 else "torch"
    if impl == "triton":
        from fastrlhf.kernels import interpreting

        if t.dtype == torch.float64:
            raise TypeError(f"{op}: impl='triton' does not support float64; got {describe(t)}")
        if not t.is_cuda and not interpreting():
            raise ValueError(
                f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                f"triton is imported); got {describe(t)}"
            )
    return impl


def _schema_parts(forward: Callable) -> tuple[str, int]:
    """('(Tensor x, float t, ...', number of outputs) of the forward's inferred schema."""
    schema = torch.library.infer_schema(forward, mutates_args=())
    args, outs = schema.split(") -> ")
    outs = outs.strip()
    n_out = outs.count("Tensor") if outs.startswith("(") else 1
    return args, n_out


def fused_op(
    name: str,
    *,
    fake: Callable,
    backward: Callable,
    differentiable: Sequence[str],
    inplace: tuple[str, str] | None = None,
) -> Callable:
    """Register ``fastrlhf::<name>`` (forward, backward, fakes, autograd); see the module doc."""

    def register(forward: Callable):
        params = list(inspect.signature(forward).parameters)
        diff = [params.index(d) for d in differentiable]
        args, n_out = _schema_parts(forward)
        op = torch.library.custom_op(f"fastrlhf::{name}", forward, mutates_args=())
        op.register_fake(fake)

        outs = "".join(f", Tensor out{i}" for i in range(n_out))
        grads = "".join(f", Tensor? grad{i}" for i in range(n_out))
        bwd_schema = f"{args}{outs}{grads}, bool[] needs) -> Tensor[]"
        n_in = len(params)

        def split(flat):
            a = SimpleNamespace(**dict(zip(params, flat[:n_in])))
            return a, flat[n_in : n_in + n_out], flat[n_in + n_out : n_in + 2 * n_out], flat[-1]

        def placeholder(a):
            return next(x for x in vars(a).values() if isinstance(x, Tensor)).new_empty(0)

        def bwd_impl(*flat):
            a, out, g, needs = split(flat)
            result = backward(a, out, g, needs)
            return [r if r is not None else placeholder(a) for r in result]

        def bwd_fake(*flat):
            a, _, _, needs = split(flat)
            result = []
            for i, need in zip(diff, needs):
                x = flat[i]
                if need and x is not None:
                    result.append(torch.empty(x.shape, dtype=x.dtype, device=x.device))
                else:
                    result.append(placeholder(a))
            return result

        bwd_op = torch.library.custom_op(
            f"fastrlhf::{name}_bwd", bwd_impl, mutates_args=(), schema=bwd_schema
        )
        bwd_op.register_fake(bwd_fake)

        bwd_inplace = None
        if inplace is not None:
            target, _ = inplace
            mutated = args.replace(f"Tensor {target},", f"Tensor(a!) {target},", 1)

            def bwd_inplace_impl(*flat):
                a, out, g, needs = split(flat)
                backward(a, out, g, needs, into=getattr(a, target))

            bwd_inplace = torch.library.custom_op(
                f"fastrlhf::{name}_bwd_",
                bwd_inplace_impl,
                mutates_args=(target,),
                schema=f"{mutated}{outs}{grads}, bool[] needs) -> ()",
            )
            bwd_inplace.register_fake(lambda *flat: None)

        def setup_context(ctx, inputs, output):
            output = output if isinstance(output, tuple) else (output,)
            tensors = [x if isinstance(x, Tensor) else None for x in inputs]
            ctx.save_for_backward(*tensors, *output)
            ctx.consts = [None if isinstance(x, Tensor) else x for x in inputs]
            ctx.set_materialize_grads(False)  # an unused output costs no work

        def autograd_backward(ctx, *grads):
            if all(g is None for g in grads):
                return (None,) * n_in  # no output got a gradient: nothing to launch
            saved = ctx.saved_tensors
            inputs = [c if s is None else s for s, c in zip(saved[:n_in], ctx.consts)]
            needs = [bool(ctx.needs_input_grad[i]) for i in diff]
            flat = (*inputs, *saved[n_in:], *grads, needs)
            result: list[Tensor | None] = [None] * n_in
            if inplace is not None and inputs[params.index(inplace[1])]:
                # The caller asked for it: the input's buffer becomes its own gradient,
                # so nothing may read that input after this backward.
                bwd_inplace(*flat)
                result[params.index(inplace[0])] = inputs[params.index(inplace[0])]
                return tuple(result)
            grads_in = bwd_op(*flat)
            for i, need, g in zip(diff, needs, grads_in):
                result[i] = g if need else None
            return tuple(result)

        op.register_autograd(autograd_backward, setup_context=setup_context)
        return op

    return register
