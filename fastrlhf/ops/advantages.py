"""Advantage estimation over packed sequences: GAE, whitening, group advantages.

Shapes: N = packed tokens, B = sequences, T = padded length, G = groups. A packed
batch is a flat [N] tensor plus ``cu_seqlens`` [B+1] int32 (sequence b holds tokens
``cu_seqlens[b]:cu_seqlens[b+1]``; empty sequences are allowed).

- ``packed_gae``: Generalized Advantage Estimation in one pass over packed sequences.
  ``impl="extension"``: the torch.library op ``fastrlhf::packed_gae`` (C++ CPU kernel
  parallel over sequences, CUDA kernel parallel over tokens; csrc/); ``"torch"``: the
  padded reverse loop (``padded_gae_reference``) on the unpacked batch;
  ``"reference"``: the float64 Python loop ``packed_gae_reference``; ``"auto"``: the
  extension where it is built for the device, else torch.
- ``masked_whiten``: global masked whitening (unbiased variance, as in TRL/OpenRLHF).
- ``pack_padded`` / ``unpack_to_padded``: conversions between [B, T] and packed [N].
- ``group_advantages``: critic-free advantages from per-sequence scores and group
  ids: GRPO, Dr. GRPO, RLOO, REINFORCE++.

GAE semantics (packed_gae). For each sequence, from its last token to its first,
with (nv, a) starting at (bootstrap[b], 0) (bootstrap omitted: (0, 0), a terminal
state):
    unmasked t:  a = r_t + gamma * nv - v_t + gamma * lam * a;  nv = v_t;  adv_t = a
    masked t:    (nv, a) carried unchanged;  r_t dropped;           adv_t = 0
    returns_t = adv_t + v_t   (so returns_t = v_t on masked tokens)
The masked rule is verl's (``compute_gae_advantage_return`` with a response mask):
an observation or tool token between two generated tokens is skipped, so the
generated token to its left bootstraps from the value of the one to its right. verl
writes the carried advantage on masked tokens; we write 0 so that a masked token
never contributes by accident. Outputs are float32; the CUDA kernel accumulates in
float32, the CPU kernel in float64.

Importing this module loads the extension and registers the op's fake (meta)
implementation with torch.library (a registry entry; no compilation, no device
query). That is the place torch expects it: the schema comes from C++, whose
``set_python_module`` names this module as the one to import for the fake.
"""

from __future__ import annotations

import torch

from fastrlhf._ext import extension_available
from fastrlhf.ops._checks import FLOAT_DTYPES, check_packed_layout, describe
from fastrlhf.ops.reference.advantages import packed_gae_reference, padded_gae_reference

KINDS = ("grpo", "dr_grpo", "rloo", "reinforce++")
GAE_IMPLS = ("auto", "extension", "torch", "reference")


def _packed_gae_fake(
    rewards, values, cu_seqlens, gamma=1.0, lam=0.95, mask=None, bootstrap=None, validate=False
):
    # the schema's defaults are repeated: arguments equal to them may be left out
    # outputs are float32 [N] on the device of rewards, whatever the input dtype
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    return adv, torch.empty_like(adv)


# torch.library can only attach a fake to an op that exists, so this loads the
# extension (once; a missing one is a warning, and "auto" takes the torch path). The
# device types the compiled op serves are kept in a plain global that torch.compile can
# guard on, rather than calling the cached loader inside traced code: a CPU-only build
# has no CUDA kernel, and CUDA inputs then take the torch path instead of failing in
# the dispatcher ("meta" is the fake implementation).
_EXTENSION_DEVICES: frozenset[str] = frozenset()
if extension_available():
    torch.library.register_fake("fastrlhf::packed_gae", _packed_gae_fake)
    _has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastrlhf::packed_gae", "CUDA")
    _EXTENSION_DEVICES = frozenset({"cpu", "meta"} | ({"cuda"} if _has_cuda else set()))


def packed_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask: torch.Tensor | None = None,
    bootstrap: torch.Tensor | None = None,
    *,
    validate: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over packed sequences: ``(advantages [N], returns [N])``, float32.

    Args:
        rewards, values: [N] float16/bfloat16/float32/float64, same dtype and device.
        cu_seqlens: [B+1] int32, contiguous, on the same device; starts at 0, never
            decreases, ends at N.
        gamma, lam: discount and GAE lambda.
        mask: [N] (bool, or numbers where nonzero = keep); masked tokens are skipped
            (see the module docstring) and get advantage 0.
        bootstrap: [B] float, the value after the last token of each sequence (for
            truncated sequences); omitted, every sequence ends in a terminal state.
        validate: on CUDA, also check the values of cu_seqlens (one device sync).
            On the CPU they are always checked.
        impl: "auto", "extension", "torch" or "reference" (the module docstring).

    Bad inputs raise TypeError (dtype) or ValueError (shape, device, layout, values)
    naming the argument, on every impl alike.

    Not differentiable (advantages are constants of the policy loss). The compiled op
    works under torch.compile(fullgraph=True); the torch path reads the longest
    sequence length on the host, so under torch.compile it breaks the graph.
    """
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        mask = mask != 0
    if impl not in GAE_IMPLS:
        raise ValueError(f"packed_gae: impl must be one of {GAE_IMPLS}; got {impl!r}")
    device = rewards.device.type if isinstance(rewards, torch.Tensor) else None
    if impl == "extension" and device not in _EXTENSION_DEVICES:
        raise ValueError(
            f"packed_gae: impl='extension' needs fastrlhf._C built for {device} tensors; "
            f"it serves {sorted(_EXTENSION_DEVICES - {'meta'}) or 'no device (not built)'}"
        )
    if impl == "extension" or (impl == "auto" and device in _EXTENSION_DEVICES):
        return torch.ops.fastrlhf.packed_gae(
            rewards, values, cu_seqlens, gamma, lam, mask, bootstrap, validate
        )
    _check_packed_gae_inputs(rewards, values, cu_seqlens, mask, bootstrap)
    if validate or cu_seqlens.device.type == "cpu":
        check_packed_layout("packed_gae", cu_seqlens, rewards.numel(), "rewards")
    if impl == "reference":
        adv, ret = packed_gae_reference(rewards, values, cu_seqlens, gamma, lam, mask, bootstrap)
        return adv.float().to(rewards.device), ret.float().to(rewards.device)
    return _packed_gae_torch(rewards, values, cu_seqlens, gamma, lam, mask, bootstrap)


def _check_packed_gae_inputs(rewards, values, cu_seqlens, mask, bootstrap) -> None:
    """The metadata checks of csrc/gae_checks.h, with the same exception kinds."""
    for name, t in (("rewards", rewards), ("values", values), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"packed_gae: {name} must be a torch.Tensor, got {type(t).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"packed_gae: rewards must be 1-D [N]; got {describe(rewards)}")
    if rewards.dtype not in FLOAT_DTYPES:
        raise TypeError(f"packed_gae: rewards must be a float tensor; got {describe(rewards)}")
    if values.dtype != rewards.dtype:
        raise TypeError(
            f"packed_gae: values must have the dtype of rewards ({rewards.dtype}); "
            f"got {describe(values)}"
        )
    if values.shape != rewards.shape or values.device != rewards.device:
        raise ValueError(
            f"packed_gae: values must have the shape and device of rewards "
            f"({describe(rewards)}); got {describe(values)}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"packed_gae: cu_seqlens must be int32; got {describe(cu_seqlens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"packed_gae: cu_seqlens must be 1-D [B+1]; got {describe(cu_seqlens)}")
    if not cu_seqlens.is_contiguous():
        raise ValueError(f"packed_gae: cu_seqlens must be contiguous; got {describe(cu_seqlens)}")
    if cu_seqlens.device != rewards.device:
        raise ValueError(
            f"packed_gae: cu_seqlens must be on the device of rewards ({rewards.device}); "
            f"got {describe(cu_seqlens)}"
        )
    if mask is not None and (mask.shape != rewards.shape or mask.device != rewards.device):
        raise ValueError(
            f"packed_gae: mask must have the shape and device of rewards "
            f"({describe(rewards)}); got {describe(mask)}"
        )
    if bootstrap is not None:
        if bootstrap.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"packed_gae: bootstrap must be a float tensor; got {describe(bootstrap)}"
            )
        batch = cu_seqlens.numel() - 1
        if bootstrap.dim() != 1 or bootstrap.numel() != batch or bootstrap.device != rewards.device:
            raise ValueError(
                f"packed_gae: bootstrap must be 1-D [B] (B = {batch}) on the device of rewards; "
                f"got {describe(bootstrap)}"
            )


def _packed_gae_torch(rewards, values, cu_seqlens, gamma, lam, mask, bootstrap):
    """impl="torch": unpack to [B, T], run the padded reverse loop, pack back."""
    seq, pos = _token_coords(cu_seqlens, rewards.numel())  # [N], [N]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [B]
    steps = int(lengths.max()) if lengths.numel() else 0
    keep = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask  # [N]
    # the layout was checked by packed_gae
    r = unpack_to_padded(rewards, cu_seqlens, 0.0, steps, validate=False)  # [B, T]
    v = unpack_to_padded(values, cu_seqlens, 0.0, steps, validate=False)  # [B, T]
    m = unpack_to_padded(keep, cu_seqlens, False, steps, validate=False)  # padding masked
    adv, _ = padded_gae_reference(r, v, m, gamma, lam, bootstrap)  # [B, T]
    adv = adv[seq, pos].float()  # [N]
    return adv, adv + values.float()


def _token_coords(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index [N], position in its sequence [N]) of every packed token."""
    cu = cu_seqlens.long()
    batch = cu.numel() - 1
    seq = torch.repeat_interleave(
        torch.arange(batch, device=cu.device), cu[1:] - cu[:-1], output_size=total
    )  # [N]
    pos = torch.arange(total, device=cu.device) - cu[seq]  # [N]
    return seq, pos


def unpack_to_padded(
    x_packed: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pad_value: float | bool = 0.0,
    max_len: int | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Packed [N, *] -> padded [B, T, *], each sequence at the left of its row.

    T is ``max_len`` or the longest sequence (which reads cu_seqlens on the host).
    ``validate``: check that cu_seqlens is a packed layout of the N rows (packed_gae's
    messages; a host sync on CUDA).
    """
    if validate:
        check_packed_layout("unpack_to_padded", cu_seqlens, x_packed.shape[0], "x_packed")
    cu = cu_seqlens.long()
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    seq, pos = _token_coords(cu_seqlens, x_packed.shape[0])  # [N], [N]
    out = x_packed.new_full((cu.numel() - 1, max_len, *x_packed.shape[1:]), pad_value)
    out[seq, pos] = x_packed
    return out  # [B, T, *]


def pack_padded(
    x: torch.Tensor, mask_or_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [B, T, *] -> (packed [N, *], cu_seqlens [B+1] int32).

    ``mask_or_lengths`` is either a [B, T] mask (the kept tokens of each row, in
    order; holes and left padding allowed) or [B] lengths (the first lengths[b]
    tokens of row b). Boolean indexing: on CUDA this syncs once to size the output.
    """
    if mask_or_lengths.dim() == 2:
        keep = mask_or_lengths.bool()  # [B, T]
        if keep.shape != x.shape[:2]:
            raise ValueError(
                f"pack_padded: mask must be [B, T] = {tuple(x.shape[:2])}; "
                f"got {describe(mask_or_lengths)}"
            )
        lengths = keep.sum(1)  # [B]
    elif mask_or_lengths.dim() == 1:
        lengths = mask_or_lengths.long()  # [B]
        if lengths.shape[0] != x.shape[0]:
            raise ValueError(
                f"pack_padded: lengths must be [B] = [{x.shape[0]}]; "
                f"got {describe(mask_or_lengths)}"
            )
        keep = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # [B, T]
    else:
        raise ValueError(
            f"pack_padded: expected a [B, T] mask or [B] lengths; got {describe(mask_or_lengths)}"
        )
    cu_seqlens = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return x[keep], cu_seqlens


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the masked elements.

    One global mean and variance over all kept elements (mask nonzero; all elements
    without a mask). The variance is unbiased (divides by n - 1), as in TRL's and
    OpenRLHF's masked_whiten. With ``shift_mean=False`` the mean is added back. The map
    is applied to every element, masked ones too, as in those libraries: mask the
    loss, or the result. No host sync: with n <= 1 kept elements the variance is
    taken as undefined and the scale as 1 (n = 0: the mean is 0 too), instead of the
    ValueError those libraries raise. Computes in float32 at least.
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    keep = torch.ones_like(xf, dtype=torch.bool) if mask is None else mask.bool()
    if keep.shape != xf.shape:
        raise ValueError(
            f"masked_whiten: mask must have the shape of x {tuple(x.shape)}; got {describe(mask)}"
        )
    n = keep.sum().to(xf.dtype)
    kept = torch.where(keep, xf, 0.0)
    mean = kept.sum() / n.clamp(min=1)
    var = torch.where(keep, (xf - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
    scale = torch.where(n > 1, torch.rsqrt(var + eps), torch.ones_like(var))
    out = (xf - mean) * scale
    return out if shift_mean else out + mean


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    kind: str = "grpo",
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    token_rewards: torch.Tensor | None = None,
    whiten: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Critic-free advantages from per-sequence scores [B] and group ids [B].

    kind:
      "grpo"        (s - mean_g) / (std_g + eps), std unbiased; ``normalize_std=False``
                    gives s - mean_g.
      "dr_grpo"     s - mean_g (Dr. GRPO: no std normalisation).
      "rloo"        s - mean of the other members of the group (leave-one-out).
      "reinforce++" no groups: the score is the reward of the last unmasked token of
                    its sequence (plus ``token_rewards`` [N], e.g. a KL penalty, if
                    given); per-token discounted returns (gamma) over the packed
                    sequences; then masked_whiten over all kept tokens (unless
                    ``whiten=False``: the returns, e.g. for a caller that whitens
                    over several processes' tokens). Needs ``cu_seqlens``.
    A one-member group has no baseline: its advantage is 0 (GRPO, RLOO). Group ids
    are any integers (made dense with torch.unique, one host sync on CUDA).

    Returns float32: [B] per sequence, or with ``cu_seqlens`` the advantage of every
    token [N] (masked tokens 0). ``validate`` checks that cu_seqlens is a packed layout
    of the N tokens (packed_gae's messages; a host sync on CUDA).
    """
    if kind not in KINDS:
        raise ValueError(f"group_advantages: kind must be one of {KINDS}; got {kind!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        got = describe(scores) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"group_advantages: scores must be a 1-D tensor [B]; got {got}")
    s = scores.double() if scores.dtype == torch.float64 else scores.float()  # [B]
    if cu_seqlens is not None and cu_seqlens.numel() != s.numel() + 1:
        raise ValueError(
            f"group_advantages: cu_seqlens must be [B+1] = [{s.numel() + 1}]; "
            f"got {describe(cu_seqlens)}"
        )
    if cu_seqlens is not None and validate:
        of, tokens = next(
            ((name, t) for name, t in (("mask", mask), ("token_rewards", token_rewards))
             if t is not None), ("cu_seqlens[-1]", None),
        )  # fmt: skip
        total = tokens.numel() if tokens is not None else int(cu_seqlens[-1])
        check_packed_layout("group_advantages", cu_seqlens, total, of)
    if kind == "reinforce++":
        if cu_seqlens is None:
            raise ValueError("group_advantages: kind='reinforce++' needs cu_seqlens")
        return _reinforce_pp(s, cu_seqlens, mask, gamma, token_rewards, whiten).float()

    if group_ids is None or group_ids.dtype.is_floating_point or group_ids.shape != s.shape:
        got = describe(group_ids) if isinstance(group_ids, torch.Tensor) else group_ids
        raise ValueError(
            f"group_advantages: group_ids must be an integer tensor [B] = [{s.numel()}] for "
            f"kind={kind!r}; got {got}"
        )
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B] in [0, G)
    num_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.bincount(inv, minlength=num_groups).to(s.dtype)[inv]  # [B]
    total = s.new_zeros(num_groups).index_add_(0, inv, s)[inv]  # [B]
    if kind == "rloo":
        baseline = (total - s) / (count - 1).clamp(min=1)
        adv = torch.where(count > 1, s - baseline, 0.0)
    else:
        dev = s - total / count  # [B]
        adv = dev
        if kind == "grpo" and normalize_std:
            sq = s.new_zeros(num_groups).index_add_(0, inv, dev * dev)[inv]
            std = torch.sqrt(sq / (count - 1).clamp(min=1))  # 0 for one-member groups
            adv = dev / (std + eps)
    adv = adv.float()
    if cu_seqlens is None:
        return adv
    total_tokens = mask.numel() if mask is not None else int(cu_seqlens[-1])
    seq, _ = _token_coords(cu_seqlens, total_tokens)
    per_token = adv[seq]  # [N]
    return per_token if mask is None else torch.where(mask.bool(), per_token, 0.0)


def _reinforce_pp(s, cu_seqlens, mask, gamma, token_rewards, whiten):
    """REINFORCE++ token advantages [N]: discounted returns, globally whitened."""
    if mask is not None:
        total_tokens = mask.numel()
    elif token_rewards is not None:
        total_tokens = token_rewards.numel()
    else:
        total_tokens = int(cu_seqlens[-1])
    seq, _ = _token_coords(cu_seqlens, total_tokens)  # [N]
    keep = (
        torch.ones(total_tokens, dtype=torch.bool, device=s.device) if mask is None else mask.bool()
    )
    # last kept token of every sequence (-1: none), without a host sync
    where_kept = torch.where(keep, torch.arange(total_tokens, device=s.device), -1)  # [N]
    last = torch.full_like(s, -1, dtype=torch.long).scatter_reduce_(0, seq, where_kept, "amax")
    rewards = (
        s.new_zeros(total_tokens) if token_rewards is None else token_rewards.to(s.dtype).clone()
    )
    rewards.index_add_(0, last.clamp(min=0), torch.where(last >= 0, s, 0.0))
    # with zero values and lam = 1, GAE is the discounted return sum_k gamma^k r_{t+k}
    returns, _ = packed_gae(
        rewards, torch.zeros_like(rewards), cu_seqlens, gamma=gamma, lam=1.0, mask=keep
    )
    return torch.where(keep, masked_whiten(returns, keep) if whiten else returns, 0.0)
