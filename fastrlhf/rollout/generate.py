"""Rollout generation: batched sampling with a reusable KV cache, packed output with log-probs.

Shapes: B = sequences, P = longest prompt, R = max new tokens, S = P + R (canvas width),
H = hidden size, V = vocabulary, N = packed tokens (prompts + responses, no padding).

What ``generate`` computes, for prompts given in packed form (``prompt_ids`` [Np] and
``prompt_cu_seqlens`` [B + 1]):

1. The prompts are left-padded into a [B, S] canvas (real tokens flush right against the
   response area) with a 0/1 attention mask and position ids that count real tokens only,
   so each row sees exactly what an unpadded forward of that sequence sees.
2. Prefill: one forward of the decoder over [B, P] fills a ``StaticCache`` that
   ``ReusableKVCache`` keeps between rollouts (reset, not reallocated).
3. Decode: each step (``decode.decode_step``) feeds every row's last token, turns the
   last hidden state into fp32 logits with the policy's own ``lm_head`` weight and bias
   (the ones training passes to ``linear_token_logprobs``), draws a token (the draw of
   ``sampling.sample_next_token``: temperature, top-k, top-p, greedy; from a
   torch.Generator, or keyed per sequence and position with ``sample_keys``) and
   records ``log_softmax(logits / T)`` of it from the unfiltered distribution. With
   ``GenerationConfig.compile`` on (default on CUDA) the step is one compiled graph at a
   power-of-two batch bucket, replayed as a CUDA graph on CUDA; the tokens drawn are the
   same (see ``fastrlhf.rollout.decode``). A row stops
   after its first EOS (the EOS is part of the response: the policy must learn to stop)
   or after R tokens; rows that are done keep being fed a pad token whose outputs are
   discarded. The loop ends when every row is done, checked every
   ``eos_check_interval`` steps (each check is a host sync).
4. The canvas is packed: per sequence, prompt then response, nothing after EOS.

The policy runs in eval mode under ``torch.no_grad`` and its train/eval mode is restored
afterwards: the same weights serve generation and training, there is no inference copy.
Dropout is off while generating, so the recorded log-probs match an eval-mode forward.

Model interface: an HF causal LM (``get_decoder()`` + ``get_output_embeddings()``), or a
wrapper (our ``PolicyModel``) exposing the HF model as ``.model`` and the head as
``.lm_head_weight`` / ``.lm_head_bias``. Only the decoder's ``past_key_values`` interface is
used, so any HF decoder works. The head's post-transform (soft-cap, logit scale; the
wrapper's ``.head``, else ``fastrlhf.models.heads.head_transform``) is applied to the fp32
logits before sampling, as the training pass applies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastrlhf.ops._checks import INDEX_DTYPES, check_tensor, describe
from fastrlhf.rollout.cache import ReusableKVCache
from fastrlhf.rollout.decode import (
    StepRunner,
    StepSpec,
    bucket_rows,
    check_compile_setting,
    record_token,
    resolve_compile,
)
from fastrlhf.rollout.sampling import check_sampling_args, draw_tokens, keyed_uniform

IGNORE_INDEX = -100


@dataclass
class GenerationConfig:
    """How responses are sampled. ``temperature == 0`` or ``do_sample=False`` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    do_sample: bool = True
    eos_token_id: int | tuple[int, ...] | None = None  # None: no early stop (pass the tokenizer's)
    pad_token_id: int = 0  # fed to finished rows and used as left padding; never attended
    eos_check_interval: int = 8  # decode steps between "all rows finished?" host syncs
    # the decode step compiled (torch.compile, + CUDA graphs on CUDA): "auto" = on for
    # CUDA, off for CPU (True / False: on / off); see fastrlhf.rollout.decode
    compile: str | bool = "auto"

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The T of the recorded log_softmax(logits / T): the sampling T, 1 when greedy."""
        return 1.0 if self.greedy else float(self.temperature)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.eos_check_interval, int) or self.eos_check_interval < 1:
            raise ValueError(
                f"eos_check_interval must be an int >= 1, got {self.eos_check_interval!r}"
            )
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        check_compile_setting(self.compile)


@dataclass
class RolloutBatch:
    """A rollout in the training layout (the fields of ``fastrlhf.data.PackedBatch``, plus two).

    ``labels[i]`` is the token at i + 1 when that token is a response token of the same
    sequence, else -100; ``loss_mask = labels != -100``; ``old_logprobs[i]`` is the
    generation-time log-prob of ``labels[i]`` (0 where masked). A training pass computing
    ``linear_token_logprobs(hidden, W, labels, temperature=T)`` lines up with it.
    """

    input_ids: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64, restart at 0 for each sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    labels: torch.Tensor  # [N] int64, shifted, -100 outside responses
    loss_mask: torch.Tensor  # [N] bool
    old_logprobs: torch.Tensor  # [N] float32, aligned with labels

    def as_packed_batch(self):
        """The same tokens as a ``fastrlhf.data.PackedBatch`` (old log-probs stay here)."""
        from fastrlhf.data.batch import PackedBatch

        return PackedBatch(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seqlens=self.cu_seqlens,
            max_seqlen=self.max_seqlen,
            labels=self.labels,
            num_loss_tokens=int(self.loss_mask.sum()),
        )


@dataclass
class Rollout:
    """Prompts + sampled responses, packed, with token-aligned response mask and log-probs."""

    input_ids: torch.Tensor  # [N] int64: prompt then response, per sequence
    position_ids: torch.Tensor  # [N] int64
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    response_mask: torch.Tensor  # [N] bool: True on response tokens (EOS included)
    logprobs: torch.Tensor  # [N] float32: log-prob of the token at i when sampled, else 0
    prompt_lens: torch.Tensor  # [B] int64
    response_lens: torch.Tensor  # [B] int64, >= 1
    finished: torch.Tensor  # [B] bool: the response ended with EOS
    temperature: float  # the T of the recorded log-probs

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def sequences(self) -> list[torch.Tensor]:
        """Each sequence's tokens (prompt + response), as views into ``input_ids``."""
        return list(torch.split(self.input_ids, (self.prompt_lens + self.response_lens).tolist()))

    def responses(self) -> list[torch.Tensor]:
        """Each response's tokens (EOS included when it was sampled)."""
        return list(torch.split(self.input_ids[self.response_mask], self.response_lens.tolist()))

    def to_training_batch(self) -> RolloutBatch:
        """Shift to next-token labels over response tokens only (see ``RolloutBatch``)."""
        next_is_response = torch.zeros_like(self.response_mask)  # [N]
        next_is_response[:-1] = self.response_mask[1:]
        # the token after a sequence's last one belongs to the next sequence
        next_is_response[self.cu_seqlens[1:].long() - 1] = False
        next_ids = torch.roll(self.input_ids, -1)
        next_lp = torch.roll(self.logprobs, -1)
        return RolloutBatch(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seqlens=self.cu_seqlens,
            max_seqlen=self.max_seqlen,
            labels=torch.where(next_is_response, next_ids, IGNORE_INDEX),
            loss_mask=next_is_response,
            old_logprobs=torch.where(next_is_response, next_lp, 0.0),
        )


def pack_prompts(
    prompts: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token tensors -> ``(prompt_ids [Np] int64, prompt_cu_seqlens [B + 1] int32)``."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        check_tensor(f"prompts[{i}]", p, dtypes=INDEX_DTYPES, ndim=1)
    lens = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)
    cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    device = device or prompts[0].device
    return torch.cat([p.to(device, torch.long) for p in prompts]), cu.to(device)


@dataclass
class _PolicyParts:
    decoder: torch.nn.Module  # HF backbone: (input_ids, attention_mask, position_ids, cache)
    weight: torch.Tensor  # [V, H] lm_head rows in use
    bias: torch.Tensor | None  # [V]
    hf_config: object
    hf_model: torch.nn.Module  # the HF causal LM (its attention implementation is switched)
    head: object = None  # HeadTransform: the family's post-head logit transform

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """The K/V dtype: that of the hidden states, i.e. of the input embeddings."""
        embed = getattr(self.decoder, "get_input_embeddings", lambda: None)()
        return None if embed is None else embed.weight.dtype


def _policy_parts(model: torch.nn.Module) -> _PolicyParts:
    """Split ``model`` into decoder + lm_head, from a PolicyModel-like wrapper or an HF LM."""
    if hasattr(model, "lm_head_weight"):  # PolicyModel-like wrapper around an HF model
        hf = model.model
        out = getattr(hf, "get_output_embeddings", lambda: None)()
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            decoder = hf.get_decoder() if out is not None else hf
        weight, bias = model.lm_head_weight, getattr(model, "lm_head_bias", None)
    else:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if head is None or not hasattr(model, "get_decoder"):
            raise TypeError(
                f"model ({type(model).__name__}) must be an HF causal LM (get_decoder() and "
                "get_output_embeddings()) or expose .model, .lm_head_weight and .lm_head_bias"
            )
        hf, decoder, weight, bias = model, model.get_decoder(), head.weight, head.bias
    # Rows past the tokenizer's vocabulary (padded lm_heads) are never sampled and are
    # left out of the softmax, as linear_token_logprobs(vocab_size=...) does in training.
    v = min(int(getattr(model, "vocab_size", None) or weight.shape[0]), weight.shape[0])
    bias = None if bias is None else bias[:v]
    from fastrlhf.models.heads import head_transform

    head = getattr(model, "head", None) or head_transform(hf.config)
    return _PolicyParts(decoder, weight[:v], bias, hf.config, hf, head)


def _decode_attention(model: torch.nn.Module, parts: _PolicyParts):
    """Context switching our packed (mask-less) attention to SDPA while decoding."""
    if hasattr(model, "padded_attention"):
        return model.padded_attention()
    from fastrlhf.models.attention import padded_attention

    return padded_attention(parts.hf_model)


def _check_prompts(prompt_ids: torch.Tensor, prompt_cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Validate the packed prompts; return their lengths [B] (int64, same device)."""
    check_tensor("prompt_ids", prompt_ids, dtypes=INDEX_DTYPES, ndim=1)
    check_tensor("prompt_cu_seqlens", prompt_cu_seqlens, dtypes=INDEX_DTYPES, ndim=1)
    if prompt_cu_seqlens.numel() < 2:
        raise ValueError(
            f"prompt_cu_seqlens needs at least 2 entries (one sequence); got "
            f"{describe(prompt_cu_seqlens)}"
        )
    cu = prompt_cu_seqlens.long()
    lens = cu.diff()
    if int(cu[0]) != 0 or int(cu[-1]) != prompt_ids.numel():
        raise ValueError(
            f"prompt_cu_seqlens must start at 0 and end at prompt_ids.numel() = "
            f"{prompt_ids.numel()}; got first {int(cu[0])}, last {int(cu[-1])}"
        )
    if bool((lens < 1).any()):
        raise ValueError(
            f"every prompt needs at least one token; prompt_cu_seqlens has empty sequences at "
            f"{(lens < 1).nonzero().flatten().tolist()}"
        )
    return lens


def _check_sample_keys(
    sample_keys: torch.Tensor | None, generator: torch.Generator | None, num_prompts: int
) -> None:
    """ValueError unless ``sample_keys`` is None or int64 [B], and not given with a generator."""
    if sample_keys is None:
        return
    if generator is not None:
        raise ValueError("pass either generator or sample_keys to generate(), not both")
    if not isinstance(sample_keys, torch.Tensor):
        raise TypeError(f"sample_keys must be a torch.Tensor, got {type(sample_keys).__name__}")
    if sample_keys.dtype != torch.int64 or tuple(sample_keys.shape) != (num_prompts,):
        raise ValueError(
            f"sample_keys must be int64 of shape ({num_prompts},), one key per prompt in "
            f"packed order; got {describe(sample_keys)}"
        )


@torch.no_grad()
def _decode(
    parts: _PolicyParts,
    prompt_ids: torch.Tensor,
    lens: torch.Tensor,
    config: GenerationConfig,
    kv_cache: ReusableKVCache,
    generator: torch.Generator | None,
    sample_keys: torch.Tensor | None,
) -> Rollout:
    weight = parts.weight
    device = weight.device
    prompt_ids, lens = prompt_ids.to(device).long(), lens.to(device)
    B, R = lens.numel(), config.max_new_tokens
    P = int(lens.max())
    S = P + R
    compiled = resolve_compile(config.compile, device)
    # compiled steps run at static shapes: the batch padded to a power of two with rows
    # that are finished from the start (one pad-token prompt); eager runs the batch as is
    Bb = bucket_rows(B) if compiled else B
    spec = StepSpec(
        temperature=float(config.temperature),
        top_k=int(config.top_k),
        top_p=float(config.top_p),
        greedy=config.greedy,
        keyed=sample_keys is not None,
        pad_token_id=int(config.pad_token_id),
        eos=_as_tuple(config.eos_token_id),
        # the family's post-head transform, when the parts carry one
        logit_scale=float(parts.head.scale) if parts.head is not None else 1.0,
        softcap=parts.head.softcap if parts.head is not None else None,
    )

    # Left-padded canvas [Bb, P]: prompt flush right, responses follow in columns P...
    row_lens = torch.ones(Bb, dtype=torch.long, device=device)
    row_lens[:B] = lens
    prompt_valid = torch.arange(P, device=device)[None] >= (P - row_lens)[:, None]  # [Bb, P]
    canvas = torch.full((Bb, P), config.pad_token_id, dtype=torch.long, device=device)
    canvas[:B][prompt_valid[:B]] = prompt_ids  # row-major fill == packed order
    cache = kv_cache.acquire(parts.hf_config, Bb, S, device=device, dtype=parts.kv_dtype)
    st = kv_cache.decode_state(device)  # [Bb, capacity] buffers, reused while the cache is
    st.prompt_mask.zero_()
    st.prompt_mask[:, :P] = prompt_valid
    st.width.fill_(P)
    st.lens.copy_(row_lens)
    st.finished.zero_()
    st.finished[B:] = True  # bucket padding: never alive, never counted
    st.response_lens.zero_()
    st.keys.zero_()
    if sample_keys is not None:
        st.keys[:B] = sample_keys.to(device)
    noise = st.noise_buffer(weight.shape[0])[:B] if spec.uses_noise else None
    if noise is not None and generator is not None and generator.device != device:
        raise ValueError(
            f"generator is on {generator.device} but the model is on {device}; "
            "create the torch.Generator on the model's device"
        )

    # Prefill (eager; one forward over the prompts) fills the static cache. The 2-D mask
    # covers the cache's whole capacity; response columns are hidden by causality until
    # written.
    positions = (prompt_valid.cumsum(-1) - 1).clamp(min=0)  # [Bb, P], real tokens 0..len-1
    hidden = parts.decoder(
        input_ids=canvas,
        attention_mask=st.prompt_mask.long(),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]  # [Bb, H]
    t0 = torch.zeros((), dtype=torch.long, device=device)
    if noise is not None:
        noise.exponential_(1.0, generator=generator)
    token, lp = draw_tokens(
        spec.head_logits(hidden, weight, parts.bias),
        spec.temperature,
        spec.top_k,
        spec.top_p,
        greedy=spec.greedy,
        noise=st.noise if noise is not None else None,
        uniforms=keyed_uniform(st.keys, 0) if spec.keyed and not spec.greedy else None,
    )
    record_token(st, token, lp, t0, spec)

    # Decode: step t feeds response token t - 1 and draws token t (decode.decode_step).
    step = StepRunner(compiled, parts, cache, st, spec, kv_cache.graphs)
    for t in range(1, R):
        if t % config.eos_check_interval == 0 and bool(st.finished.all()):
            break  # host sync: every row has emitted EOS
        if noise is not None:
            noise.exponential_(1.0, generator=generator)
        step()

    response = slice(P, P + R)
    return _pack(
        torch.cat([canvas[:B], st.out_tokens[:B, response]], dim=1),
        prompt_valid[:B],
        st.out_logprobs[:B, response],
        st.response_lens[:B].clone(),
        st.finished[:B].clone(),
        config,
    )


def _pack(
    tokens: torch.Tensor,  # [B, S] left-padded canvas
    prompt_valid: torch.Tensor,  # [B, P] bool
    response_lp: torch.Tensor,  # [B, R] float32
    response_lens: torch.Tensor,  # [B] int64
    finished: torch.Tensor,  # [B] bool
    config: GenerationConfig,
) -> Rollout:
    """Keep each row's prompt tokens and first ``response_lens[b]`` response tokens."""
    (B, P), R = prompt_valid.shape, response_lp.shape[1]
    device = tokens.device
    lens = prompt_valid.sum(1)  # [B]
    response_valid = torch.arange(R, device=device)[None] < response_lens[:, None]  # [B, R]
    valid = torch.cat([prompt_valid, response_valid], dim=1)  # [B, S]
    seq_lens = lens + response_lens
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = seq_lens.cumsum(0)
    logprobs = torch.cat([torch.zeros(B, P, device=device), response_lp], dim=1)  # [B, S]
    # boolean indexing walks rows in order: the result is packed, sequence after sequence
    return Rollout(
        input_ids=tokens[valid],
        position_ids=(valid.cumsum(1) - 1)[valid],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seq_lens.max()),
        response_mask=torch.cat([torch.zeros_like(prompt_valid), response_valid], dim=1)[valid],
        logprobs=logprobs[valid],
        prompt_lens=lens,
        response_lens=response_lens,
        finished=finished,
        temperature=config.logprob_temperature,
    )


def _as_tuple(eos: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)


def _autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_cu_seqlens: torch.Tensor,
    config: GenerationConfig,
    *,
    kv_cache: ReusableKVCache | None = None,
    generator: torch.Generator | None = None,
    sample_keys: torch.Tensor | None = None,
) -> Rollout:
    """Sample one response per packed prompt with ``model``'s own weights.

    Args:
        model: HF causal LM or PolicyModel-like wrapper (see the module docstring).
        prompt_ids: [Np] int token ids, the prompts concatenated.
        prompt_cu_seqlens: [B + 1] int32/int64 offsets; every prompt has >= 1 token.
        config: sampling settings.
        kv_cache: a ``ReusableKVCache`` to reuse across calls (a throwaway one if None).
        generator: a torch.Generator on the model's device, for reproducible sampling.
        sample_keys: [B] int64, one key per prompt in packed order (``sequence_keys``):
            response token t of prompt b is then drawn from ``keyed_uniform(keys, t)[b]``,
            so a sequence's rollout does not depend on the rest of the batch or on which
            rank generates it. Excludes ``generator``. Moved to the model's device.

    Returns a packed ``Rollout``. The model's train/eval mode is restored on return.

    Decoding runs at the weights' own precision, with any enclosing autocast switched
    off: under autocast with fp32 weights, RoPE promotes K to fp32 while V stays in the
    autocast dtype, which a static KV cache (one dtype per layer) cannot hold. Keep the
    policy's weights in bf16 to decode in bf16.
    """
    config.validate()
    lens = _check_prompts(prompt_ids, prompt_cu_seqlens)
    _check_sample_keys(sample_keys, generator, lens.numel())
    kv_cache = kv_cache if kv_cache is not None else ReusableKVCache()
    parts = _policy_parts(model)
    was_training = model.training
    model.eval()
    try:
        with _decode_attention(model, parts), _autocast_off(prompt_ids.device):
            return _decode(parts, prompt_ids, lens, config, kv_cache, generator, sample_keys)
    finally:
        model.train(was_training)
