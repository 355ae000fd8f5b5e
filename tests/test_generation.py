"""`lorakit.generate` on one process: the greedy text of a merged model, with the training state left as it was.
Under ZeRO-3 on two ranks: tests/test_research.py."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.engine import load_tokenizer
from lorakit.generation import generate_reply
from lorakit.templates import Message, get_template

MESSAGES = [Message("user", "Which colour is the owl?")]


def _adapted(model_dir: Path) -> torch.nn.Module:
    """The tiny model with a LoRA adapter whose B is not zero (a fresh adapter would change nothing), and dropout."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


def test_generate_gives_the_merged_models_greedy_text_and_restores_mode_and_rng(tiny_model: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    model = _adapted(tiny_model).train()
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    text = lorakit.generate(model, tokenizer, template, MESSAGES, max_new_tokens=24)
    assert model.training and torch.equal(torch.rand(3), expected_draw)  # as if generate had not run
    merged = _adapted(tiny_model).merge_and_unload().eval()
    assert text and text == generate_reply(merged, tokenizer, template, MESSAGES, max_new_tokens=24)


def test_generate_runs_compiled_layers_eagerly(tiny_model: Path):
    """Decoding one token at a time would compile (and with CUDA graphs record) each cache length anew, and a new
    round of graphs frees the cache the last one wrote: generation runs the layers' own eager code, with the same
    reply, and compiles nothing."""
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    expected = lorakit.generate(_adapted(tiny_model), tokenizer, template, MESSAGES, max_new_tokens=12)
    compiled = _adapted(tiny_model)
    captured = []

    def counting_backend(graph, example_inputs):
        captured.append(graph)
        return graph.forward

    for layer in compiled.get_base_model().model.layers:
        layer.forward = torch.compile(layer.forward, backend=counting_backend)
    assert lorakit.generate(compiled, tokenizer, template, MESSAGES, max_new_tokens=12) == expected
    assert captured == []
    compiled.eval()(input_ids=torch.tensor([[5, 6, 7]]))  # outside generation the layers are compiled
    assert captured
