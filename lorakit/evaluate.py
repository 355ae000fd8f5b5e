"""Evaluation data and the evaluation loss.

--val_size holds out a fraction (below 1) or a number of the training examples, chosen by a permutation seeded
by --seed alone, so the same flags always hold out the same examples; --eval_dataset evaluates on other
datasets of dataset_info.json instead. The eval loss is the mean token loss over every target token of the eval
set, on every rank, computed with the same packing and loss path as training, without gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorakit.config import Config, pack_tokens_for
from lorakit.data import TokenizedData, collate, pack, plan_epoch, prepare_data
from lorakit.data.checks import held_out_count
from lorakit.distributed import DistInfo, to_device
from lorakit.loss import model_loss_sum

if TYPE_CHECKING:  # lorakit.validate, which makes the plan, imports this module
    from lorakit.plan import RunPlan


def split_train_eval(data: TokenizedData, val_size: float, seed: int) -> tuple[TokenizedData, TokenizedData | None]:
    count = held_out_count(val_size, len(data))
    if not count:
        return data, None
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(data))
    return data.subset(np.sort(order[count:])), data.subset(np.sort(order[:count]))


def eval_data(plan: RunPlan, train: TokenizedData) -> tuple[TokenizedData, TokenizedData | None]:
    """(training data, evaluation data or None) from --val_size or --eval_dataset (its cache readied by
    lorakit.validate, as the training data's is)."""
    data = plan.config.data
    if plan.eval_data is None:
        return split_train_eval(train, data.val_size, plan.config.train.seed)
    held_out, _, _ = prepare_data(data.for_eval(), plan.tokenizer, plan.template, source=plan.eval_data)
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
        data.release()
    engine.train()
    return dist.sum([float(loss_sum)])[0] / max(int(data.target_counts.sum()), 1)
