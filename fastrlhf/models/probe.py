"""Load-time logit probe: the trainer's log-probs against the HF model's own forward.

The trainer never calls the HF model's ``forward`` for log-probs: it runs the backbone on
packed rows (its own attention) and applies the lm_head and the family's post-head
transform itself (``PolicyModel.logits`` / ``token_logprobs``). A family that does
something the wrapper does not know (a new logit scale, an attention variant) would
silently train another objective. The probe runs a few tokens both ways, once at load,
and refuses a mismatch with one line naming the class and the difference.

Cost: one packed and one padded forward over ``PROBE_LENGTHS`` tokens, no gradients.
"""

from __future__ import annotations

import torch

PROBE_LENGTHS = (5, 3)  # two sequences: the packed path must also keep them apart
# max |log-prob difference| allowed: float32 rounding is ~1e-6 here; half precision
# rounds logits by ~|logit| * 2^-8, so the bound scales with the logits there
FP32_TOLERANCE = 1e-3
HALF_RELATIVE_TOLERANCE = 2.0**-5


class LogitProbeMismatch(ValueError):
    """The trainer's log-probs differ from the model's own ``forward(...).logits``."""


def _probe_ids(vocab: int, device) -> list[torch.Tensor]:
    """Deterministic, spread-out token ids below ``vocab`` (no tokenizer needed)."""
    out, start = [], 3
    for n in PROBE_LENGTHS:
        ids = (torch.arange(start, start + n) * 7919) % max(vocab - 3, 1) + 3
        out.append(ids.clamp(max=vocab - 1).to(device))
        start += n
    return out


def probe_difference(policy) -> tuple[float, float]:
    """(max |ours - HF| over the probe's log-probs, the tolerance for the model's dtype)."""
    weight = policy.lm_head_weight
    device, dtype = weight.device, weight.dtype
    v = policy.vocab_size
    seqs = _probe_ids(v, device)
    lengths = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):  # right padding; the mask hides it
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    modes = [(m, m.training) for m in policy.modules()]  # restored exactly, module by module
    policy.eval()
    try:
        with torch.no_grad():
            hidden = policy(torch.cat(seqs), positions, cu.to(device), width)  # [N, H]
            ours = policy.logits(hidden)[:, :v].float().log_softmax(-1)  # [N, V]
            with policy.padded_attention():
                logits = policy.model(input_ids=ids, attention_mask=mask).logits
            theirs = torch.cat([logits[b, :n] for b, n in enumerate(lengths)])
            theirs = theirs[:, :v].float().log_softmax(-1)  # [N, V]
    finally:
        for m, training in modes:
            m.training = training
    diff = float((ours - theirs).abs().max())
    if dtype in (torch.float32, torch.float64):
        tol = FP32_TOLERANCE
    else:
        tol = HALF_RELATIVE_TOLERANCE * (1.0 + float(logits.float().abs().max()))
    return diff, tol


def check_logits(policy) -> float:
    """Raise ``LogitProbeMismatch`` (one line) when the probe differs; return the difference."""
    diff, tol = probe_difference(policy)
    if not diff <= tol:  # NaN fails too
        name = type(policy.causal_lm).__name__
        raise LogitProbeMismatch(
            f"{name}: the trainer's log-probs differ from the model's own forward(...).logits "
            f"by {diff:.3g} (max over {sum(PROBE_LENGTHS)} tokens, tolerance {tol:.2g}; "
            f"post-head transform known: {policy.head.describe()}): the family computes "
            "something fastrlhf does not reproduce; set model.logit_probe=false to load anyway"
        )
    return diff
