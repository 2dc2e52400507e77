"""Rollout generation: correctness against uncached references, sampling controls, EOS,
KV-cache reuse, and agreement of generation-time log-probs with the training pass."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.rollout import GenerationConfig, ReusableKVCache, generate, pack_prompts
from tests.helpers import assert_close, assert_close_to_reference
from tests.rollout.tiny import VOCAB, random_prompts, tiny_lm

LENGTHS = (5, 1, 9, 3, 7)  # odd lengths, one single-token prompt: real left padding


def _greedy_reference(model, prompts, steps, weight=None, bias=None):
    """Greedy decoding without a cache: a full forward of each unpadded sequence per step.
    Returns per sequence (response tokens, float64 log-probs at T = 1)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            seq, lps = p.clone(), []
            for _ in range(steps):
                hidden = model.model(input_ids=seq[None], use_cache=False).last_hidden_state[0, -1]
                w = model.lm_head.weight if weight is None else weight
                logits = hidden.double() @ w.double().t()
                if bias is not None:
                    logits = logits + bias.double()
                tok = logits.argmax()
                lps.append(torch.log_softmax(logits, -1)[tok])
                seq = torch.cat([seq, tok[None]])
            out.append((seq[p.numel() :], torch.stack(lps)))
    return out


def _run(model, prompts, seed=0, kv_cache=None, **cfg):
    ids, cu = pack_prompts(prompts)
    g = torch.Generator().manual_seed(seed)
    return generate(model, ids, cu, GenerationConfig(**cfg), kv_cache=kv_cache, generator=g)


def _assert_same_rollout(a, b):
    for name in ("input_ids", "position_ids", "cu_seqlens", "response_mask", "logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.response_lens, b.response_lens)
    assert torch.equal(a.finished, b.finished)


def test_greedy_matches_uncached_full_forward_reference():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    r = _run(model, prompts, max_new_tokens=6, temperature=0.0)
    ref = _greedy_reference(model, prompts, 6)
    assert r.responses().__len__() == len(prompts)
    for b, (resp, lp) in enumerate(ref):
        assert torch.equal(r.responses()[b], resp), b
        start = int(r.cu_seqlens[b]) + len(prompts[b])
        assert_close(r.logprobs[start : start + 6], lp, atol=2e-5, name=f"logprobs[{b}]")
    # the packed layout: prompt then response per sequence, positions restart at 0
    for b, seq in enumerate(r.sequences()):
        assert torch.equal(seq, torch.cat([prompts[b], ref[b][0]]))
    assert torch.equal(r.position_ids, torch.cat([torch.arange(n + 6) for n in LENGTHS]))
    assert r.max_seqlen == max(LENGTHS) + 6
    assert r.cu_seqlens.dtype == torch.int32


def test_greedy_and_seeded_sampling_are_deterministic():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    _assert_same_rollout(
        _run(model, prompts, max_new_tokens=5, do_sample=False),
        _run(model, prompts, max_new_tokens=5, do_sample=False, seed=9),  # seed irrelevant
    )
    a = _run(model, prompts, seed=3, max_new_tokens=8, temperature=1.2)
    _assert_same_rollout(a, _run(model, prompts, seed=3, max_new_tokens=8, temperature=1.2))
    c = _run(model, prompts, seed=4, max_new_tokens=8, temperature=1.2)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_top_k_one_equals_greedy():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    greedy = _run(model, prompts, max_new_tokens=7, temperature=0.0)
    topk1 = _run(model, prompts, seed=11, max_new_tokens=7, temperature=0.8, top_k=1)
    assert torch.equal(greedy.input_ids, topk1.input_ids)
    # the log-probs differ: T = 0.8 vs T = 1 for greedy, both of the unfiltered softmax
    assert topk1.temperature == 0.8 and greedy.temperature == 1.0
    assert not torch.allclose(greedy.logprobs, topk1.logprobs)


def test_eos_stops_each_row_and_packs_no_padding():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    free = _run(model, prompts, seed=5, max_new_tokens=12, temperature=1.0)
    free_resp = free.responses()
    # EOS ids: row b's token at step b + 1, so every row ends by step b + 1 (earlier when it
    # samples another row's EOS id first)
    eos = tuple(int(free_resp[b][b + 1]) for b in range(len(prompts)))
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = _run(model, prompts, seed=5, max_new_tokens=12, eos_token_id=eos, eos_check_interval=1)
    finally:
        hook.remove()
    resp = r.responses()
    for b, full in enumerate(free_resp):
        hits = [i for i, t in enumerate(full.tolist()) if t in eos]
        n = hits[0] + 1 if hits else 12
        # same draws until EOS (the generator advances identically), EOS included, then stop
        assert torch.equal(resp[b], full[:n]), b
        assert int(r.response_lens[b]) == n
        assert bool(r.finished[b]) == bool(hits)
        assert not any(t in eos for t in resp[b][:-1].tolist())
    # nothing padded in: exactly prompt + response tokens per sequence
    assert r.input_ids.numel() == sum(LENGTHS) + int(r.response_lens.sum())
    assert int(r.response_mask.sum()) == int(r.response_lens.sum())
    assert torch.equal(r.cu_seqlens.diff().long(), torch.tensor(LENGTHS) + r.response_lens)
    # early stop: prefill + one decode forward per step until the last row finished
    assert bool(r.finished.all())
    assert len(calls) == int(r.response_lens.max()) <= len(prompts) + 1 < 12


def test_eos_check_interval_changes_nothing_but_speed():
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    free = _run(model, prompts, seed=2, max_new_tokens=10)
    eos = int(free.responses()[1][1])
    a = _run(model, prompts, seed=2, max_new_tokens=10, eos_token_id=eos, eos_check_interval=1)
    b = _run(model, prompts, seed=2, max_new_tokens=10, eos_token_id=eos, eos_check_interval=8)
    _assert_same_rollout(a, b)


def test_kv_cache_is_reused_without_reallocation_and_gives_fresh_results():
    model = tiny_lm()
    kv = ReusableKVCache()
    first = _run(model, random_prompts((4, 8, 2, 6), seed=7), kv_cache=kv, max_new_tokens=9)
    ptrs = [t.data_ptr() for t in kv.buffers()]
    assert len(ptrs) == 2 * model.config.num_hidden_layers and kv.allocations == 1
    # other prompts, other lengths (same capacity granule), other seed
    prompts = random_prompts((6, 3, 10, 1), seed=8)
    reused = _run(model, prompts, seed=1, kv_cache=kv, max_new_tokens=9, top_p=0.9)
    assert [t.data_ptr() for t in kv.buffers()] == ptrs and kv.allocations == 1
    fresh = _run(model, prompts, seed=1, kv_cache=ReusableKVCache(), max_new_tokens=9, top_p=0.9)
    _assert_same_rollout(reused, fresh)
    assert not torch.equal(first.input_ids[:10], reused.input_ids[:10])


def test_generation_inside_autocast_decodes_at_the_weights_precision():
    # The trainers wrap forwards in bf16 autocast over fp32 weights (on CUDA; CPU autocast
    # behaves the same). There RoPE turns K into fp32 while V stays bf16, which a static
    # cache cannot hold: generate() must switch autocast off, reuse its cache across
    # rollouts, and give exactly what it gives outside autocast.
    model = tiny_lm()
    kv = ReusableKVCache()
    prompts = random_prompts((4, 8, 2))
    plain = _run(model, prompts, max_new_tokens=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _run(model, prompts, kv_cache=kv, max_new_tokens=5)
        _run(model, random_prompts((3, 5, 7), seed=3), kv_cache=kv, max_new_tokens=5)
    _assert_same_rollout(inside, plain)
    assert {t.dtype for t in kv.buffers()} == {torch.float32} and kv.allocations == 1


def test_kv_cache_reallocates_only_when_it_must():
    model = tiny_lm()
    kv = ReusableKVCache(granule=16)
    _run(model, random_prompts((3, 4)), kv_cache=kv, max_new_tokens=5)
    assert (kv.allocations, kv.capacity) == (1, 16)
    _run(model, random_prompts((9, 2)), kv_cache=kv, max_new_tokens=5)  # 14 tokens: fits
    assert kv.allocations == 1
    _run(model, random_prompts((9, 2)), kv_cache=kv, max_new_tokens=9)  # 18: grows
    assert (kv.allocations, kv.capacity) == (2, 32)
    _run(model, random_prompts((3, 4, 5)), kv_cache=kv, max_new_tokens=5)  # other batch
    assert kv.allocations == 3
    kv.release()
    assert not kv.alive and kv.buffers() == [] and kv.nbytes() == 0
    _run(model, random_prompts((3, 4, 5)), kv_cache=kv, max_new_tokens=5)
    assert kv.allocations == 4 and kv.nbytes() > 0


@pytest.mark.parametrize("cfg", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(top_p=0.5)])
def test_logprobs_match_a_packed_training_forward(cfg):
    model = tiny_lm()
    prompts = random_prompts(LENGTHS)
    r = _run(model, prompts, seed=3, max_new_tokens=10, **cfg)
    batch = r.to_training_batch()
    # training pass: ONE packed forward of prompt+response (HF finds the sequence
    # boundaries from position_ids), then log softmax(logits / T) at the shifted labels
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids[None],
            position_ids=batch.position_ids[None],
            use_cache=False,
        ).logits[0]
    t = cfg.get("temperature", 1.0)
    lp = torch.log_softmax(logits.double() / t, -1)
    lp = lp.gather(-1, batch.labels.clamp(min=0)[:, None])[:, 0]
    m = batch.loss_mask
    assert int(m.sum()) == int(r.response_lens.sum())
    assert_close(batch.old_logprobs[m], lp[m], atol=5e-5, name="generation vs training")
    assert bool((batch.old_logprobs[~m] == 0).all())


def test_training_batch_layout():
    model = tiny_lm()
    prompts = random_prompts((2, 4, 1))
    r = _run(model, prompts, seed=0, max_new_tokens=3)
    batch = r.to_training_batch()
    labels, old = [], []
    for b, seq in enumerate(r.sequences()):
        n_prompt = len(prompts[b])
        start = int(r.cu_seqlens[b])
        for i in range(seq.numel()):
            target = i + 1  # the hidden state at i predicts token i + 1
            is_resp = target < seq.numel() and target >= n_prompt
            labels.append(int(seq[target]) if is_resp else -100)
            old.append(float(r.logprobs[start + target]) if is_resp else 0.0)
    assert batch.labels.tolist() == labels
    assert torch.equal(batch.loss_mask, batch.labels != -100)
    assert batch.old_logprobs.tolist() == old
    assert torch.equal(batch.input_ids, r.input_ids) and batch.max_seqlen == r.max_seqlen
    packed = batch.as_packed_batch()
    assert torch.equal(packed.labels, batch.labels) and torch.equal(packed.cu_seqlens, r.cu_seqlens)
    assert packed.num_loss_tokens == int(r.response_lens.sum()) and packed.num_seqs == 3


def test_policy_model_with_packed_attention_matches_fused_training_logprobs():
    from fastrlhf.models import PolicyModel, register_varlen_attention
    from fastrlhf.ops import linear_token_logprobs

    hf = tiny_lm(tie_word_embeddings=True)
    hf.set_attn_implementation(register_varlen_attention())
    policy = PolicyModel(hf)
    prompts = random_prompts(LENGTHS)
    r = _run(policy, prompts, seed=4, max_new_tokens=8, temperature=0.9, top_k=30)
    # generation switched the packed attention to SDPA and back
    assert hf.config._attn_implementation == register_varlen_attention()
    batch = r.to_training_batch()
    with torch.no_grad():
        hidden = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        lp = linear_token_logprobs(
            hidden, policy.lm_head_weight, batch.labels, policy.lm_head_bias, temperature=0.9
        )
    m = batch.loss_mask
    assert_close(batch.old_logprobs[m], lp[m], atol=5e-5, name="generation vs fused training")


def test_lora_policy_generates_with_its_adapter():
    from peft import LoraConfig, get_peft_model

    from fastrlhf.models import PolicyModel
    from fastrlhf.ops import linear_token_logprobs

    peft_model = get_peft_model(tiny_lm(), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # a non-zero adapter (B starts at 0), so it changes the outputs
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    policy = PolicyModel(peft_model)
    prompts = random_prompts(LENGTHS)
    r = _run(policy, prompts, seed=8, max_new_tokens=6)
    batch = r.to_training_batch()
    m = batch.loss_mask
    with torch.no_grad():
        hidden = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        lp = linear_token_logprobs(hidden, policy.lm_head_weight, batch.labels)
        with policy.reference_mode():  # adapter off: a different policy, a different answer
            ref_hidden = policy(
                batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
            )
        ref_lp = linear_token_logprobs(ref_hidden, policy.lm_head_weight, batch.labels)
    assert_close(batch.old_logprobs[m], lp[m], atol=5e-5, name="LoRA generation vs training")
    assert (batch.old_logprobs[m] - ref_lp[m]).abs().max() > 1e-2


def test_bias_and_padded_lm_head_rows():
    """A wrapper with an lm_head bias and 5 padding rows past its vocabulary: generation uses
    the bias, never samples a padding row, and normalizes over the real vocabulary only."""

    class Wrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.model = lm
            self.vocab_size = VOCAB - 5
            self.lm_head_bias = torch.nn.Parameter(torch.randn(VOCAB))

        @property
        def lm_head_weight(self):
            return self.model.lm_head.weight

    lm = tiny_lm()
    with torch.no_grad():  # larger padding rows: they would often win if they were used
        lm.lm_head.weight[VOCAB - 5 :] *= 4.0
    policy = Wrapper(lm)
    prompts = random_prompts(LENGTHS)
    r = _run(policy, prompts, max_new_tokens=5, temperature=0.0)
    v = VOCAB - 5
    ref = _greedy_reference(
        lm, prompts, 5, weight=lm.lm_head.weight[:v], bias=policy.lm_head_bias[:v]
    )
    for b, (resp, lp) in enumerate(ref):
        assert torch.equal(r.responses()[b], resp)
        start = int(r.cu_seqlens[b]) + len(prompts[b])
        assert_close(r.logprobs[start : start + 5], lp, atol=2e-5, name=f"logprobs[{b}]")
    sampled = _run(policy, prompts, seed=1, max_new_tokens=5, temperature=2.0)
    assert int(sampled.input_ids[sampled.response_mask].max()) < v


def test_bf16_logprob_error_is_bounded_by_torch_bf16_error():
    model64 = tiny_lm(dtype=torch.float64)
    model16 = tiny_lm(dtype=torch.bfloat16)
    prompts = random_prompts(LENGTHS)
    r = _run(model16, prompts, seed=6, max_new_tokens=8, temperature=0.8)
    batch = r.to_training_batch()
    m = batch.loss_mask

    def packed_logprobs(model):
        with torch.no_grad():
            hidden = model.model(
                input_ids=batch.input_ids[None],
                position_ids=batch.position_ids[None],
                use_cache=False,
            ).last_hidden_state[0]
        logits = hidden.double() @ model.lm_head.weight.double().t()
        lp = torch.log_softmax(logits / 0.8, -1)
        return lp.gather(-1, batch.labels.clamp(min=0)[:, None])[:, 0][m]

    # ours (bf16 model, cached decode) vs a bf16 training forward, both against float64
    assert_close_to_reference(
        batch.old_logprobs[m],
        packed_logprobs(model64),
        packed_logprobs(model16),
        atol=2e-2,
        name="bf16 generation logprobs",
    )


def test_train_mode_restored_and_no_autograd_graph():
    model = tiny_lm(attention_dropout=0.3)  # dropout on in train mode: must be off here
    model.train()
    prompts = random_prompts(LENGTHS)
    a = _run(model, prompts, seed=2, max_new_tokens=4)
    assert model.training
    assert all(m.training for m in model.modules())
    assert not a.logprobs.requires_grad
    model.eval()
    b = _run(model, prompts, seed=2, max_new_tokens=4)
    assert not model.training
    _assert_same_rollout(a, b)  # eval mode both times: dropout was off while generating


def test_bad_inputs_raise_errors_naming_the_argument():
    model = tiny_lm()
    ids, cu = pack_prompts(random_prompts((3, 2)))
    cfg = GenerationConfig(max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt_ids"):
        generate(model, ids.float(), cu, cfg)
    with pytest.raises(ValueError, match="prompt_cu_seqlens"):
        generate(model, ids, cu[:-1], cfg)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, ids, torch.tensor([0, 0, 5], dtype=torch.int32), cfg)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, cu, GenerationConfig(max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, cu, GenerationConfig(top_p=1.5))
    with pytest.raises(ValueError, match="top_k"):
        generate(model, ids, cu, GenerationConfig(top_k=-1))
    with pytest.raises(TypeError, match="causal LM"):
        generate(torch.nn.Linear(2, 2), ids, cu, cfg)


@pytest.mark.gpu
def test_cuda_bf16_generation_cache_reuse_and_logprob_match():
    from fastrlhf.ops import linear_token_logprobs

    model64 = tiny_lm(dtype=torch.float64).cuda()
    model = tiny_lm(dtype=torch.bfloat16).cuda()
    prompts = [p.cuda() for p in random_prompts((37, 5, 64, 1, 20, 50, 9, 33) * 4)]
    ids, cu = pack_prompts(prompts)
    kv = ReusableKVCache()
    cfg = GenerationConfig(max_new_tokens=48, temperature=0.9, top_p=0.95, top_k=50)
    gen = lambda seed: generate(
        model, ids, cu, cfg, kv_cache=kv, generator=torch.Generator("cuda").manual_seed(seed)
    )
    a = gen(0)
    ptrs = [t.data_ptr() for t in kv.buffers()]
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in kv.buffers())
    b = gen(0)
    assert [t.data_ptr() for t in kv.buffers()] == ptrs and kv.allocations == 1
    _assert_same_rollout(a, b)
    batch = a.to_training_batch()
    m = batch.loss_mask

    def fused(mdl):
        with torch.no_grad():
            hidden = mdl.model(
                input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                use_cache=False,
            ).last_hidden_state[0]  # fmt: skip
            return linear_token_logprobs(hidden, mdl.lm_head.weight, batch.labels, temperature=0.9)

    assert_close_to_reference(
        batch.old_logprobs[m], fused(model64)[m], fused(model)[m], atol=2e-2, name="cuda bf16"
    )
