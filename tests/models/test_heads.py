"""Post-head transforms: the per-family table, and the policy's log-probs through each
route (fused, fused with a folded scale, materialized soft-capped logits) against a
float64 reference of HF's head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.models import PolicyModel
from fastrlhf.models import policy as P
from fastrlhf.models.heads import HEAD_TRANSFORMS, HeadTransform, head_transform
from tests.models.families import available, make_config

EXPECTED = {
    "gemma2": HeadTransform(softcap=30.0),
    "gemma3": HeadTransform(softcap=8.0),
    "granite": HeadTransform(scale=1 / 8),
    "cohere": HeadTransform(scale=0.25),
    "cohere2": HeadTransform(scale=0.25),
}


@pytest.mark.parametrize("family", available())
def test_table_reads_each_family(family):
    assert head_transform(make_config(family)) == EXPECTED.get(family, HeadTransform())


@pytest.mark.parametrize("family", [f for f in EXPECTED if f in available()])
def test_transform_reproduces_hf_logits(family):
    """HF's forward logits == transform(hidden @ W^T) with the backbone's hidden states."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family), attn_implementation="eager")
    with torch.no_grad():
        # logits far into the cap's nonlinear range, whatever the scale
        model.lm_head.weight.mul_(40.0 / head_transform(model.config).scale)
        ids = torch.randint(3, 128, (2, 7))
        theirs = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
        ours = head_transform(model.config).apply(model.lm_head(hidden))
    assert theirs.abs().max() > 5
    assert (ours - theirs).abs().max() < 1e-5


def test_unknown_config_is_identity_and_table_covers_known_types():
    assert head_transform(make_config("llama")).identity
    for model_type in ("gemma2", "gemma3_text", "cohere", "granite", "vaultgemma"):
        assert model_type in HEAD_TRANSFORMS


def _reference(hidden, weight, bias, labels, transform, temperature):
    """float64 log p(label) and entropy of softmax(transform(h W^T + b) / T)."""
    z = hidden.double() @ weight.double().T + bias.double()
    z = transform.apply(z) / temperature
    logsm = z.log_softmax(-1)
    return logsm.gather(-1, labels[:, None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


@pytest.mark.parametrize(
    "transform",
    [HeadTransform(), HeadTransform(scale=0.125), HeadTransform(softcap=3.0),
     HeadTransform(scale=0.5, softcap=3.0)],
    ids=["identity", "scale", "softcap", "scale+softcap"],
)  # fmt: skip
@pytest.mark.parametrize("reference", [False, True])
def test_policy_logprobs_apply_the_transform(transform, reference, monkeypatch):
    model = AutoModelForCausalLM.from_config(make_config("llama"))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(128))
    policy = PolicyModel(model)
    policy.head = transform
    hidden = torch.randn(9, 32, requires_grad=True)
    labels = torch.randint(0, 128, (9,))
    calls = []
    real_fused = P.__dict__.get("_fused_takes_softcap")
    monkeypatch.setattr(P, "_fused_takes_softcap", lambda: calls.append(1) or real_fused())
    logp, ent = policy.token_logprobs(hidden, labels, 0.7, return_entropy=True, reference=reference)
    ref_logp, ref_ent = _reference(
        hidden, policy.lm_head_weight, policy.lm_head_bias, labels, transform, 0.7
    )
    assert (logp.double() - ref_logp).abs().max() < 1e-5
    assert (ent.double() - ref_ent).abs().max() < 1e-4
    assert bool(calls) == (transform.softcap is not None and not reference)
    # gradients through the scale / the tanh, into hidden and the head
    grads = torch.autograd.grad(logp.sum(), (hidden, policy.lm_head_weight))
    h64 = hidden.detach().double().requires_grad_()
    w64 = policy.lm_head_weight.detach().double().requires_grad_()
    ref64, _ = _reference(h64, w64, policy.lm_head_bias.detach(), labels, transform, 0.7)
    ref_grads = torch.autograd.grad(ref64.sum(), (h64, w64))
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() < 1e-4


def test_fused_op_gets_softcap_once_it_takes_it(monkeypatch):
    """When ops.linear_token_logprobs grows softcap=/logit_scale=, the policy passes them."""
    import fastrlhf.ops as ops

    seen = {}

    def fake(hidden, weight, labels, bias=None, temperature=1.0, *, softcap=None,
             logit_scale=1.0, **kw):  # fmt: skip
        seen.update(softcap=softcap, logit_scale=logit_scale)
        return torch.zeros(labels.shape)

    monkeypatch.setattr(ops, "linear_token_logprobs", fake)
    policy = PolicyModel(AutoModelForCausalLM.from_config(make_config("llama")))
    policy.head = HeadTransform(scale=0.5, softcap=3.0)
    policy.token_logprobs(torch.randn(3, 32), torch.tensor([1, 2, 3]))
    assert seen == {"softcap": 3.0, "logit_scale": 0.5}
