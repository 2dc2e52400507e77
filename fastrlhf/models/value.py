"""Value / reward model: a decoder backbone plus a float32 linear score head.

``ValueModel.forward`` returns one float32 value per packed token [N] (the critic uses
all of them); ``sequence_scores`` picks the value at each sequence's last token [B],
which is the reward model's score. ``reward_mean`` / ``reward_std`` hold the reward
normalization statistics and are saved with the model.

On disk (``save_pretrained``) a ValueModel is a standard HF base-model checkpoint
(config.json + model.safetensors, loadable with ``AutoModel``) plus
``score.safetensors`` (the head) and ``value_head.json`` (the statistics and head
shape); tokenizer files are saved too when known.

The head is float32 whatever the backbone's dtype: a bf16 head would round rewards
to 3 significant digits, which is visible in reward-model accuracy and GAE.

Legend: N = packed tokens, B = sequences, H = hidden size.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from fastrlhf.models.attention import padded_attention
from fastrlhf.models.loading import (
    enable_gradient_checkpointing,
    load_backbone,
    load_tokenizer,
    packed_hidden,
    resolve_dtype,
    setup_attention,
)

HEAD_FILE = "score.safetensors"
STATS_FILE = "value_head.json"


class ValueModel(torch.nn.Module):
    """``backbone`` (no lm_head) + ``score`` Linear(H, 1) in float32."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        *,
        reward_mean: float = 0.0,
        reward_std: float = 1.0,
        tokenizer=None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        device = next(backbone.parameters()).device
        self.score = torch.nn.Linear(hidden, 1, bias=True, device=device, dtype=torch.float32)
        # small init: initial values ~ N(0, 1/(H+1)) * |h|, close to zero at the start
        torch.nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(self.score.bias)
        self.reward_mean = float(reward_mean)
        self.reward_std = float(reward_std)
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        position_ids: torch.Tensor,  # [N]
        cu_seqlens: torch.Tensor,  # [B+1] int32
        max_seqlen: int,
    ) -> torch.Tensor:
        """Float32 value of every packed token, [N]."""
        hidden = packed_hidden(self.backbone, input_ids, position_ids, cu_seqlens, max_seqlen)
        return self.score(hidden.float()).squeeze(-1)  # [N]

    def padded_attention(self, impl: str | None = None) -> contextlib.AbstractContextManager:
        """Context for padded forwards of the backbone (see models.attention)."""
        return padded_attention(self.backbone, impl)

    @staticmethod
    def sequence_scores(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """[B] the value at the last token of each sequence (the reward model's score)."""
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D [N], got shape {tuple(values.shape)}")
        last = cu_seqlens[1:].long() - 1  # [B]
        return values[last.to(values.device)]

    def save_pretrained(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(out))
        head = {k: v.detach().cpu().contiguous() for k, v in self.score.state_dict().items()}
        save_file(head, str(out / HEAD_FILE))
        stats = {
            "format": "fastrlhf.ValueModel",
            "hidden_size": int(self.score.in_features),
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
        }
        (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        attn_impl: str = "auto",
        attention: str = "auto",
        batch_invariant_attention: bool = False,
    ) -> ValueModel:
        """Load a directory written by ``ValueModel.save_pretrained``."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        if not (model_dir / STATS_FILE).is_file():
            raise FileNotFoundError(
                f"{model_dir} is not a saved ValueModel (no {STATS_FILE}); use "
                "load_value_model() to build one from a causal-LM checkpoint"
            )
        stats = json.loads((model_dir / STATS_FILE).read_text())
        backbone = load_backbone(
            str(model_dir),
            causal_lm=False,
            dtype=resolve_dtype(dtype, device),
            device=device,
            trust_remote_code=trust_remote_code,
            attn_impl=attn_impl,
            attention=attention,
            batch_invariant_attention=batch_invariant_attention,
        )
        if gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        model = cls(
            backbone,
            reward_mean=stats["reward_mean"],
            reward_std=stats["reward_std"],
            tokenizer=load_tokenizer(str(model_dir), trust_remote_code),
        )
        head = load_file(str(model_dir / HEAD_FILE))
        model.score.load_state_dict(head)
        return model


def load_value_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    init_from_policy: bool = True,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_impl: str = "auto",
    seed: int | None = None,
    attention: str = "auto",
    batch_invariant_attention: bool = False,
) -> ValueModel:
    """A saved ValueModel, or a new one on a causal-LM checkpoint's backbone.

    For a causal-LM checkpoint, ``init_from_policy=True`` takes its backbone weights;
    ``False`` keeps only its config and initializes the backbone randomly. Either way
    the score head is fresh (``seed`` makes its init reproducible).
    """
    from transformers import AutoConfig, AutoModel

    if (Path(name_or_path) / STATS_FILE).is_file():
        return ValueModel.from_pretrained(
            name_or_path,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            gradient_checkpointing=gradient_checkpointing,
            attn_impl=attn_impl,
            attention=attention,
            batch_invariant_attention=batch_invariant_attention,
        )
    torch_dtype = resolve_dtype(dtype, device)
    if init_from_policy:
        backbone = load_backbone(
            name_or_path,
            causal_lm=False,
            dtype=torch_dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            attn_impl=attn_impl,
            attention=attention,
            batch_invariant_attention=batch_invariant_attention,
        )
    else:
        from fastrlhf.models.attention import resolve_attn_impl

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        backbone = AutoModel.from_config(
            config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=resolve_attn_impl(attn_impl),
        ).to(device)
        setup_attention(backbone, attention, batch_invariant_attention)
    if gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ValueModel(backbone, tokenizer=load_tokenizer(name_or_path, trust_remote_code))
    return model
