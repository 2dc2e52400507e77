"""fastrlhf.models: HF checkpoints as a policy (hidden states out) and a value/reward model,
run on packed, padding-free batches.

- ``load_policy(...) -> PolicyModel``: ``forward(input_ids [N], position_ids [N],
  cu_seqlens [B+1] int32, max_seqlen) -> hidden [N, H]`` (post-norm, no lm_head);
  ``lm_head_weight`` [V_head, H], ``lm_head_bias``, ``vocab_size``, ``has_lora``,
  ``reference_mode()``, ``save_pretrained(dir, merge_lora=False)``.
- ``load_value_model(...) -> ValueModel``: ``forward(...) -> values [N]`` float32,
  ``sequence_scores(values, cu_seqlens) -> [B]``, ``reward_mean`` / ``reward_std``,
  ``save_pretrained(dir)`` / ``ValueModel.from_pretrained(dir)``.
- ``padded_attention(hf_model)`` / ``PolicyModel.padded_attention()``: a context that
  switches the model to SDPA (eager where the family refuses SDPA) for padded forwards
  and ``generate()`` (the packed attention sees no padding mask).
- ``register_varlen_attention()``: the packed attention, registered with transformers'
  ``AttentionInterface`` as ``"fastrlhf_varlen"`` (done by the loaders, never at import).
- ``choose_attention`` / ``AttentionUnavailable``: the ``model.attention`` dispatch
  (auto | flash_attn | torch_varlen | flex | sdpa | eager) and its one-line refusals.
- ``HeadTransform`` / ``head_transform(config)``: the family's post-head logit transform
  (``PolicyModel.head``), applied by ``PolicyModel.logits`` and ``.token_logprobs``.
- ``check_logits(policy)`` / ``LogitProbeMismatch``: the load-time probe against the HF
  model's own logits (``load_policy(logit_probe=True)``).

Additions to the contract (no deviations): ``PolicyModel.logits(hidden)`` (unfused lm_head,
post-head transform included), ``PolicyModel.token_logprobs(hidden, labels, T)``,
``PolicyModel.tokenizer`` / ``ValueModel.tokenizer`` (None when the checkpoint has none),
``PolicyModel.causal_lm`` / ``.decoder``, ``load_value_model(seed=)``, and ``attn_impl``
accepting transformers' names ("sdpa", "eager", "flash_attention_2") as well as "auto".
"""

from __future__ import annotations

from fastrlhf.models.attention import (
    VARLEN_ATTENTION,
    AttentionUnavailable,
    choose_attention,
    padded_attention,
    register_varlen_attention,
)
from fastrlhf.models.heads import HeadTransform, head_transform
from fastrlhf.models.loading import resolve_dtype
from fastrlhf.models.policy import PolicyModel, load_policy
from fastrlhf.models.probe import LogitProbeMismatch, check_logits
from fastrlhf.models.value import ValueModel, load_value_model

__all__ = [
    "VARLEN_ATTENTION",
    "AttentionUnavailable",
    "HeadTransform",
    "LogitProbeMismatch",
    "PolicyModel",
    "ValueModel",
    "check_logits",
    "choose_attention",
    "head_transform",
    "load_policy",
    "load_value_model",
    "padded_attention",
    "register_varlen_attention",
    "resolve_dtype",
]
