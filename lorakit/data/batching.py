"""Which examples go where: optimizer steps, ranks and micro-batches.

How many examples a step takes and how many steps an epoch has is lorakit.steps' arithmetic. Here: the epoch's
shuffled order (seeded by seed and epoch, the same on every rank) is cut into steps of a global batch each, and
the last step of an epoch takes what is left, so it may be short.

Inside a step, examples are sorted by length and dealt round-robin to the ranks, which evens out tokens across
ranks, and each rank cuts its share into micro-batches of similar length, which keeps padding small. Grouping
does not change the update: the loss is normalised by the step's total target tokens, not per micro-batch.
Every rank runs the same number of micro-batches (ZeRO-3 gathers weights collectively); a rank with nothing
left in a short step runs an empty micro-batch that contributes no loss.

With packing (the default), the step's examples are dealt to ranks by tokens (longest first, to the rank with
the fewest tokens so far), and each rank packs its share into as few rows of at most `pack_tokens` tokens as
first-fit decreasing finds; a micro-batch is one row. So per_device_train_batch_size x accumulation keeps
its meaning (examples per step), while the work per forward pass is as large as memory allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lorakit.data.encode import IGNORE_INDEX, TokenizedData
from lorakit.steps import global_batch, steps_per_epoch


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: micro_batches[rank][i] is a list of example indices (empty: a filler micro-batch)."""

    micro_batches: list[list[list[int]]]

    def examples(self) -> list[int]:
        return [i for rank in self.micro_batches for micro in rank for i in micro]


def plan_epoch(
    lengths: np.ndarray,
    epoch: int,
    seed: int,
    world_size: int,
    micro_batch: int,
    accumulation: int,
    skip: int = 0,
    pack_tokens: int = 0,
) -> list[StepPlan]:
    """The epoch's steps; `skip` leaves out the first examples of its order (already trained when resuming).

    pack_tokens = 0: micro-batches of `micro_batch` examples, padded. pack_tokens > 0: each micro-batch is one
    row of at most `pack_tokens` tokens holding whole examples (see `pack_share`).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))[skip:]
    per_step = global_batch(world_size, micro_batch, accumulation)
    plans = []
    for start in range(0, len(order), per_step):
        chunk = order[start : start + per_step]
        by_length = chunk[np.argsort(-lengths[chunk], kind="stable")]
        if pack_tokens:
            shares = balance_tokens(by_length, lengths, world_size)
            rows = [pack_share(share, lengths, pack_tokens) for share in shares]
            plans.append(StepPlan([r + [[] for _ in range(max(map(len, rows)) - len(r))] for r in rows]))
            continue
        shares = [by_length[rank::world_size].tolist() for rank in range(world_size)]
        num_micro = math.ceil(len(shares[0]) / micro_batch)
        plans.append(StepPlan([[s[m * micro_batch : (m + 1) * micro_batch] for m in range(num_micro)] for s in shares]))
    return plans


GPU_ROW_MULTIPLE = 128  # packed rows on GPUs are padded to a multiple of this many tokens (see `pack`)


def step_tokens_bound(lengths: np.ndarray, seed: int, world_size: int, micro_batch: int, accumulation: int,
                      epochs: int, start_epoch: int = 0, skip: int = 0) -> int:  # fmt: skip
    """At least the most tokens any rank gets in one packed step of any of `epochs` epochs, without planning them:
    `balance_tokens` gives each example to the rank with the fewest tokens so far, so no rank ends a step above
    the step's mean share plus its longest example (the last example a rank took found it at or below the mean).
    Each epoch deals a new order, whose largest share can exceed the first epoch's by more than an example; the
    step sums of every epoch cost one permutation each, where planning every epoch costs seconds a million records.
    A resumed run starts at `start_epoch` with `skip` examples of its order done: plan_epoch steps that epoch from
    there, so its steps are other chunks (a checkpoint resumes on any number of ranks)."""
    per_step = global_batch(world_size, micro_batch, accumulation)
    bound = 0
    for epoch in range(start_epoch, epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(lengths))  # plan_epoch's order
        order = order[skip:] if epoch == start_epoch else order
        steps = np.zeros(-(-len(order) // per_step) * per_step, dtype=np.int64)
        steps[: len(order)] = lengths[order]
        steps = steps.reshape(-1, per_step)
        totals = steps.sum(axis=1)
        shares = np.minimum(totals, -(-totals // world_size) + steps.max(axis=1, initial=0))
        bound = max(bound, int(shares.max(initial=0)))
    return bound


def mean_step_share(lengths: np.ndarray, world_size: int, micro_batch: int, accumulation: int) -> int:
    """A rank's mean tokens in one step of an epoch: the epoch's tokens over its steps and the ranks."""
    steps = steps_per_epoch(len(lengths), world_size, micro_batch, accumulation)
    return int(lengths.sum()) // max(steps * world_size, 1)


def balance_tokens(by_length: np.ndarray, lengths: np.ndarray, world_size: int) -> list[list[int]]:
    """Deal examples (longest first) to the rank with the fewest tokens so far, so no rank waits for another."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for index in by_length.tolist():
        rank = min(range(world_size), key=lambda r: (tokens[r], len(shares[r])))
        shares[rank].append(index)
        tokens[rank] += int(lengths[index])
    return shares


def pack_share(share: list[int], lengths: np.ndarray, pack_tokens: int) -> list[list[int]]:
    """First-fit decreasing: whole examples into as few rows of at most pack_tokens tokens as it finds."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(share, key=lambda i: -int(lengths[i])):
        size = int(lengths[index])
        fit = next((r for r, free in enumerate(room) if free >= size), None)
        if fit is None:
            rows.append([index])
            room.append(pack_tokens - size)
        else:
            rows[fit].append(index)
            room[fit] -= size
    return rows


def pack(data: TokenizedData, indices: list[int], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """One row holding the examples back to back, with position ids that restart at each example.

    No attention mask: from position ids that restart, transformers builds attention that never crosses an
    example boundary (a block-diagonal causal mask for SDPA and eager, varlen for FlashAttention), so the row
    computes exactly what the examples would on their own. Each example's first token is never a target, so no
    example is trained to predict the next one's start. A filler (no indices) is one pad token, no target.
    `multiple` pads the row to a multiple of that many tokens with a segment of its own: on GPUs, attention
    kernels plan per shape (cuDNN: about 2 ms of CPU time per new length), so a few shapes beat many.
    """
    rows = [data.example(i) for i in indices] or [(np.asarray([pad_id]), np.asarray([IGNORE_INDEX]))]
    padding = -sum(len(ids) for ids, _ in rows) % multiple
    if padding:  # its own segment: attended by nothing else, no target; keeps row lengths to a few shapes
        rows.append((np.full(padding, pad_id), np.full(padding, IGNORE_INDEX)))
    input_ids = torch.from_numpy(np.concatenate([ids for ids, _ in rows]).astype(np.int64))[None]
    labels = torch.from_numpy(np.concatenate([lab for _, lab in rows]).astype(np.int64))[None]
    position_ids = torch.cat([torch.arange(len(ids)) for ids, _ in rows])[None]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate(data: TokenizedData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one micro-batch; a filler (no indices) is one pad token with no target."""
    rows = [data.example(i) for i in indices] or [(np.asarray([pad_id]), np.asarray([IGNORE_INDEX]))]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        labels[row, : len(ids)] = torch.from_numpy(row_labels.astype(np.int64))
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
