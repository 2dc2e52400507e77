"""Input validation shared by the ops: clear errors before any kernel launches.

Every message names the argument, and its shape/dtype/device, so a user can see
what is wrong without reading our code. Checks that need a device sync (label
ranges) are separate and opt-in through the ops' ``validate=`` flag.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# The choices of the loss ops' string arguments (the ops and their references check them).
KL_KINDS = ("k1", "abs", "k2", "k3", "k1+st", "abs+st", "k2+st", "k3+st")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
DPO_KINDS = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "tdpo1", "tdpo2")


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a tensor as described."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({allowed}); got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got {describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s); got {describe(t)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    shapes = {tuple(v.shape) for v in present.values()}
    if len(shapes) > 1:
        listing = ", ".join(f"{k} {tuple(v.shape)}" for k, v in present.items())
        raise ValueError(f"shapes must match; got {listing}")


def check_labels_in_range(
    labels: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels"
) -> None:
    """ValueError naming the first position whose label is outside [0, num_classes).

    Syncs with the device (it reads a result back); the ops call it only when
    ``validate=True``. Without it, a bad label yields NaN at its position, never an
    out-of-bounds read.
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        value = int(labels[tuple(first)])
        raise ValueError(
            f"{name}[{', '.join(map(str, first))}] = {value} is outside [0, {num_classes}) "
            f"and is not ignore_index ({ignore_index}); {name} has {describe(labels)}"
        )


LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits_labels(
    logits: object, labels: object, *, logits_name: str = "logits", labels_name: str = "labels"
) -> int:
    """Validate a [..., V] logits tensor against [...] labels; return V.

    Shared by token_logprobs and linear_token_logprobs so both raise the same errors
    (TypeError for dtypes, ValueError for shapes/devices) before any kernel launches.
    """
    check_tensor(logits_name, logits, dtypes=LOGITS_DTYPES, min_ndim=1)
    check_tensor(labels_name, labels, dtypes=INDEX_DTYPES)
    if logits.device != labels.device:
        raise ValueError(
            f"{logits_name} and {labels_name} must be on one device; got {logits_name} "
            f"{describe(logits)} and {labels_name} {describe(labels)}"
        )
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{labels_name} must have the leading shape of {logits_name} "
            f"{tuple(logits.shape[:-1])}; got {labels_name} {describe(labels)}, "
            f"{logits_name} {describe(logits)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{logits_name} must have a non-empty last dim; got {describe(logits)}")
    return int(logits.shape[-1])


def check_positive_float(name: str, value: object) -> float:
    """ValueError naming ``name`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_head(softcap: object, logit_scale: object) -> tuple[float | None, float]:
    """(softcap, logit_scale) as floats: softcap None or a finite number > 0, logit_scale a
    finite number > 0 (a negative scale would flip the vocabulary's order)."""
    if softcap is not None:
        softcap = check_positive_float("softcap", softcap)
    return softcap, check_positive_float("logit_scale", logit_scale)


def check_packed_layout(op: str, cu_seqlens: torch.Tensor, total: int, of: str) -> None:
    """ValueError unless ``cu_seqlens`` starts at 0, never decreases and ends at ``total``.

    The messages are packed_gae's (csrc/gae_checks.h), with ``op`` in the place of
    packed_gae and ``of`` naming the tensor whose length is ``total``. Reads the offsets
    on the host: one device sync on CUDA, which is why the ops make it ``validate=``.
    """
    cu = cu_seqlens.tolist()  # [B+1]
    if cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0; got cu_seqlens[0] = {cu[0]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(
                f"{op}: cu_seqlens must not decrease; got cu_seqlens[{b}] = {cu[b]} > "
                f"cu_seqlens[{b + 1}] = {cu[b + 1]}"
            )
    if cu[-1] != total:
        raise ValueError(
            f"{op}: cu_seqlens must end at total_tokens = {total} (len({of})); "
            f"got cu_seqlens[{len(cu) - 1}] = {cu[-1]}"
        )
