"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for our policy and value models.

``shard_model`` shards every decoder layer as its own unit, then the root (the
``PolicyModel`` / ``ValueModel`` itself), whose unit holds what is left: the embedding
(which IS the lm_head when tied), the final norm, an untied lm_head, a value head.

Tied embeddings and the fused lm_head op. Trainers call ``hidden = policy(...)`` and
then pass ``policy.lm_head_weight`` to ``linear_token_logprobs`` outside the forward.
That is correct here because the root is sharded with ``reshard_after_forward=False``:
after the root forward its parameters stay unsharded until the root's post-backward
(FSDP's end-of-backward callback), so ``policy.lm_head_weight`` read after the forward
is the full [V, H] tensor, the very tensor the embedding lookup used, and its gradient
from the op accumulates next to the embedding's before the reduce-scatter. Read BEFORE
the step's first forward it is a sharded DTensor: ``full_lm_head_weight`` raises then.
(The test trains the tiny tied Llama with 2 processes and compares with 1.)

Gradients are reduced with a plain SUM (no division by the world size): the loss of
each rank is already divided by the GLOBAL unit count, so the sum over ranks is the
one-process gradient. That is ``set_gradient_divide_factor(1)`` plus forced SUM
reductions (gloo has no AVG or PREMUL_SUM).

Mixed precision: bf16 parameters for compute, fp32 gradient reduction, fp32 sharded
master weights on CUDA; plain fp32 on CPU. A value head stays fp32 in its own unit.

Generation: ``gathered_params(model)`` all-gathers every unit once and keeps them
gathered through any number of forwards (HF ``generate``, our KV-cache rollout), then
reshards: one all-gather per rollout instead of one per layer per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fastrlhf.distributed.context import DistContext


def default_mixed_precision(device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 reductions on CUDA; None (everything fp32) elsewhere."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF model inside ``model`` (by the HF models'
    ``_no_split_modules`` class names, e.g. ``LlamaDecoderLayer``), in order."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"found no decoder layers in {type(model).__name__}: no submodule's class is "
            f"listed in an HF model's _no_split_modules ({sorted(names) or 'none found'})"
        )
    return layers


def shard_model(
    model: torch.nn.Module,
    ctx: DistContext,
    mixed_precision: MixedPrecisionPolicy | None | str = "auto",
) -> torch.nn.Module:
    """Apply FSDP2 to a ``PolicyModel`` / ``ValueModel`` (in place; returns it).

    Without a process group (``ctx.distributed`` False) the model is returned as is, so
    trainers call this unconditionally. ``mixed_precision``: "auto" (bf16 params + fp32
    reduce on CUDA, fp32 on CPU), None (fp32), or a ``MixedPrecisionPolicy``.
    The model must already be on ``ctx.device``; build the optimizer AFTER this call
    (sharding replaces the parameters with DTensors).
    """
    if not ctx.distributed:
        return model
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded")
    wrong = [n for n, p in model.named_parameters() if p.device != ctx.device]
    if wrong:
        raise ValueError(
            f"move the model to {ctx.device} before sharding; {wrong[0]} is on "
            f"{model.get_parameter(wrong[0]).device}"
        )
    if isinstance(mixed_precision, str) and mixed_precision != "auto":
        raise ValueError(
            "mixed_precision must be 'auto', None or a MixedPrecisionPolicy, got "
            f"{mixed_precision!r}"
        )
    mp = default_mixed_precision(ctx.device) if mixed_precision == "auto" else mixed_precision
    kwargs = {"mesh": ctx.mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    score = getattr(model, "score", None)
    if isinstance(score, torch.nn.Linear):
        # the value head computes in fp32 whatever the backbone's dtype (see models.value)
        fully_shard(score, mesh=ctx.mesh, reshard_after_forward=True)
    # root unit: embedding / tied lm_head / norm; kept unsharded from forward to backward
    # so the lm_head weight read after the forward is the full tensor (module docstring)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    # Fix the root now. FSDP otherwise makes the first module to run forward the root,
    # and generation calls the decoder (a layer first), never PolicyModel.forward.
    model._get_fsdp_state()._lazy_init()
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_lm_head_weight(policy: torch.nn.Module) -> torch.Tensor:
    """``policy.lm_head_weight`` checked to be the full (unsharded) tensor."""
    weight = policy.lm_head_weight
    if isinstance(weight, DTensor):
        raise RuntimeError(
            "lm_head_weight is still sharded: read it after the policy's forward in the same "
            "step (the root unit stays gathered until backward), or inside gathered_params()"
        )
    return weight


@contextlib.contextmanager
def gathered_params(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """All parameters of a sharded ``model`` gathered (full tensors in the modules) for
    the body, then resharded. For generation: no re-gather per layer per token, and
    ``lm_head_weight`` / ``decoder`` usable outside ``model.forward``. Use under
    ``torch.no_grad()``; every rank must enter (the gather is a collective).
    A model that is not sharded passes through unchanged."""
    if not isinstance(model, FSDPModule):
        yield model
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        for m in units:
            m.unshard()
        yield model
    finally:
        for m in units:
            # restore what shard_model set: layers and heads reshard, the root does not
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, foreach: bool | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded (DTensor) and plain gradients alike;
    returns the total norm as a plain tensor (a sharded norm would be a partial DTensor
    that cannot be stacked with the loop's other metrics)."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=foreach)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # sum of squares over the shards: one all-reduce
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total
