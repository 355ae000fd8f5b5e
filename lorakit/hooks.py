"""What `lorakit.train`'s hooks receive: `on_step(StepInfo)` after every optimizer step, `on_eval(EvalContext)`
after every evaluation, on every rank. Hooks are plain functions passed to `train`; a hook that returns True asks
the run to stop.

A stop is agreed like a stop signal (lorakit.agreement): the request rides on the step's device all-reduce, so
the ranks stop at the same step even when only one rank's hook asked. It is read when that step logs, evaluates
or saves, otherwise one step later; the run then ends as a finished one ends (log line, evaluation, checkpoint,
adapter, summary). Under ZeRO-3 `generate` and `EvalContext.run` run forward passes, which are collectives:
every rank's hook must call them at the same steps. A hook that raises ends its rank's run (the others then wait
at the next collective until the launcher stops them), as any error in training does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from lorakit.generation import generate, inference
from lorakit.templates import Message, Template

T = TypeVar("T")


@dataclass(frozen=True)
class LiveModel:
    """The model being trained and how to talk to it."""

    engine: Any  # the DeepSpeed engine (engine.module: the PEFT model)
    tokenizer: Any
    template: Template

    def generate(self, messages: Sequence[Message], max_new_tokens: int = 96) -> str:
        """The greedy reply of the model as trained so far (lorakit.generate; every rank calls it together)."""
        return generate(self.engine, self.tokenizer, self.template, messages, max_new_tokens)

    def run(self, metric: Callable[[Any], T]) -> T:
        """`metric(model)` with the model in eval mode, without gradients; mode and RNG states restored after (every
        rank calls it together under ZeRO-3, where each forward pass gathers weights)."""
        with inference(self.engine) as model:
            return metric(model)


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as the log shows it (with --logging_steps 1).

    `loss` (the step's mean token loss over every rank) and `grad_norm` (the global norm before clipping) are read
    from the device only when a hook reads them: reading makes the CPU wait for the step to finish, as a logging
    step does, and not reading costs nothing. `tokens_per_second` is this step's tokens over the host time since
    the previous step ended, which on a GPU (whose work is queued ahead) is exact only over several steps.
    """

    step: int
    total_steps: int
    epoch: float
    learning_rate: float
    tokens_per_second: float
    model: LiveModel
    loss_tensor: torch.Tensor  # summed over ranks by an all-reduce queued on the device
    grad_norm_value: Any  # lorakit.train.run_step's: a tensor, a float or None

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_value is None else float(self.grad_norm_value)

    def generate(self, messages: Sequence[Message], max_new_tokens: int = 96) -> str:
        return self.model.generate(messages, max_new_tokens)


@dataclass(frozen=True)
class EvalContext:
    """One evaluation: its loss (mean token loss over the whole eval set), and the model for the caller's metric."""

    step: int
    epoch: float
    eval_loss: float
    model: LiveModel

    def generate(self, messages: Sequence[Message], max_new_tokens: int = 96) -> str:
        return self.model.generate(messages, max_new_tokens)

    def run(self, metric: Callable[[Any], T]) -> T:
        return self.model.run(metric)


StepHook = Callable[[StepInfo], Any]
EvalHook = Callable[[EvalContext], Any]


class Hooks:
    """Calls the hooks given to `train` (none: nothing at all is done, no all-reduce either)."""

    def __init__(self, on_step: StepHook | None, on_eval: EvalHook | None, model: LiveModel, total_steps: int):
        self.on_step, self.on_eval, self.model, self.total_steps = on_step, on_eval, model, total_steps
        self.last = time.perf_counter()

    def step(self, step: int, epoch: float, loss: torch.Tensor, grad_norm: Any, learning_rate: float,
             tokens: int) -> bool:  # fmt: skip
        """on_step after the step; True when it asks to stop."""
        if self.on_step is None:
            return False
        total = loss.detach().float().clone()
        if torch_dist.is_initialized():
            torch_dist.all_reduce(total)  # queued, not waited for: read only if the hook reads `loss`
        now = time.perf_counter()
        rate, self.last = tokens / max(now - self.last, 1e-9), now
        info = StepInfo(step, self.total_steps, epoch, learning_rate, rate, self.model, total, grad_norm)
        asked = bool(self.on_step(info))
        self.last = time.perf_counter()  # the hook's own time does not count against the next step's rate
        return asked

    def eval(self, step: int, epoch: float, eval_loss: float) -> bool:
        """on_eval after an evaluation; True when it asks to stop."""
        return self.on_eval is not None and bool(self.on_eval(EvalContext(step, epoch, eval_loss, self.model)))
