"""Evaluation data and the evaluation loss.

--val_size holds out a fraction (below 1) or a number of the training examples, chosen by a permutation seeded
by --seed alone, so the same flags always hold out the same examples; --eval_dataset evaluates on other
datasets of dataset_info.json instead. The eval loss is the mean token loss over every target token of the eval
set, on every rank, computed with the same packing and loss path as training, without gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorakit.config import Config, pack_tokens_for
from lorakit.data import TokenizedData, collate, pack, plan_epoch, prepare_data
from lorakit.distributed import DistInfo, to_device
from lorakit.errors import LorakitError
from lorakit.loss import model_loss_sum

if TYPE_CHECKING:  # lorakit.validate, which makes the plan, asks this module for held_out_count
    from lorakit.plan import RunPlan


def held_out_count(val_size: float, num_examples: int) -> int:
    count = int(val_size) if val_size >= 1 else math.ceil(val_size * num_examples)
    if val_size and not 0 < count < num_examples:
        raise LorakitError(f"--val_size {val_size} leaves no training examples of {num_examples}; lower it")
    return count


def split_train_eval(data: TokenizedData, val_size: float, seed: int) -> tuple[TokenizedData, TokenizedData | None]:
    count = held_out_count(val_size, len(data))
    if not count:
        return data, None
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(data))
    return data.subset(np.sort(order[count:])), data.subset(np.sort(order[:count]))


def eval_data(plan: RunPlan, train: TokenizedData, builds: bool,
              all_ok: Callable[[bool], bool]) -> tuple[TokenizedData, TokenizedData | None]:  # fmt: skip
    """(training data, evaluation data or None) from --val_size or --eval_dataset (tokenised as prepare_data
    does: `builds` and `all_ok` are its arguments)."""
    data = plan.config.data
    if plan.eval_data is None:
        return split_train_eval(train, data.val_size, plan.config.train.seed)
    eval_config = data.for_eval()
    held_out, _, _ = prepare_data(eval_config, plan.tokenizer, plan.template, builds, all_ok, plan.eval_data)
    return train, held_out


@torch.no_grad()
def evaluate(engine: Any, data: TokenizedData, dist: DistInfo, config: Config, pad_id: int, multiple: int) -> float:
    """Mean token loss over the whole eval set (every rank must call this)."""
    train = config.train
    plans = plan_epoch(data.lengths, 0, train.seed, dist.world_size, train.per_device_train_batch_size, 1,
                       pack_tokens=pack_tokens_for(config))  # fmt: skip
    engine.eval()
    loss_sum = torch.zeros((), device=dist.device)
    for plan in plans:
        for indices in plan.micro_batches[dist.rank]:
            batch = pack(data, indices, pad_id, multiple) if train.packing else collate(data, indices, pad_id)
            labels = batch.pop("labels")
            inputs = {k: to_device(v, dist.device) for k, v in batch.items()}
            loss_sum += model_loss_sum(engine, inputs, labels).float()
    engine.train()
    return dist.sum([float(loss_sum)])[0] / max(int(data.target_counts.sum()), 1)
