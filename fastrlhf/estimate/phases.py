"""One measured run of each phase, on the trainer's own code where it can run shape-only.

Every phase starts from the steady state of a later iteration (optimizer states exist,
gradients were dropped) and is measured with ``measure.tracked``, which counts the models
and optimizers resident in that phase from the start:

- generate (RL): the decode loop of ``fastrlhf.rollout.generate`` (padded prefill into a
  ``ReusableKVCache`` and its ``DecodeState``, then one ``decode.decode_step``, the
  trainer's own step: decoder step, fp32 logits with the policy's head, the draw, the
  bookkeeping), weights at their own dtype, autocast off, as ``generate`` does, with the
  batch padded to a power of two when the step is compiled (``rollout.compile``, "auto":
  on for CUDA). The host syncs of the real loop (EOS checks, packing) cannot run on fake
  tensors, so this mirror keeps only their allocations. Not modelled: the private memory
  pool of the step's CUDA graph (about one eager step's intermediates, held through the
  rollout; released with the cache unless ``memory_reuse``).
- score (RL): one chunk of ``train.micro_batch_tokens`` through each scoring forward:
  ``logprobs.response_logprobs`` of the policy and of the reference, the critic's values
  (``RolloutScoring._values``),
  ``reward_model_scores``, under the trainer's autocast and ``no_grad``.
- train: two micro-batches through ``PolicyUpdate.micro_losses`` (SFT / DPO / RM: their
  loss on the same log-prob path) and ``backward`` (the second adds into existing
  gradients), then the clipping and ``optimizer.step`` of the trainer.

``fused=False`` is what a user without our ops runs for the log-probs: materialised
[N, V] logits, a float32 log_softmax and a gather (``ops.reference.linear``). The PPO and
value losses run fused in both cases: the unfused ones read lengths and masks on the
host, which fake tensors cannot answer, and hold only O(R) float32 tensors either way.

Legend: B = sequences, P = prompt tokens, R = response tokens, L = P + R, N = tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings

import torch

from fastrlhf.config import RunConfig
from fastrlhf.estimate.measure import Measurement, PinnedSDPA, tracked
from fastrlhf.estimate.models import RL_STAGES, Models, Workload


def _autocast(cfg: RunConfig):
    # the trainers' bf16 region (CUDA only there; CPU autocast casts the same ops here)
    if cfg.train.bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _packed(n_seqs: int, seq_len: int, loss_len: int, vocab: int):
    """An Experience-shaped namespace: n_seqs sequences of seq_len tokens whose last
    loss_len positions predict a token (values are placeholders: only shapes matter)."""
    from fastrlhf.trainers.experience import Experience

    n, r = n_seqs * seq_len, n_seqs * loss_len
    cu = torch.arange(n_seqs + 1, dtype=torch.int32) * seq_len
    cu_r = torch.arange(n_seqs + 1, dtype=torch.int32) * loss_len
    start = seq_len - loss_len - 1  # the position before the first response token
    pos = (torch.arange(n_seqs)[:, None] * seq_len + start + torch.arange(loss_len)).flatten()
    f32 = lambda: torch.zeros(r, dtype=torch.float32)  # noqa: E731

    @dataclasses.dataclass
    class Shaped(Experience):
        # sizes the trainer reads from host copies, here plain ints (fake tensors hold none)
        max_seqlen: int = seq_len
        num_seqs: int = n_seqs

    return Shaped(
        input_ids=torch.zeros(n, dtype=torch.long),
        position_ids=torch.arange(seq_len).repeat(n_seqs),
        cu_seqlens=cu,
        positions=pos,
        labels=torch.zeros(r, dtype=torch.long) % vocab,
        cu_resp=cu_r,
        old_logprobs=f32(),
        advantages=f32(),
        ref_logprobs=f32(),
        values=f32(),
        returns=f32(),
    )


def _resident(cfg: RunConfig, m: Models, phase: str) -> list:
    """What the trainer keeps on the device in ``phase`` (``fastrlhf.rollout.memory``)."""
    ppo = cfg.ppo if cfg.stage in RL_STAGES else None
    out: list = list(m.trained())
    for model in m.frozen():
        if not (ppo and ppo.offload_models):  # offloaded: on the device only inside use()
            out.append(model)
    if not (ppo and ppo.offload_optimizer and phase != "step"):
        out.extend(m.optimizers)
    return out


# ---------------------------------------------------------------------------- generate


@torch.no_grad()
def generate(cfg: RunConfig, m: Models, w: Workload, *, reuse: bool) -> tuple[Measurement, int]:
    """(peak of prefill + one decode step, ATen kernels per decoded token)."""
    from fastrlhf.rollout import ReusableKVCache
    from fastrlhf.rollout.decode import StepSpec, bucket_rows, decode_step, resolve_compile
    from fastrlhf.rollout.generate import _policy_parts

    ppo = cfg.ppo
    policy = m.policy
    parts = _policy_parts(policy)
    B, P, R = w.rollout_seqs, w.prompt_len, w.loss_len
    # on CUDA the compiled step ("auto") runs the batch padded to a power of two
    Bb = bucket_rows(B) if resolve_compile(cfg.rollout.compile, torch.device("cuda")) else B
    greedy = not ppo.temperature  # GenerationConfig.greedy: temperature 0
    spec = StepSpec(
        temperature=float(ppo.temperature), top_k=int(ppo.top_k), top_p=float(ppo.top_p),
        greedy=greedy, keyed=False, pad_token_id=0, eos=(),
        logit_scale=float(parts.head.scale) if parts.head is not None else 1.0,
        softcap=parts.head.softcap if parts.head is not None else None,
    )  # fmt: skip
    # memory_reuse: the manager's cache (kept, reset in place); else a fresh one per rollout
    kv = ReusableKVCache()
    lm = policy.causal_lm
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("sdpa")  # padded batches with a mask, as padded_attention
    policy.eval()
    try:
        with tracked(*_resident(cfg, m, "generate")) as t, PinnedSDPA(), warnings.catch_warnings():
            # transformers renames past_key_values; generate() passes the same keyword
            warnings.filterwarnings("ignore", ".*past_key_values", FutureWarning)
            canvas = torch.zeros((Bb, P), dtype=torch.long)
            cache = kv.acquire(parts.hf_config, Bb, P + R, dtype=parts.kv_dtype)
            # the decode state (``_decode``): [Bb, capacity] buffers, the [Bb, V] noise
            st = kv.decode_state(torch.device("cpu"))
            if spec.uses_noise:
                st.noise_buffer(parts.weight.shape[0])
            st.prompt_mask[:, :P] = True
            st.width.fill_(P)
            st.lens.fill_(P)
            # Every prompt is full-length (worst case), so every mask below shows the decoder
            # all it may see: transformers then drops it after a host check (SDPA causal,
            # no mask tensor), a check fake tensors cannot answer; pass none instead.
            decoder = lambda **kw: parts.decoder(**{**kw, "attention_mask": None})  # noqa: E731
            hidden = decoder(
                input_ids=canvas, attention_mask=st.prompt_mask.long(),
                position_ids=torch.arange(P).expand(Bb, P), past_key_values=cache, use_cache=True,
            ).last_hidden_state[:, -1]  # fmt: skip
            del canvas, hidden  # the first draw frees them; decode steps allocate the same
            # one decode step: the cache is static, so every step allocates the same
            before = t.counter.kernels()
            decode_step(decoder, parts.weight, parts.bias, cache, st, spec)
            per_token = t.counter.kernels() - before
            if not reuse:
                del cache, st
                kv.release()  # freed when the rollout returns; the next one allocates anew
    finally:
        lm.set_attn_implementation(previous)
        policy.train()
    return t.result(), per_token


# ---------------------------------------------------------------------------- score


@torch.no_grad()
def score(cfg: RunConfig, m: Models, w: Workload, *, fused: bool) -> Measurement:
    from fastrlhf.trainers.logprobs import response_logprobs
    from fastrlhf.trainers.rewards import reward_model_scores
    from fastrlhf.trainers.rl_score import RolloutScoring

    vocab = m.policy.vocab_size
    exp = _packed(w.score_seqs, w.seq_len, w.loss_len, vocab)
    T = cfg.ppo.temperature or 1.0
    with tracked(*_resident(cfg, m, "score"), exp.input_ids) as t, _autocast(cfg):
        kept = []  # the scoring results stay alive until the phase ends
        if cfg.ppo.recompute_old_logprobs:
            kept.append(response_logprobs(m.policy, exp, exp, temperature=T, fused=fused))
        if m.reference is not None:
            kept.append(response_logprobs(m.reference, exp, exp, temperature=T, fused=fused))
        if m.critic is not None:
            kept.append(RolloutScoring._values(types.SimpleNamespace(critic=m.critic), exp))
        if m.reward is not None:
            kept.append(
                reward_model_scores(
                    m.reward, exp.input_ids, exp.position_ids, exp.cu_seqlens, w.seq_len
                )
            )
    return t.result()


# ---------------------------------------------------------------------------- train


def _rl_loss(cfg: RunConfig, m: Models, fused: bool):
    """``PolicyUpdate.micro_losses`` bound to the estimate's models."""
    from fastrlhf.config import PPOConfig
    from fastrlhf.rollout import GenerationConfig
    from fastrlhf.trainers.kl import kl_controller
    from fastrlhf.trainers.rl_score import RolloutScoring
    from fastrlhf.trainers.rl_update import PolicyUpdate

    ppo: PPOConfig = cfg.ppo.for_stage(cfg.stage)
    trainer = types.SimpleNamespace(
        # The unfused PPO / value losses read cu_seqlens and masks on the host (syncs that
        # fake tensors cannot answer); they hold O(R) float32 tensors either way, so the
        # fused ones stand in for them, and ``train`` switches only the log-prob path.
        ppo=dataclasses.replace(ppo, fused_ops=True),
        policy=m.policy,
        critic=m.critic,
        gen_config=GenerationConfig(temperature=ppo.temperature),
        kl=kl_controller(ppo.kl_coef, adaptive=False, target=1.0, horizon=1),
        device=torch.device("cpu"),
    )
    trainer._values = lambda exp: RolloutScoring._values(trainer, exp)

    def loss(exp):
        pg, vl, _ = PolicyUpdate.micro_losses(trainer, exp)
        return pg + ppo.vf_coef * vl

    return loss


def w_len(exp) -> int:
    """Loss tokens per sequence of an ``_packed`` experience (all sequences alike)."""
    return exp.labels.numel() // exp.num_seqs


def _logprob_loss(cfg: RunConfig, m: Models, fused: bool):
    """SFT / DPO / RM micro-batch losses on the trainers' log-prob and value paths."""
    import torch.nn.functional as F

    from fastrlhf.trainers.logprobs import response_logprobs

    def logps(model, exp):
        return response_logprobs(model, exp, exp, fused=fused)

    if cfg.stage == "sft":
        return lambda exp: -logps(m.policy, exp).mean()
    if cfg.stage == "rm":

        def rm_loss(exp):
            v = m.critic(exp.input_ids, exp.position_ids, exp.cu_seqlens, exp.max_seqlen)
            s = m.critic.sequence_scores(v, exp.cu_seqlens).view(-1, 2)
            return -F.logsigmoid(s[:, 0] - s[:, 1]).mean()

        return rm_loss

    def dpo_loss(exp):  # chosen and rejected of each pair packed next to each other
        per_seq = lambda model: logps(model, exp).view(-1, 2, w_len(exp)).sum(2)  # noqa: E731
        h = per_seq(m.policy)
        if m.reference is not None:
            with torch.no_grad():
                ref = per_seq(m.reference)
            h = h - ref
        return -F.logsigmoid(cfg.dpo.beta * (h[:, 0] - h[:, 1])).mean()

    return dpo_loss


def train(cfg: RunConfig, m: Models, w: Workload, *, fused: bool) -> tuple[Measurement, int]:
    """(peak of two micro-batches + clip + optimizer step, ATen kernels per optimizer step)."""
    from unittest import mock

    from fastrlhf.trainers import rl_update

    # the losses always run fused (see _rl_loss); the log-prob path follows ``fused``
    real = rl_update.response_logprobs
    logprobs = lambda *a, fused=True, **k: real(*a, fused=fused_logprobs, **k)  # noqa: E731
    fused_logprobs = fused
    with mock.patch.object(rl_update, "response_logprobs", logprobs):
        return _train(cfg, m, w, fused)


def _train(cfg: RunConfig, m: Models, w: Workload, fused: bool) -> tuple[Measurement, int]:
    from fastrlhf.distributed import clip_grad_norm_

    rl = cfg.stage in RL_STAGES
    loss_fn = _rl_loss(cfg, m, fused) if rl else _logprob_loss(cfg, m, fused)
    per = 2 if cfg.stage in ("rm", "dpo") else 1
    vocab = m.policy.vocab_size if m.policy is not None else 2
    exp = _packed(w.micro_seqs * per, w.seq_len, w.loss_len, vocab)
    runs = min(2, w.micro_batches)
    for module in m.trained():
        module.zero_grad(set_to_none=True)  # generate dropped them
    externals = [*_resident(cfg, m, "train"), exp.input_ids]
    with tracked(*externals) as fwd_bwd:
        for _ in range(runs):
            with _autocast(cfg):
                loss = loss_fn(exp)
            (loss / w.micro_batches).backward()
            del loss
    per_micro = fwd_bwd.counter.kernels() // runs
    max_norm = cfg.optim.max_grad_norm or float("inf")
    with tracked(*_resident(cfg, m, "step")) as step:
        for module in m.trained():
            # foreach=True: what torch picks on CUDA (it falls back to a per-tensor loop for
            # fake tensors, which would count one kernel per parameter)
            params = [p for p in module.parameters() if p.requires_grad]
            clip_grad_norm_(params, max_norm, foreach=True)
        for opt in m.optimizers:
            opt.step()
    for opt in m.optimizers:
        opt.zero_grad(set_to_none=True)
    a, b = fwd_bwd.result(), step.result()
    peak = a if a.total_bytes >= b.total_bytes else b
    return peak, per_micro * w.micro_batches + b.kernels
