"""The policy: a HF causal LM whose packed forward returns hidden states, not logits.

``PolicyModel.forward`` runs only the decoder backbone and returns the final post-norm
hidden states [N, H]; the trainer applies the lm_head inside a fused op
(``fastrlhf.ops``) so the [N, V] logits are never materialized. ``lm_head_weight``
[V_head, H] (the tied input embedding when tied) and ``lm_head_bias`` are exposed for
that. ``vocab_size`` is the tokenizer's vocabulary (<= V_head): rows past it are
padding rows some checkpoints carry.

LoRA (``lora_rank > 0``) goes through peft: the base weights are frozen, the adapter
trains, and ``reference_mode()`` turns the adapter off, which makes the same module
the frozen reference model. ``save_pretrained`` writes standard HF files (config +
safetensors + tokenizer); with LoRA it writes the adapter only (peft format, loadable
with ``load_policy(dir)``) unless ``merge_lora=True``, which writes merged full weights.

Legend: N = packed tokens, B = sequences, H = hidden size, V_head = lm_head rows.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from fastrlhf.models.attention import padded_attention
from fastrlhf.models.heads import HeadTransform, head_transform
from fastrlhf.models.loading import (
    enable_gradient_checkpointing,
    is_adapter_dir,
    load_backbone,
    load_tokenizer,
    packed_hidden,
    resolve_dtype,
    tokenizer_vocab_size,
)


class PolicyModel(torch.nn.Module):
    """A causal LM (``.model``, kept whole) with a hidden-states-out packed forward."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, tokenizer=None):
        super().__init__()
        self.model = model  # the HF CausalLM, or a peft PeftModel wrapping it
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size if vocab_size is not None else self.config.vocab_size)
        # the family's post-head transform (soft-cap, logit scale), applied wherever the
        # trainer turns hidden states into logits or log-probs
        self.head: HeadTransform = head_transform(self.config)

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The HF CausalLM itself (under the peft wrapper when there is one)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def decoder(self) -> torch.nn.Module:
        """The backbone without the lm_head (e.g. ``LlamaModel``)."""
        return self.causal_lm.base_model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings().weight  # [V_head, H]

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return getattr(self.causal_lm.get_output_embeddings(), "bias", None)

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        position_ids: torch.Tensor,  # [N]
        cu_seqlens: torch.Tensor,  # [B+1] int32
        max_seqlen: int,
    ) -> torch.Tensor:
        """Final post-norm hidden states [N, H] of the packed sequences (no lm_head)."""
        return packed_hidden(self.decoder, input_ids, position_ids, cu_seqlens, max_seqlen)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V_head] logits as the HF model's forward returns them (post-head transform
        included): the unfused path (tests, small batches, soft-capped heads)."""
        logits = torch.nn.functional.linear(hidden, self.lm_head_weight, self.lm_head_bias)
        return self.head.apply(logits)

    def token_logprobs(
        self,
        hidden: torch.Tensor,  # [n, H]
        labels: torch.Tensor,  # [n]
        temperature: float = 1.0,
        *,
        return_entropy: bool = False,
        reference: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log p(label) [n] float32 (and the entropy) under the model's own head, post-head
        transform included; ``reference`` uses the float64-capable PyTorch reference.

        No transform: ``linear_token_logprobs`` (the [n, V] logits never exist). A logit
        scale only: the same fused op on ``scale * hidden`` and ``scale * bias`` (exact:
        ``(s h) W^T + s b = s (h W^T + b)``). A soft-cap: the fused op when it takes
        ``softcap=``, else the logits are materialized ([n, V] float32) and go through
        ``token_logprobs``: exact, at the memory cost of the logits.
        """
        from fastrlhf.ops import linear_token_logprobs, token_logprobs

        weight, bias = self.lm_head_weight, self.lm_head_bias
        if weight.dtype != hidden.dtype:  # bf16 hidden states from autocast, fp32 weights
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        # keyword arguments, defaults left out: callers (tests) may stand in a narrower op
        kwargs: dict = dict(bias=bias, vocab_size=self.vocab_size, validate=False)
        if temperature != 1.0:
            kwargs["temperature"] = temperature
        if return_entropy:
            kwargs["return_entropy"] = True
        t = self.head
        if reference:
            from fastrlhf.ops.reference.logprobs import token_logprobs_reference

            logits = self._logits_at_least_fp32(hidden, weight, bias)  # [n, V]
            return token_logprobs_reference(
                logits, labels, temperature, return_entropy=return_entropy,
                vocab_size=self.vocab_size,
            )  # fmt: skip
        if t.softcap is None:
            if t.scale != 1.0:
                hidden = hidden * t.scale
                kwargs["bias"] = bias * t.scale if bias is not None else None
            return linear_token_logprobs(hidden, weight, labels, **kwargs)
        if _fused_takes_softcap():
            return linear_token_logprobs(
                hidden, weight, labels, softcap=t.softcap, logit_scale=t.scale, **kwargs
            )
        logits = self._logits_at_least_fp32(hidden, weight, kwargs.pop("bias"))  # [n, V]
        return token_logprobs(logits, labels, **kwargs)

    def _logits_at_least_fp32(self, hidden, weight, bias) -> torch.Tensor:
        """Transformed logits [n, V] in float32 (float64 for float64 inputs): the cap's
        tanh in bf16 would round the log-probs by ~|logit| * 2^-8."""
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return self.head.apply(logits.to(torch.promote_types(logits.dtype, torch.float32)))

    def padded_attention(self, impl: str | None = None) -> contextlib.AbstractContextManager:
        """Context for padded forwards and ``generate()`` (see models.attention)."""
        return padded_attention(self.causal_lm, impl)

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[None]:
        """Run the reference model: the policy with its LoRA adapter disabled."""
        if not self.has_lora:
            raise RuntimeError(
                "reference_mode() needs a LoRA policy (lora_rank > 0); without LoRA load a "
                "separate frozen copy of the policy as the reference model"
            )
        with self.model.disable_adapter():
            yield

    def save_pretrained(self, out_dir: str | Path, *, merge_lora: bool = False) -> Path:
        """HF-format checkpoint (safetensors); with LoRA the adapter only unless merge_lora."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.has_lora and merge_lora:
            # merge on a copy: the live model keeps its adapter for further training
            merged = copy.deepcopy(self.model).merge_and_unload()
            merged.save_pretrained(str(out))
        else:
            self.model.save_pretrained(str(out))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out


def _fused_takes_softcap() -> bool:
    """Whether ``ops.linear_token_logprobs`` applies soft-capping itself (``softcap=``)."""
    import inspect

    from fastrlhf.ops import linear_token_logprobs

    params = inspect.signature(linear_token_logprobs).parameters
    return "softcap" in params and "logit_scale" in params


def _lora_wrap(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | str | None,
) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # "all-linear": every Linear of the backbone, never the lm_head
        target_modules=list(target_modules) if target_modules else "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_policy(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    lora_rank: int = 0,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
    attn_impl: str = "auto",
    attention: str = "auto",
    batch_invariant_attention: bool = False,
    logit_probe: bool = True,
) -> PolicyModel:
    """Load a causal LM (local dir or hub id) as a ``PolicyModel``.

    dtype None means bf16 on CUDA and fp32 on CPU. ``attn_impl`` "auto" uses our packed
    attention, by the path ``attention`` names ("auto": see ``choose_attention``;
    ``batch_invariant_attention``: num_splits=1 for torch_varlen); other ``attn_impl``
    values go to transformers unchanged. ``logit_probe`` compares the wrapper's log-probs
    with the model's own forward on a few tokens and refuses a mismatch (models.probe).
    A directory written by ``save_pretrained`` of a LoRA policy (adapter only) loads its
    base model and attaches the saved, trainable adapter.
    """
    from peft import PeftModel

    dtype = resolve_dtype(dtype, device)
    adapter_dir = None
    if is_adapter_dir(name_or_path):
        adapter_dir = name_or_path
        adapter_cfg = json.loads((Path(name_or_path) / "adapter_config.json").read_text())
        name_or_path = adapter_cfg["base_model_name_or_path"]
    model = load_backbone(
        name_or_path,
        causal_lm=True,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        attn_impl=attn_impl,
        attention=attention,
        batch_invariant_attention=batch_invariant_attention,
    )
    tokenizer = load_tokenizer(adapter_dir or name_or_path, trust_remote_code)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if adapter_dir is not None:
        if lora_rank:
            raise ValueError(
                f"{adapter_dir} already holds a LoRA adapter; load it with lora_rank=0"
            )
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    elif lora_rank > 0:
        model = _lora_wrap(model, lora_rank, lora_alpha, lora_dropout, lora_target_modules)
    elif lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    vocab = tokenizer_vocab_size(tokenizer, model.config)
    policy = PolicyModel(model, vocab_size=vocab, tokenizer=tokenizer)
    if logit_probe:
        from fastrlhf.models.probe import check_logits

        check_logits(policy)
    return policy
