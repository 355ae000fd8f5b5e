from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lorakit.engine.model import add_neftune_noise


def test_neftune_adds_bounded_noise_while_training_only(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    embeddings = model.get_input_embeddings()
    ids = torch.arange(3, 23)[None]
    clean = embeddings(ids).detach()
    add_neftune_noise(model, alpha=5.0)
    model.train()
    noisy = embeddings(ids).detach()
    bound = 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5  # alpha / sqrt(length x hidden)
    assert 0 < (noisy - clean).abs().max() <= bound
    model.eval()
    assert torch.equal(embeddings(ids), clean)
