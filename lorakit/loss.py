"""Next-token loss summed over target tokens, without materialising logits that are never trained.

SFT trains only the assistant replies: in the reference data about 40 % of the tokens. The model's output head
is applied only at positions whose next token is a target (`logits_to_keep`), and the fp32 cross-entropy runs
in checkpointed chunks, so the fp32 copy of a 152k-wide vocabulary exists for one chunk at a time and is
recomputed in backward instead of stored. The loop divides the sum by the optimizer step's total target tokens
(all micro-batches, all ranks), so every target token in a step weighs the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorakit.data.encode import IGNORE_INDEX
from lorakit.distributed import to_device

CHUNK_ROWS = 2048


def shifted_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path: full logits [batch, seq, vocab] against labels shifted by one; 0 (with a graph) if none."""
    return F.cross_entropy(
        logits[:, :-1, :].float().reshape(-1, logits.size(-1)),
        labels[:, 1:].to(logits.device).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a target in any row (never empty: a filler keeps position 0)."""
    trained = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    positions = trained.nonzero().flatten()
    return positions if len(positions) else torch.zeros(1, dtype=torch.long, device=labels.device)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        total = total + checkpoint(_chunk_loss, logits[rows], targets[rows], use_reentrant=False)
    return total


def model_loss_sum(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Forward `model` (a causal LM or a DeepSpeed engine around one) and return the summed target-token loss.

    `labels` may stay where the batch was built (the CPU): the target positions are found there, because
    `nonzero` on a GPU tensor makes the CPU wait for every kernel queued before it."""
    keep = target_positions(labels)
    device = inputs["input_ids"].device
    logits = model(**inputs, use_cache=False, logits_to_keep=to_device(keep, device)).logits
    return chunked_cross_entropy_sum(logits, to_device(labels[:, keep + 1], device))
