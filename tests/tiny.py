"""A tiny random Qwen2 model, its tokenizer and a small alpaca data set, all made in code (nothing downloaded).

The tokenizer is a byte-level BPE trained on the data set itself, with ChatML's special tokens, so the real
`qwen` template and the real encoding path run unchanged on a model small enough for two CPU ranks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
COLOURS = ["red", "green", "blue", "amber", "violet", "white", "black", "orange"]
ANIMALS = ["cat", "dog", "owl", "fox", "bee", "eel", "yak", "ant"]


def alpaca_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Learnable records of varied length: the answer names the colour and animal of the question."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
        extra = " ".join(rng.choice(COLOURS + ANIMALS) for _ in range(rng.randint(0, 12)))
        records.append(
            {
                "instruction": f"Which colour is the {animal}? {extra}".strip(),
                "input": "Answer briefly." if index % 3 == 0 else "",
                "output": f"The {animal} is {colour}. " + " ".join([colour] * rng.randint(1, 6)),
            }
        )
    return records


def write_dataset(folder: Path, records: list[dict[str, str]], name: str = "tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(records, indent=1))
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}))
    return folder


def make_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def make_model(folder: Path, seed: int = 0, hidden_size: int = 64, initializer_range: float = 0.02,
               tie_word_embeddings: bool = False) -> Path:  # fmt: skip
    """Save the tiny model + tokenizer in `folder` (a normal Hugging Face folder) and return it. A larger
    `initializer_range` widens the logits the frozen output head can reach, so a few steps can change a greedy
    reply (at 0.02 every logit stays within about +-1 of the others). `tie_word_embeddings`: the output head is
    the input embedding (as in SmolLM2 and Qwen2.5's small models)."""
    records = alpaca_records(200)
    corpus = [" ".join(r.values()) for r in records] + ["You are a tiny test model. system user assistant"]
    tokenizer = make_tokenizer(corpus)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
