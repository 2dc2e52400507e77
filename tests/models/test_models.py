"""Policy and value models on packed batches.

The packed forward (one row, cu_seqlens, per-document attention) must equal the usual
padded forward of the same HF model. Tolerances follow tests/helpers: the float64
padded forward is the reference, and the packed fp32 result may be off by at most twice
the padded fp32 result's error (+ a small atol).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from fastrlhf.data.batch import TokenizedSeq, collate_packed
from fastrlhf.models import (
    PolicyModel,
    ValueModel,
    load_policy,
    load_value_model,
    padded_attention,
)
from tests.helpers import assert_close, assert_close_to_reference

VOCAB = 97
LENGTHS = [5, 1, 11, 3, 8]  # includes a length-1 sequence; max 11


def _configs() -> dict:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=True),
        # Qwen2: q/k/v biases, untied head, one full and one sliding-window layer
        "qwen2": Qwen2Config(
            **common,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
        # Mistral: every layer slides over 4 tokens, shorter than most sequences here
        "mistral": MistralConfig(**common, sliding_window=4, tie_word_embeddings=False),
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for name, config in _configs().items():
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path))
        out[name] = str(path)
    return out


def _random_batch(lengths=LENGTHS):
    g = torch.Generator().manual_seed(2)
    seqs = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        seqs.append(TokenizedSeq(ids, [0] + [1] * (n - 1)))
    return seqs, collate_packed(seqs)


def _padded_logits(hf_model, seqs) -> torch.Tensor:
    """[N, V] logits of the standard right-padded HF forward, re-packed for comparison."""
    t = max(len(s.input_ids) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[b, : len(s.input_ids)] = 1
    with padded_attention(hf_model), torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    return torch.cat([logits[b, : len(s.input_ids)] for b, s in enumerate(seqs)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packed_forward_equals_padded_forward(model_dirs, arch):
    seqs, batch = _random_batch()
    policy = load_policy(model_dirs[arch], dtype=torch.float32)
    policy64 = load_policy(model_dirs[arch], dtype=torch.float64)
    with torch.no_grad():
        hidden = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        ours = policy.logits(hidden)  # [N, V]
    ref64 = _padded_logits(policy64.model, seqs)
    torch32 = _padded_logits(policy.model, seqs)
    assert hidden.shape == (batch.num_tokens, policy.config.hidden_size)
    assert_close_to_reference(ours, ref64, torch32, atol=1e-5, name=f"{arch} packed logits")
    # also the float64 packed path against the float64 padded path: same math, tight
    with torch.no_grad():
        h64 = policy64(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    assert_close(policy64.logits(h64), ref64, atol=1e-10, name=f"{arch} packed fp64")


def test_attention_backends_agree_and_match_a_float64_loop():
    """The per-sequence SDPA loop and the block-mask SDPA against explicit attention."""
    from fastrlhf.models import attention as A

    lengths = [3, 1, 7, 5]
    cu = torch.tensor([0, 3, 4, 11, 16], dtype=torch.int32)
    q = torch.randn(1, 4, 16, 8, requires_grad=True)
    k = torch.randn(1, 2, 16, 8, requires_grad=True)  # GQA: 2 key/value heads
    v = torch.randn(1, 2, 16, 8, requires_grad=True)

    def reference(q, k, v, window=None):  # [1, N, Hq, D], float64, one sequence at a time
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            qs, ks, vs = q[0, :, sl], k[0, :, sl].repeat_interleave(2, 0), v[0, :, sl]
            scores = qs @ ks.transpose(-1, -2) / 8**0.5  # [Hq, L, L]
            i = torch.arange(n)
            allowed = i[:, None] >= i[None, :]
            if window is not None:
                allowed &= (i[:, None] - i[None, :]) < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            outs.append(scores.softmax(-1) @ vs.repeat_interleave(2, 0))
            start += n
        return torch.cat(outs, dim=1).transpose(0, 1)[None]

    mask = A.VarlenMask(cu, max(lengths))
    split = A.sdpa_per_sequence(q, k, v, mask, 0.0, None)
    block = A.sdpa_block_mask(q, k, v, mask, 0.0, None, None)
    ref = reference(q.double(), k.double(), v.double())
    assert_close(split, ref.float(), atol=1e-5, name="per-sequence")
    assert_close(block, ref.float(), atol=1e-5, name="block mask")
    windowed = A.sdpa_block_mask(q, k, v, mask, 0.0, None, 2)
    assert_close(windowed, reference(q.double(), k.double(), v.double(), 2).float(), atol=1e-5)
    g_split = torch.autograd.grad(split.square().sum(), (q, k, v))
    g_block = torch.autograd.grad(block.square().sum(), (q, k, v))
    for a, b in zip(g_split, g_block):
        assert_close(a, b, atol=1e-5, name="gradient")


def test_long_rows_switch_to_the_per_sequence_loop(model_dirs, monkeypatch):
    from fastrlhf.models import attention as A

    _, batch = _random_batch()
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    policy = load_policy(model_dirs["llama"])
    with torch.no_grad():
        masked = policy(*args)
        calls = []
        monkeypatch.setattr(A.paths, "MASK_MAX_TOKENS", 0)
        real = A.sdpa_per_sequence
        monkeypatch.setattr(A, "sdpa_per_sequence", lambda *a: calls.append(1) or real(*a))
        looped = policy(*args)
    assert len(calls) == policy.config.num_hidden_layers
    assert_close(looped, masked, atol=1e-5, name="per-sequence backend")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_transformers_attention_names_also_run_packed(model_dirs, impl):
    """attn_impl given to transformers as is: its own packed detection (from position_ids)."""
    _, batch = _random_batch()
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    ours = load_policy(model_dirs["qwen2"])
    theirs = load_policy(model_dirs["qwen2"], attn_impl=impl)
    assert theirs.config._attn_implementation == impl
    with torch.no_grad():
        assert_close(theirs(*args), ours(*args), atol=1e-5, name=impl)


def test_sliding_window_changes_the_result(model_dirs):
    """Guard against a silently ignored window: with it removed, long sequences differ."""
    seqs, batch = _random_batch()
    policy = load_policy(model_dirs["mistral"])
    with torch.no_grad():
        windowed = policy.logits(policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, 11))
        policy.config.sliding_window = None
        full = policy.logits(policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, 11))
    first = slice(0, 4)  # tokens within the window of their sequence start agree
    assert torch.allclose(windowed[first], full[first], atol=1e-6)
    assert (windowed - full).abs().max() > 1e-3


def test_hidden_through_lm_head_equals_hf_logits_per_sequence(model_dirs):
    seqs, batch = _random_batch()
    policy = load_policy(model_dirs["qwen2"])
    with torch.no_grad():
        ours = policy.logits(
            policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        )
        cu = batch.cu_seqlens.tolist()
        for b, s in enumerate(seqs):
            with policy.padded_attention():
                hf = policy.model(input_ids=torch.tensor([s.input_ids])).logits[0]
            assert_close(ours[cu[b] : cu[b + 1]], hf, atol=2e-5, name=f"sequence {b}")
    assert policy.lm_head_bias is None
    assert policy.lm_head_weight.shape == (VOCAB, policy.config.hidden_size)


def _token_loss(policy: PolicyModel, batch) -> torch.Tensor:
    hidden = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    return torch.nn.functional.cross_entropy(policy.logits(hidden), batch.labels)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_padded_forward(model_dirs, checkpointing):
    seqs, batch = _random_batch()
    policy = load_policy(model_dirs["llama"], gradient_checkpointing=checkpointing)
    policy.train()
    assert policy.causal_lm.is_activation_checkpointing == checkpointing
    _token_loss(policy, batch).backward()
    grads = {n: p.grad for n, p in policy.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())

    ref = load_policy(model_dirs["llama"])
    ids = torch.zeros(len(seqs), batch.max_seqlen, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n], mask[b, :n] = torch.tensor(s.input_ids), 1
        labels[b, : n - 1] = torch.tensor(s.input_ids[1:])
    with ref.padded_attention():
        logits = ref.model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, name=f"grad {name}")


def test_tied_and_untied_heads(model_dirs):
    tied = load_policy(model_dirs["llama"])
    emb = tied.causal_lm.get_input_embeddings().weight
    assert tied.lm_head_weight.data_ptr() == emb.data_ptr()
    untied = load_policy(model_dirs["mistral"])
    emb = untied.causal_lm.get_input_embeddings().weight
    assert untied.lm_head_weight.data_ptr() != emb.data_ptr()
    # vocab_size falls back to the config when the checkpoint has no tokenizer
    assert tied.vocab_size == VOCAB and tied.tokenizer is None


def test_policy_save_load_roundtrip(model_dirs, tmp_path):
    _, batch = _random_batch()
    policy = load_policy(model_dirs["qwen2"])
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from the checkpoint on disk
        before = policy(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    out = policy.save_pretrained(tmp_path / "saved")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    again = load_policy(str(out))
    with torch.no_grad():
        after = again(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    assert torch.equal(before, after)


def test_lora_reference_mode_and_save(model_dirs, tmp_path):
    _, batch = _random_batch()
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    base = load_policy(model_dirs["llama"])
    policy = load_policy(model_dirs["llama"], lora_rank=4, lora_alpha=8)
    assert policy.has_lora and not base.has_lora
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # peft starts B at zero: make the adapter matter
        base_h = base(*args)
        lora_h = policy(*args)
        with policy.reference_mode():
            ref_h = policy(*args)
        assert (lora_h - base_h).abs().max() > 1e-3
        assert_close(ref_h, base_h, atol=1e-6, name="adapter-off hidden")
        again = policy(*args)
    assert torch.equal(again, lora_h)  # the adapter is back on after the context

    loss = policy.logits(policy(*args)).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if p.requires_grad)

    adapter_dir = policy.save_pretrained(tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file()
    reloaded = load_policy(str(adapter_dir))
    merged = load_policy(str(policy.save_pretrained(tmp_path / "merged", merge_lora=True)))
    assert not merged.has_lora
    with torch.no_grad():
        assert_close(reloaded(*args), lora_h, atol=1e-6, name="reloaded adapter")
        assert_close(merged(*args), lora_h, atol=1e-5, name="merged adapter")


def test_reference_mode_needs_lora(model_dirs):
    policy = load_policy(model_dirs["llama"])
    with pytest.raises(RuntimeError, match="LoRA"), policy.reference_mode():
        pass


def test_value_model_values_scores_and_roundtrip(model_dirs, tmp_path):
    seqs, batch = _random_batch()
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    value = load_value_model(model_dirs["qwen2"], seed=3)
    assert value.score.weight.dtype == torch.float32
    with torch.no_grad():
        values = value(*args)
    assert values.shape == (batch.num_tokens,) and values.dtype == torch.float32
    scores = ValueModel.sequence_scores(values, batch.cu_seqlens)
    cu = batch.cu_seqlens.tolist()
    assert torch.equal(scores, torch.stack([values[c - 1] for c in cu[1:]]))
    # the backbone is the causal LM's, so its hidden states equal the policy's
    policy = load_policy(model_dirs["qwen2"])
    with torch.no_grad():
        h = policy(*args)
    expected = value.score(h).squeeze(-1)
    assert_close(values, expected, atol=1e-5, name="values vs policy hidden")

    value.reward_mean, value.reward_std = 0.25, 3.5
    out = value.save_pretrained(tmp_path / "rm")
    again = load_value_model(str(out))
    assert (again.reward_mean, again.reward_std) == (0.25, 3.5)
    with torch.no_grad():
        assert torch.equal(again(*args), values)
    fresh = load_value_model(model_dirs["qwen2"], init_from_policy=False, seed=3)
    with torch.no_grad():
        assert not torch.allclose(fresh(*args), values)


def test_value_gradients_flow(model_dirs):
    _, batch = _random_batch()
    value = load_value_model(model_dirs["mistral"], seed=0)
    values = value(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    values.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in value.parameters())


def test_bad_inputs_name_the_argument(model_dirs):
    _, batch = _random_batch()
    policy = load_policy(model_dirs["llama"])
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy(batch.input_ids, batch.position_ids, batch.cu_seqlens.long(), batch.max_seqlen)
    with pytest.raises(ValueError, match="position_ids"):
        policy(batch.input_ids, batch.position_ids[:-1], batch.cu_seqlens, batch.max_seqlen)
    with pytest.raises(ValueError, match="input_ids"):
        policy(batch.input_ids[None], batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    # a plain HF call on the packed-attention model explains what to do
    with pytest.raises(ValueError, match="padded_attention"):
        policy.model(input_ids=batch.input_ids[None])
    with pytest.raises(ValueError, match="dtype"):
        load_policy(model_dirs["llama"], dtype="float8")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packed_forward_equals_padded_forward_bf16_cuda(model_dirs, arch):
    """bf16 on CUDA (flash-attn varlen where installed, else masked SDPA)."""
    seqs, batch = _random_batch([37, 1, 200, 64, 129])
    policy = load_policy(model_dirs[arch], device="cuda")  # bf16 by default on CUDA
    policy64 = load_policy(model_dirs[arch], dtype=torch.float64, device="cuda")
    assert policy.lm_head_weight.dtype == torch.bfloat16
    cuda_batch = batch.to("cuda")
    with torch.no_grad():
        ours = policy.logits(
            policy(
                cuda_batch.input_ids,
                cuda_batch.position_ids,
                cuda_batch.cu_seqlens,
                cuda_batch.max_seqlen,
            )
        )
    ref64 = _padded_logits_cuda(policy64.model, seqs)
    torch_bf16 = _padded_logits_cuda(policy.model, seqs)
    assert_close_to_reference(ours.cpu(), ref64.cpu(), torch_bf16.cpu(), atol=1e-2, name=arch)


def _padded_logits_cuda(hf_model, seqs):
    t = max(len(s.input_ids) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids, device="cuda")
        mask[b, : len(s.input_ids)] = 1
    with padded_attention(hf_model), torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=mask).logits
    return torch.cat([logits[b, : len(s.input_ids)] for b, s in enumerate(seqs)])
