"""The learning-rate schedule, as a pure function of the optimizer step.

lorakit sets the rate itself before every optimizer step; DeepSpeed's own scheduler is never built, so a
`scheduler` section in a DeepSpeed file cannot silently win (the reference run's constant 0.0005).

For step s (0-based) of T, with W warmup steps and peak rate P:
    warmup    s < W:  P * (s + 1) / W               (the first step already learns; step W-1 reaches P)
    cosine    s >= W: P * 0.5 * (1 + cos(pi * (s - W) / (T - W)))
    linear    s >= W: P * (T - s) / (T - W)
    constant  s >= W: P
Cosine and linear reach 0 at s = T, one step after the last, as in HF Trainer.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """--warmup_steps when given, else ceil(--warmup_ratio x total steps)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def learning_rate_at(step: int, total_steps: int, peak: float, warmup: int, kind: str) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup)
    progress = (step - warmup) / decay_steps
    if kind == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
