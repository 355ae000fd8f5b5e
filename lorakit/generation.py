"""Greedy replies in a chat template, stopping at its end-of-turn token (for demos, previews and checks).

Training and generation share the template object, so the prompt the model sees here is exactly the prompt it
was trained to answer, and the stop token is the end-of-turn marker it was trained to emit.

`generate` also works on a model being trained, ZeRO-3 included, where each rank holds a slice of every weight:
DeepSpeed's hooks gather a layer's weights as its forward starts, so a forward pass is a collective, and every
rank must run the same number of them. All ranks call `generate` together with the same messages; each decodes
greedily with the key/value cache, and the ranks take rank 0's token at every position (one tiny broadcast), so
they stop together even where rounding might let their logits tie differently. The model's train/eval mode, the
RNG states (dropout, NEFTune) and autograd are as before afterwards, so training continues exactly as without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as torch_dist

from lorakit.templates import Message, Template


def stop_token_ids(tokenizer: Any, template: Template) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(s) for s in template.stop_strings]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


@torch.no_grad()
def generate_reply(
    model: Any,
    tokenizer: Any,
    template: Template,
    messages: Sequence[Message],
    max_new_tokens: int = 96,
    streamer: Any = None,
) -> str:
    """The model's greedy reply to `messages` (ending with a user turn), without the end-of-turn marker;
    `streamer` (e.g. transformers' TextStreamer) receives the tokens as they come."""
    prompt = template.generation_prompt(messages)
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    stops = stop_token_ids(tokenizer, template)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    reply = output[0, input_ids.shape[1] :].tolist()
    reply = reply[: next((i for i, t in enumerate(reply) if t in stops), len(reply))]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()


@contextmanager
def inference(engine_or_model: Any) -> Iterator[Any]:
    """The model (a DeepSpeed engine's module) in eval mode without gradients, its mode and every RNG state restored
    on the way out; under ZeRO-3 every rank must run the same forward passes inside."""
    model = getattr(engine_or_model, "module", engine_or_model)  # DeepSpeed's hooks live on the module itself
    device = next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def _cache_argument(model: Any) -> str:
    """The key/value cache's name in the model's forward: `cache` from transformers 5.24, `past_key_values`
    before (the old name still works there, with a deprecation warning every call)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _agreed(token: torch.Tensor) -> int:
    """Rank 0's token on every rank (see the module docstring); the token itself outside a process group."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast(token, src=0)
    return int(token.item())


def generate(
    engine_or_model: Any, tokenizer: Any, template: Template, messages: Sequence[Message], max_new_tokens: int = 96
) -> str:
    """The greedy reply to `messages` (ending with a user turn) of a model or a DeepSpeed engine, during training
    too; under several ranks every rank must call it with the same arguments, and every rank gets the same text."""
    prompt = template.generation_prompt(messages)
    stops = set(stop_token_ids(tokenizer, template))
    reply: list[int] = []
    # Compiled layers run eagerly while decoding: one token at a time through a growing cache would compile (and,
    # with CUDA graphs, record) each cache length anew, and a round of graphs frees the previous round's outputs,
    # which is where the cache's keys and values would live.
    with inference(engine_or_model) as model, torch.compiler.set_stance("force_eager"):
        device = next(model.parameters()).device
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        cache_name, past = _cache_argument(model), None
        for _ in range(max_new_tokens):
            output = model(input_ids=ids, **{cache_name: past}, use_cache=True, logits_to_keep=1)
            past = getattr(output, cache_name)
            token = _agreed(output.logits[0, -1].argmax().reshape(1))
            if token in stops:
                break
            reply.append(token)
            ids = torch.tensor([[token]], device=device)
    return tokenizer.decode(reply, skip_special_tokens=True).strip()
