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

Keyed sampling (layout invariance). With data-parallel PPO, rank r generates the rollouts
of its share of a step's prompts; for N processes to compute the update 1 process would,
a sequence's tokens must not depend on which rank generated it or which other sequences
shared its batch. A torch.Generator cannot give that: it draws noise for the whole
[B, V] batch in one stream, so row b's noise depends on b and on B. The keyed path makes
each draw a pure function of (sequence key, decode position):

    key[b] = sequence_keys(seed, step, ids)[b]   a hash of (seed, step, ids[b]), where
                                                 ids are GLOBAL sequence indices in the step
    u[b]   = keyed_uniform(key, t)[b]            one float64 uniform in (0, 1), 52 bits
    token  = inverse CDF of the filtered distribution at u[b]

The hashes are 32-bit integer mixing rounds on int64 tensors, whose products stay below
2**59: exact integer arithmetic, so every device computes the same bits. The inverse CDF
costs one cumulative sum and one cumulative max over V per row plus a binary search, the
same order of work as the exponential race (one random draw and one divide per entry,
plus an argmax), and it needs no host sync either. Exact agreement between layouts also
needs the logits to agree bit for bit; where a different batch changes them by rounding
(another GEMM blocking, another padding), a token can differ only when u lands within
that rounding of a CDF boundary.
"""

from __future__ import annotations

import torch

from fastrlhf.ops._checks import INDEX_DTYPES, check_tensor, describe


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


_MASK32 = 0xFFFFFFFF
# Odd and below 2**27: multiplying a 32-bit word by it is a bijection mod 2**32, and the
# product stays below 2**59, so int64 tensors never overflow (no device-specific wrap).
_MIX_MULT = 0x45D9F3B
# Start states of the hash lanes. Distinct per purpose, so a sequence key and a uniform
# never come out of the same hash of the same words.
_KEY_LANES = (0x243F6A88, 0x85A308D3)  # sequence_keys: high and low part of the key
_UNIFORM_LANES = (0x13198A2E, 0x03707344)  # keyed_uniform: high and low 26 bits


def _mix32(x):
    """A bijective 32-bit integer hash (xor-shift-multiply, twice, then a final xor-shift).

    ``x`` is a Python int or an int64 tensor holding values in [0, 2**32); the result is
    in the same range. The same operators on both give the same bits, which is how the
    Python-side (seed, step) state and the tensor-side ids are hashed alike.
    """
    x = ((x >> 16) ^ x) * _MIX_MULT & _MASK32
    x = ((x >> 16) ^ x) * _MIX_MULT & _MASK32
    return (x >> 16) ^ x


def _absorb_int(state: int, value: int) -> int:
    """Hash a Python int >= 0 of any size into a 32-bit state.

    The value is split into 32-bit words, low word first, and its word count goes in
    first, so the encoding is prefix-free: two different (seed, step) pairs never feed
    the same word sequence to the hash (e.g. seed 2**32 with step 5 vs seed 0 with a
    step whose words continue the sequence).
    """
    words = []
    while True:
        words.append(value & _MASK32)
        value >>= 32
        if value == 0:
            break
    state = _mix32(state ^ len(words))
    for w in words:
        state = _mix32(state ^ w)
    return state


def _check_nonneg_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int >= 0; got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def _words(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 tensor -> (low, high) 32-bit words of its two's-complement bit pattern."""
    # >> is arithmetic on int64; the mask keeps the high word's bits whatever the sign.
    return x & _MASK32, (x >> 32) & _MASK32


def sequence_keys(seed: int, step: int, ids: torch.Tensor) -> torch.Tensor:
    """int64 [B] sampling keys: a hash of (``seed``, ``step``, ``ids[b]``), element-wise.

    ``ids`` [B] (int32/int64) are GLOBAL sequence indices within the step, e.g.
    ``prompt_index * n_samples + sample``: a sequence keeps its key whichever rank or batch
    generates it. ``seed`` and ``step`` are Python ints >= 0 of any size.

    Keys lie in [0, 2**63). For one (seed, step), ids in [0, 2**32) get distinct keys (the
    key's high 32 bits are a bijection of the id); anything else collides with
    probability ~2**-63 per pair. Exact integer ops only: the same values on every device.
    """
    seed = _check_nonneg_int("seed", seed)
    step = _check_nonneg_int("step", step)
    check_tensor("ids", ids, dtypes=INDEX_DTYPES, ndim=1)
    lo, hi = _words(ids.long())  # [B], [B]
    lanes = []
    for start in _KEY_LANES:
        state = _absorb_int(_absorb_int(start, seed), step)  # Python int, no device work
        lanes.append(_mix32(_mix32(lo ^ state) ^ hi))  # [B] in [0, 2**32)
    # 32 + 31 bits: the whole high lane (the bijective part) and 31 bits of the low one.
    return (lanes[0] << 31) | (lanes[1] >> 1)


def keyed_uniform(keys: torch.Tensor, t: int) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1) for decode position ``t`` of each key.

    ``keys`` is an int64 tensor (usually [B] from ``sequence_keys``; any shape works
    element-wise) and ``t`` a Python int >= 0. Two 32-bit hashes of (key, t) give 26 bits
    each; the 52-bit integer m becomes (2m + 1) / 2**53, exact in float64, so the result
    lies in [2**-53, 1 - 2**-53] and is never 0 or 1.
    """
    t = _check_nonneg_int("t", t)
    check_tensor("keys", keys, dtypes=(torch.int64,))
    return _uniform_from_states(keys, [_absorb_int(start, t) for start in _UNIFORM_LANES])


def keyed_uniform_at(keys: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``keyed_uniform(keys, t)`` with the position as an int64 tensor of one element.

    The same bits as the Python-int version for 0 <= t < 2**32 (one 32-bit word: the
    prefix-free encoding absorbs the word count 1, then t), written with tensor ops only
    so that a compiled decode step can advance t in place without recompiling. No checks:
    the caller owns ``t``'s range.
    """
    states = [_mix32(_mix32(start ^ 1) ^ t) for start in _UNIFORM_LANES]
    return _uniform_from_states(keys, states)


def _uniform_from_states(keys: torch.Tensor, states) -> torch.Tensor:
    lo, hi = _words(keys)
    halves = []
    for state in states:
        # A third round after the last word: the high word of the key gets full avalanche.
        h = _mix32(_mix32(_mix32(lo ^ state) ^ hi))
        halves.append(h >> 6)  # the top 26 bits, the best mixed ones
    m = (halves[0] << 26) | halves[1]  # [B] in [0, 2**52)
    return (2 * m + 1).double() * 2.0**-53


def _check_keys(keys: object, logits: torch.Tensor) -> torch.Tensor:
    """ValueError naming ``keys`` unless it is an int64 [B] tensor on the logits' device."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    b = logits.shape[0]
    if keys.dtype != torch.int64 or tuple(keys.shape) != (b,) or keys.device != logits.device:
        raise ValueError(
            f"keys must be int64 of shape ({b},) on {logits.device} (one per logits row); "
            f"got {describe(keys)}"
        )
    return keys


def _inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """tokens [B]: the inverse CDF of each row of ``probs`` [B, V] (float32, >= 0, at least
    one entry > 0 per row) at ``u`` [B] (float64 in (0, 1)).

    Why a token j with probs[b, j] == 0 is never returned, whatever order the cumulative
    sum adds in (a parallel scan may not give c[j] == c[j - 1] for a zero entry):
        c' = cummax(where(p > 0, cumsum(p), 0)) is non-decreasing, and wherever p[j] == 0,
        c'[j] = max(c'[j - 1], 0) = c'[j - 1] (and c'[0] = 0 when p[0] == 0), exactly:
        max is exact. Its last entry, total, is > 0 (some p > 0, and a float sum of
        non-negative terms, one of them positive, is positive). x is u * total rounded
        to float32 and clamped to [0, the float32 below total], so 0 <= x < total.
        searchsorted(right=True) returns the first j with c'[j] > x; one exists since
        c'[V - 1] = total > x. That j has c'[j] > x >= c'[j - 1] (or c'[0] > x >= 0 when
        j = 0), so c'[j] differs from c'[j - 1] (from 0), so p[j] > 0.
    The clamp to V - 1 is then only a guard against NaN logits.
    Token j is drawn with probability (c'[j] - c'[j - 1]) / total: p[j] up to float32
    rounding of the cumulative sums, ~V * 2**-24 in the worst case.
    """
    cdf = torch.cumsum(probs, dim=-1)  # [B, V]
    cdf = torch.where(probs > 0, cdf, 0.0).cummax(dim=-1).values  # [B, V] non-decreasing
    total = cdf[:, -1:]  # [B, 1] > 0
    x = (u[:, None] * total.double()).float()  # [B, 1]; rounding may reach total ...
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))  # ... not past it
    tokens = torch.searchsorted(cdf, x, right=True).squeeze(-1)  # [B]
    return tokens.clamp_(max=probs.shape[-1] - 1)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
    position: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return ``(tokens [B] int64, logprobs [B] float32)``.

    ``logprobs`` are ``log_softmax(logits / T)`` of the drawn token from the unfiltered
    distribution (T = 1 when greedy); see the module docstring for why.

    Randomness: ``generator`` (a torch.Generator, or the global one when None) drives an
    exponential race over the whole batch. With ``keys`` (int64 [B], from
    ``sequence_keys``) row b's token is instead the inverse CDF of its filtered
    distribution at ``keyed_uniform(keys, position)[b]``: a function of that row's logits,
    key and ``position`` only (see the module docstring). Greedy decoding uses neither.
    """
    check_tensor("logits", logits, ndim=2)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if keys is not None:
        if generator is not None:
            raise ValueError(
                "pass either generator or keys, not both: keyed sampling draws no generator noise"
            )
        _check_keys(keys, logits)
        position = _check_nonneg_int("position", position)
    greedy = not do_sample or temperature == 0.0
    noise = uniforms = None  # greedy decoding draws nothing
    if not greedy and keys is not None:
        # one uniform per row, from the row's own key: independent of the batch
        uniforms = keyed_uniform(keys, position)
    elif not greedy:
        if generator is not None and generator.device != logits.device:
            raise ValueError(
                f"generator is on {generator.device} but logits are on {logits.device}; "
                "create the torch.Generator on the logits' device"
            )
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        noise.exponential_(1.0, generator=generator)
    return draw_tokens(
        logits, temperature, top_k, top_p, greedy=greedy, noise=noise, uniforms=uniforms
    )


def draw_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    *,
    greedy: bool,
    noise: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw of ``sample_next_token`` with its randomness given as tensors.

    ``noise`` [B, V] float32 Exp(1) draws (the generator path) or ``uniforms`` [B] float64
    in (0, 1) (the keyed path); neither when ``greedy``. Pure tensor code with no RNG
    inside, so a compiled decode step computes the same draw as the eager one from the
    same noise or uniforms. Arguments are trusted (``sample_next_token`` checks them).
    """
    logits = logits.float()  # [B, V]
    scale = 1.0 if greedy else temperature
    scaled = logits / scale  # [B, V]
    if greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
        probs = torch.softmax(filtered, dim=-1)  # [B, V], exact zeros where filtered
        if uniforms is not None:
            tokens = _inverse_cdf_sample(probs, uniforms)
        else:
            # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p. Unlike
            # torch.multinomial it is one elementwise op + argmax, needs no host sync, and
            # a filtered token (p = 0) can never win.
            tokens = (probs / noise).argmax(dim=-1)
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


__all__ = [
    "check_sampling_args",
    "draw_tokens",
    "keyed_uniform",
    "keyed_uniform_at",
    "sample_next_token",
    "sequence_keys",
    "top_k_filter",
    "top_p_filter",
]
