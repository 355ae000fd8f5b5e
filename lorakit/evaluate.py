"""Evaluation data and the evaluation loss.

--val_size holds out a fraction (below 1) or a number of the training records, chosen by a permutation seeded
by --seed alone, so the same flags always hold out the same records (a record the mixture repeats is held out with
every copy: `split_train_eval`); --eval_dataset evaluates on other
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
    """--val_size holds out records, not examples: interleave_over repeats the smaller datasets' records, and a split
    of the examples would put copies of one record on both sides. The records are taken in the order of their first
    example, so where none repeats (concat, interleave_under) this is the example split lorakit always made. Each
    held-out record is evaluated once (at its first example); every copy of it leaves the training side, which keeps
    the other records' repeats (the mixture's oversampling)."""
    records = np.arange(len(data)) if data.index is None else data.index  # a record: its dataset and its index
    _, firsts, example_record = np.unique(records, return_index=True, return_inverse=True)
    count = held_out_count(val_size, len(firsts))
    if not count:
        return data, None
    by_first = np.argsort(firsts)  # the distinct records in the order of their first example
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(firsts))
    held_out = np.zeros(len(firsts), bool)
    held_out[by_first[order[:count]]] = True
    train = np.flatnonzero(~held_out[example_record.reshape(-1)])
    return data.subset(train), data.subset(np.sort(firsts[held_out]))


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
