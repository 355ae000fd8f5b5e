"""Greedy replies in a chat template, stopping at its end-of-turn token (for demos, previews and checks).

Training and generation share the template object, so the prompt the model sees here is exactly the prompt it
was trained to answer, and the stop token is the end-of-turn marker it was trained to emit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

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
