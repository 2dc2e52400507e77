"""Label masking and the entropy term, shared by the log-prob ops and their references.

One definition, so the op paths and the references cannot drift apart:

- ``ignore_index`` gives log-prob 0 (and no gradient);
- any other label outside [0, V) gives NaN at its position (never a bad read);
- a -inf logit (p = 0) adds 0 to the entropy, not 0 * -inf = NaN, in value and gradient.
"""

from __future__ import annotations

import math

import torch


def label_masks(
    labels: torch.Tensor, ignore_index: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ignored, bad, safe): bad = not ignored and outside [0, num_classes); safe is the
    labels as int64 with both replaced by 0, ready for ``gather``."""
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= num_classes))
    safe = torch.where(ignored | bad, 0, labels).long()
    return ignored, bad, safe


def masked_logp(picked: torch.Tensor, ignored: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """The gathered log-probs with 0 at ignored and NaN at bad positions."""
    return torch.where(ignored, 0.0, torch.where(bad, math.nan, picked))


def entropy_of(log_p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim, from log-probabilities; p = 0 terms add 0."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
