"""The loss paths against the plain one, on the tiny model in fp32: same loss, same LoRA gradients.

- `model_loss_sum` (output head only where a target follows, checkpointed fp32 chunks) vs full logits;
- a packed row (position ids restarting per example, no attention mask) vs the examples one by one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit import loss
from lorakit.data import collate, encode_dataset, load_conversations, pack, resolve_datasets
from lorakit.engine import load_tokenizer
from lorakit.templates import get_template


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tiny_data: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    conversations = load_conversations(resolve_datasets(str(tiny_data), ("tiny",)), None)
    data = encode_dataset(conversations[:6], get_template("qwen", tokenizer), tokenizer, 256)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return tokenizer, data, get_peft_model(model, lora)


def _loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = compute()
    value.backward()
    return float(value), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(first, second):
    assert first[0] == pytest.approx(second[0], rel=1e-6)
    for name, grad in first[1].items():
        torch.testing.assert_close(grad, second[1][name], rtol=1e-5, atol=1e-6)


def _plain(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return loss.shifted_cross_entropy_sum(model(**inputs).logits, batch["labels"])


def test_kept_logits_and_chunks_equal_the_full_logits(setup, monkeypatch):
    tokenizer, data, model = setup
    batch = collate(data, [0, 1, 2], tokenizer.pad_token_id)
    plain = _loss_and_grads(model, lambda: _plain(model, batch))
    monkeypatch.setattr(loss, "CHUNK_ROWS", 7)  # several chunks, the last one short
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kept = _loss_and_grads(model, lambda: loss.model_loss_sum(model, inputs, batch["labels"]))
    _assert_same(plain, kept)


def test_a_packed_row_computes_what_the_examples_compute_alone(setup):
    tokenizer, data, model = setup
    examples = [3, 4, 5]
    alone = _loss_and_grads(model, lambda: sum(_plain(model, collate(data, [i], tokenizer.pad_token_id))
                                               for i in examples))  # fmt: skip
    row = pack(data, examples, tokenizer.pad_token_id, multiple=64)  # with its padding segment, as on GPUs
    unpadded = [p for i in examples for p in range(int(data.lengths[i]))]
    assert row["position_ids"][0].tolist()[: len(unpadded)] == unpadded and row["input_ids"].shape[1] % 64 == 0
    packed = _loss_and_grads(model, lambda: loss.model_loss_sum(model, {"input_ids": row["input_ids"],
                                                                        "position_ids": row["position_ids"]},
                                                                row["labels"]))  # fmt: skip
    _assert_same(alone, packed)


def test_cross_talk_would_show(setup):
    """The comparison above can fail: the same row without restarting positions attends across examples."""
    tokenizer, data, model = setup
    row = pack(data, [3, 4, 5], tokenizer.pad_token_id)
    alone = sum(float(_plain(model, collate(data, [i], tokenizer.pad_token_id))) for i in (3, 4, 5))
    with torch.no_grad():
        crossed = loss.model_loss_sum(model, {"input_ids": row["input_ids"]}, row["labels"])
    assert abs(float(crossed) - alone) > 1e-3
