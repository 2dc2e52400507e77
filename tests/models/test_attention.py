"""The attention dispatch (which path for which model, device and setting, refusals
included) and the torch_varlen call traced on the meta device for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.models import attention as A
from fastrlhf.models.loading import packed_hidden
from tests.models.families import available, layer_windows, make_config

PLAIN = A.AttentionNeeds("LlamaForCausalLM")
CAPPED = A.AttentionNeeds("Gemma2ForCausalLM", softcap=50.0, sliding_window=4096)
DROPOUT = A.AttentionNeeds("Qwen2ForCausalLM", dropout=0.1)
SINKS = A.AttentionNeeds("GptOssForCausalLM", sliding_window=128, sinks=True)


@pytest.fixture
def installed(monkeypatch):
    """Pretend which optional kernels exist: installed(flash=..., varlen=...)."""

    def set_(flash: bool, varlen: bool = True) -> None:
        monkeypatch.setattr(A, "flash_attn_available", lambda: flash)
        monkeypatch.setattr(A, "torch_varlen_available", lambda: varlen)

    return set_


# (requested, needs, device, flash-attn installed) -> path
TABLE = [
    ("auto", PLAIN, "cpu", False, "sdpa"),
    ("auto", PLAIN, "cpu", True, "sdpa"),
    ("auto", CAPPED, "cpu", False, "eager"),
    ("auto", PLAIN, "cuda", False, "torch_varlen"),
    ("auto", PLAIN, "cuda", True, "torch_varlen"),
    ("auto", PLAIN, "meta", False, "torch_varlen"),
    ("auto", CAPPED, "cuda", True, "flash_attn"),
    ("auto", CAPPED, "cuda", False, "eager"),
    ("auto", DROPOUT, "cuda", False, "sdpa"),
    ("auto", DROPOUT, "cuda", True, "flash_attn"),
    ("torch_varlen", PLAIN, "cuda", False, "torch_varlen"),
    ("flash_attn", CAPPED, "cuda", True, "flash_attn"),
    ("flex", CAPPED, "cuda", False, "flex"),
    ("eager", CAPPED, "cpu", False, "eager"),
    ("sdpa", PLAIN, "cuda", False, "sdpa"),
    ("sdpa", PLAIN, "cpu", False, "sdpa"),
    ("auto", SINKS, "cuda", True, "eager"),
    ("auto", SINKS, "cpu", False, "eager"),
]


@pytest.mark.parametrize("requested,needs,device,flash,path", TABLE)
def test_dispatch_table(installed, requested, needs, device, flash, path):
    installed(flash)
    choice = A.choose_attention(requested, needs, device)
    assert choice.path == path
    assert choice.reason and choice.num_splits is None


# (requested, needs, device, flash-attn installed, torch varlen present) -> refusal
REFUSALS = [
    ("torch_varlen", PLAIN, "cpu", True, True, "needs CUDA"),
    ("flash_attn", PLAIN, "cpu", True, True, "needs CUDA"),
    ("flash_attn", PLAIN, "cuda", False, True, "flash-attn is not installed"),
    ("torch_varlen", CAPPED, "cuda", True, True, r"soft-caps attention logits \(.*50.0\)"),
    ("torch_varlen", DROPOUT, "cuda", True, True, "attention_dropout=0.1"),
    ("torch_varlen", PLAIN, "cuda", True, False, "no torch.nn.attention.varlen"),
    ("flex", PLAIN, "cpu", True, True, "no backward on cpu"),
    ("sdpa", CAPPED, "cpu", True, True, "Gemma2ForCausalLM soft-caps"),
    ("sdpa", CAPPED, "cuda", True, True, "use eager, flex or flash_attn"),
    ("fast", PLAIN, "cuda", True, True, "not one of"),
    ("torch_varlen", SINKS, "cuda", True, True, "attention sinks"),
    ("flash_attn", SINKS, "cuda", True, True, "attention sinks"),
]


@pytest.mark.parametrize("requested,needs,device,flash,varlen,message", REFUSALS)
def test_dispatch_refusals_are_one_line(
    installed, requested, needs, device, flash, varlen, message
):
    installed(flash, varlen)
    with pytest.raises(A.AttentionUnavailable, match=message) as info:
        A.choose_attention(requested, needs, device)
    assert "\n" not in str(info.value)
    assert requested in str(info.value)


def test_batch_invariant_sets_one_split(installed):
    installed(False)
    assert A.choose_attention("auto", PLAIN, "cuda", batch_invariant=True).num_splits == 1


def test_needs_read_from_the_model_config():
    gemma2 = AutoModelForCausalLM.from_config(make_config("gemma2"))
    needs = A.AttentionNeeds.of(gemma2)
    assert needs == A.AttentionNeeds("Gemma2ForCausalLM", 2.0, 4, 0.0)
    qwen3 = AutoModelForCausalLM.from_config(make_config("qwen3", sliding_window=4))
    assert A.AttentionNeeds.of(qwen3).sliding_window is None  # use_sliding_window=False


def test_load_logs_the_choice_once(tmp_path, caplog):
    from fastrlhf.models import load_policy

    AutoModelForCausalLM.from_config(make_config("gemma2")).save_pretrained(str(tmp_path))
    A._NOTED.clear()
    with caplog.at_level("INFO", logger="fastrlhf.models"):
        policy = load_policy(str(tmp_path))
        load_policy(str(tmp_path))
    lines = [r.message for r in caplog.records if "packed attention" in r.message]
    assert lines == [
        "packed attention for Gemma2ForCausalLM: eager (Gemma2ForCausalLM soft-caps attention "
        "logits (attn_logit_softcapping=2.0): SDPA cannot; exact eager on cpu)"
    ]
    assert A.attention_choice(policy.decoder).path == "eager"
    with pytest.raises(A.AttentionUnavailable, match="model.attention=sdpa cannot serve"):
        load_policy(str(tmp_path), attention="sdpa")
    with pytest.raises(ValueError, match="set attn_impl=auto"):
        load_policy(str(tmp_path), attn_impl="eager", attention="eager")


def _flash_window_mask(n: int, window: tuple[int, int]) -> torch.Tensor:
    """[n, n] bool: what a FlashAttention window (left, right) lets query i see."""
    left, right = window
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    ok = torch.ones(n, n, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _transformers_mask(n: int, window: int | None) -> torch.Tensor:
    """[n, n] bool from transformers' own mask functions (causal + sliding overlay)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = causal_mask_function(0, 0, i, j)
    return ok if window is None else ok & sliding_window_overlay(window)(0, 0, i, j)


@pytest.mark.parametrize("family", available())
def test_torch_varlen_traced_on_meta(family, monkeypatch):
    """The varlen call of every layer: [N, H, D] views (no copy), GQA without repeated
    heads, lengths on the device, and the window convention of transformers' masks."""
    import torch.nn.attention.varlen as V

    config = make_config(family)
    if family == "gemma2":  # soft-capped attention is refused (tested above); uncap it here
        config.attn_logit_softcapping = None
    calls = []
    real = V.varlen_attn

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(dict(q=q, k=k, v=v, cu=cu_q, max_q=max_q, **kw))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(V, "varlen_attn", spy)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=A.register_varlen_attention()
        )
    if A.AttentionNeeds.of(model).sinks:  # GPT-OSS: refused, its eager code is the path
        with pytest.raises(A.AttentionUnavailable, match="attention sinks"):
            A.configure_attention(model, "torch_varlen")
        return
    choice = A.configure_attention(model, "torch_varlen", batch_invariant=True)
    assert choice.path == "torch_varlen"
    lengths = [5, 1, 11, 3]
    n = sum(lengths)
    cu = torch.empty(len(lengths) + 1, dtype=torch.int32, device="meta")
    ids = torch.empty(n, dtype=torch.long, device="meta")
    hidden = packed_hidden(model.base_model, ids, ids, cu, max(lengths))
    assert hidden.shape == (n, config.hidden_size) and hidden.is_meta

    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    assert len(calls) == config.num_hidden_layers
    for call, window in zip(calls, layer_windows(config)):
        assert call["q"].shape == (n, hq, d) and call["k"].shape == (n, hkv, d)
        assert call["v"].shape == (n, hkv, d)
        for t in ("q", "k", "v"):  # views of [1, H, N, D] activations, never a copy
            assert call[t]._base is not None and call[t].stride(-1) == 1
        assert call["enable_gqa"] is (hq != hkv)
        assert call["cu"] is cu and call["max_q"] == max(lengths)
        assert call["num_splits"] == 1
        flash = _flash_window_mask(n, call["window_size"])
        assert torch.equal(flash, _transformers_mask(n, window)), (family, call["window_size"])


class _Attention(torch.nn.Module):
    """A stand-in attention module: its module has no eager function, so ours is used."""


def _packed_reference(q, k, v, lengths, window=None, softcap=None):
    """float64 attention one sequence at a time, [1, N, Hq, D] (scale 1/sqrt(D))."""
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = q[0, :, sl], k[0, :, sl], v[0, :, sl]
        scores = qs @ ks.repeat_interleave(rep, 0).transpose(-1, -2) / q.shape[-1] ** 0.5
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(n)
        allowed = i[:, None] >= i[None, :]
        if window is not None:
            allowed &= (i[:, None] - i[None, :]) < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(scores.softmax(-1) @ vs.repeat_interleave(rep, 0))
        start += n
    return torch.cat(outs, dim=1).transpose(0, 1)[None]


@pytest.mark.parametrize("window", [None, 3])
def test_soft_capped_paths_match_a_float64_loop(window, monkeypatch):
    """eager (masked and per sequence) and flex (forward: no CPU backward) with a cap."""
    lengths = [3, 1, 7, 5]
    cu = torch.tensor([0, 3, 4, 11, 16], dtype=torch.int32)
    q = torch.randn(1, 4, 16, 8) * 3  # scores well past the cap
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    ref = _packed_reference(q.double(), k.double(), v.double(), lengths, window, 1.5).float()
    mask = A.VarlenMask(cu, max(lengths), num_tokens=16)
    args = (q, k, v, mask, 0.0, None, window)
    masked = A.eager_document(_Attention(), *args, softcap=1.5)
    assert (masked - ref).abs().max() < 1e-5
    with torch.no_grad():
        flex = A.flex_document(*args, softcap=1.5)
    assert (flex - ref).abs().max() < 1e-5
    monkeypatch.setattr(A.paths, "MASK_MAX_TOKENS", 0)
    looped = A.eager_document(_Attention(), *args, softcap=1.5)
    assert (looped - ref).abs().max() < 1e-5
    windowed_sdpa = A.sdpa_per_sequence(q, k, v, mask, 0.0, None, window)
    plain = _packed_reference(q.double(), k.double(), v.double(), lengths, window).float()
    assert (windowed_sdpa - plain).abs().max() < 1e-5
    # soft-capping arriving at a path that cannot do it is computed exactly, not dropped
    mask.choice = A.AttentionChoice("sdpa", "test")
    out, _ = A.varlen_attention_forward(
        _Attention(), q, k, v, None, sliding_window=window, softcap=1.5, varlen_mask=mask
    )
    assert (out - ref).abs().max() < 1e-5


def test_padded_forwards_of_soft_capped_families_fall_back_to_eager():
    """Gemma2 refuses SDPA: padded forwards and generate() switch to eager instead."""
    from fastrlhf.models import padded_attention

    model = AutoModelForCausalLM.from_config(
        make_config("gemma2"), attn_implementation=A.register_varlen_attention()
    )
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    assert A.padded_impl(model) == "eager"
    with padded_attention(model), torch.no_grad():
        assert model.config._attn_implementation == "eager"
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert out.shape == (2, 8)
    assert model.config._attn_implementation == A.VARLEN_ATTENTION
    llama = AutoModelForCausalLM.from_config(make_config("llama"))
    assert A.padded_impl(llama) == "sdpa"


GPU_LENGTHS = [37, 1, 200, 64, 129]


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["torch_varlen", "flash_attn", "flex", "sdpa", "eager"])
@pytest.mark.parametrize("family", available())
def test_every_path_matches_eager_padded_forward_and_backward_cuda(family, path):
    """bf16 on CUDA: each path's packed hidden states and parameter gradients against the
    same model's eager padded forward (relative L2 error within bf16 tolerance); a path
    that cannot serve the family must be refused instead."""
    if path == "flash_attn" and not A.flash_attn_available():
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    config = make_config(family)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=A.register_varlen_attention()
    )
    model = model.to("cuda", torch.bfloat16)
    try:
        A.configure_attention(model, path)
    except A.AttentionUnavailable:
        needs = A.AttentionNeeds.of(model)
        assert needs.sinks or (path in ("torch_varlen", "sdpa") and needs.softcap)
        return
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 128, (n,), generator=g).cuda() for n in GPU_LENGTHS]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(GPU_LENGTHS, device="cuda").cumsum(0)
    positions = torch.cat([torch.arange(n, device="cuda") for n in GPU_LENGTHS])
    weights = torch.randn(sum(GPU_LENGTHS), config.hidden_size, device="cuda")

    def grads_of(hidden):
        model.zero_grad()
        (hidden.float() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = packed_hidden(model.base_model, torch.cat(seqs), positions, cu, max(GPU_LENGTHS))
    ours_grads = grads_of(ours)
    width = max(GPU_LENGTHS)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    with A.padded_attention(model, "eager"):
        padded = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = torch.cat([padded[b, :n] for b, n in enumerate(GPU_LENGTHS)])
        ref_grads = grads_of(ref)
    assert _rel(ours, ref) < 2e-2, (family, path, _rel(ours, ref))
    for name, g_ref in ref_grads.items():
        assert _rel(ours_grads[name], g_ref) < 5e-2, (family, path, name)


@pytest.mark.gpu
def test_torch_varlen_runs_under_autocast_with_fp32_weights_cuda(monkeypatch):
    """The trainer's CUDA default (fp32 master weights, bf16 autocast) reaches varlen_attn."""
    import torch.nn.attention.varlen as V

    calls = []
    real = V.varlen_attn
    monkeypatch.setattr(V, "varlen_attn", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    model = AutoModelForCausalLM.from_config(
        make_config("qwen2"), attn_implementation=A.register_varlen_attention()
    ).cuda()
    assert A.configure_attention(model).path == "torch_varlen"
    cu = torch.tensor([0, 37, 38, 100], dtype=torch.int32, device="cuda")
    ids = torch.randint(3, 128, (100,), device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in (37, 1, 62)])
    with torch.autocast("cuda", torch.bfloat16):
        hidden = packed_hidden(model.base_model, ids, pos, cu, 62)
    hidden.float().sum().backward()
    assert calls == [torch.bfloat16] * model.config.num_hidden_layers
