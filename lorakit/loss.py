"""Next-token loss summed over target tokens.

The loop divides by the optimizer step's total target tokens (all micro-batches, all ranks), so every target
token in a step weighs the same however the examples are grouped into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.data.encode import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over positions whose next token is a target; 0 (with a graph) if there are none."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
