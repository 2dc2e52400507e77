"""Next-token sampling for rollouts: temperature, top-k, top-p (nucleus), greedy, log-probs.

Shapes: B = sequences in the rollout batch, V = vocabulary.

Sampling distribution (the behaviour policy). From the last position's logits z [B, V]:

    1. scale by the temperature:           z / T
    2. top-k: keep the k largest scaled logits (ties with the k-th are kept), -inf elsewhere
    3. top-p: keep the smallest set of most probable tokens, from the top-k-filtered
       distribution, whose mass reaches p (the most probable token is always kept)
    4. sample from softmax of what is left, with the given torch.Generator

    greedy (``temperature == 0`` or ``do_sample=False``): argmax of z, first index on ties.

Log-probs (what PPO needs). The log-prob recorded for a sampled token is
``log_softmax(z / T)[token]`` from the UNFILTERED distribution, with the same
temperature the training pass uses (``linear_token_logprobs(..., temperature=T)``):
top-k/top-p change which tokens are drawn, never the definition of pi(a|s) that the
trainer recomputes and compares against. For greedy decoding T = 1 is used. (A token
the filters removed is never sampled, so its log-prob is never needed.)

All math is done in float32 whatever the logits' dtype: bf16 logits have ~3 significant
digits, too few for a cumulative sum over 100k probabilities or a log-prob that PPO
turns into an importance ratio.
"""

from __future__ import annotations

import torch

from fastrlhf.ops._checks import check_tensor


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logits`` [B, V] with everything below the k-th largest value of each row set to -inf.

    ``top_k <= 0`` or ``top_k >= V`` returns the input unchanged. Ties with the k-th value
    are kept (so a row may keep more than k tokens), which makes the filter a pure
    threshold and independent of the sort's tie order.
    """
    check_tensor("logits", logits, ndim=2)
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` [B, V] with the tokens outside each row's nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose probability mass
    (under softmax of ``logits``, computed in float32) reaches ``top_p``: token j is kept
    iff the mass of the strictly more probable tokens is < ``top_p`` (so tokens tied with
    the last one kept are kept too). The top token is always kept. ``top_p >= 1`` returns
    the input unchanged.
    """
    check_tensor("logits", logits, ndim=2)
    if not 0.0 < top_p:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits.float(), dim=-1, descending=True).values  # [B, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive prefix sum, [B, V]
    # The nucleus is a prefix of the sorted order (mass_before only grows); the top token
    # always belongs to it, so n_keep >= 1.
    n_keep = (mass_before < top_p).sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    cutoff = sorted_logits.gather(-1, n_keep - 1)  # [B, 1] smallest kept logit
    # A threshold rather than a scatter of the sorted decision: tokens tied with the
    # cut-off are all kept, so the result does not depend on how the sort orders ties.
    return logits.masked_fill(logits.float() < cutoff, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return ``(tokens [B] int64, logprobs [B] float32)``.

    ``logprobs`` are ``log_softmax(logits / T)`` of the drawn token from the unfiltered
    distribution (T = 1 when greedy); see the module docstring for why.
    """
    check_tensor("logits", logits, ndim=2)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()  # [B, V]
    greedy = not do_sample or temperature == 0.0
    scale = 1.0 if greedy else temperature
    scaled = logits / scale  # [B, V]
    if greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
        probs = torch.softmax(filtered, dim=-1)  # [B, V], exact zeros where filtered
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p. Unlike
        # torch.multinomial it is one elementwise op + argmax, needs no host sync, and a
        # filtered token (p = 0) can never win.
        if generator is not None and generator.device != probs.device:
            raise ValueError(
                f"generator is on {generator.device} but logits are on {probs.device}; "
                "create the torch.Generator on the logits' device"
            )
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
        tokens = (probs / race).argmax(dim=-1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the bad sampling argument."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


__all__ = ["check_sampling_args", "sample_next_token", "top_k_filter", "top_p_filter"]
