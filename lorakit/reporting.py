"""What a person reads: the step math at start, one line per logging step, a final summary; and the same
records in `output_dir/trainer_log.jsonl` (and `training_loss.png` with --plot_loss). Only rank 0 reports.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


@dataclass(frozen=True)
class StepMath:
    num_examples: int
    num_epochs: int
    micro_batch: int
    accumulation: int
    world_size: int
    steps_per_epoch: int
    total_steps: int  # after --max_steps
    warmup_steps: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def last_step_examples(self) -> int:
        return self.num_examples - (self.steps_per_epoch - 1) * self.global_batch

    def lines(self, trainable: int, total: int) -> list[str]:
        return [
            "***** Running training *****",
            f"  Num examples = {self.num_examples:,}",
            f"  Num Epochs = {self.num_epochs:,}",
            f"  Instantaneous batch size per device = {self.micro_batch:,}",
            f"  Total train batch size (w. parallel, distributed & accumulation) = {self.global_batch:,}",
            f"  Gradient Accumulation steps = {self.accumulation:,}",
            f"  Total optimization steps = {self.total_steps:,} ({self.steps_per_epoch} per epoch; the last step of "
            f"an epoch takes the {self.last_step_examples} remaining examples)",
            f"  Warmup steps = {self.warmup_steps:,}",
            f"  Number of trainable parameters = {trainable:,} ({100 * trainable / max(total, 1):.4f}% of {total:,})",
        ]


def say(message: str, is_main: bool = True) -> None:
    if is_main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class Reporter:
    """Rank 0's log lines, trainer_log.jsonl and progress bar; on other ranks every method does nothing."""

    def __init__(self, output_dir: Path, total_steps: int, is_main: bool):
        self.is_main = is_main
        self.log_path = output_dir / "trainer_log.jsonl"
        self.records: list[dict[str, Any]] = []
        self.bar = tqdm(
            total=total_steps,
            disable=not is_main,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        if is_main:
            self.log_path.write_text("")

    def step_done(self) -> None:
        self.bar.update(1)

    def log(
        self, step: int, loss: float, grad_norm: float, learning_rate: float, epoch: float, tokens_per_second: float
    ):
        if not self.is_main:
            return
        line = {
            "loss": round(loss, 4),
            "grad_norm": round(grad_norm, 4),
            "learning_rate": learning_rate,
            "epoch": round(epoch, 2),
        }
        say(str(line))
        record = {"step": step, **line, "tokens_per_second": round(tokens_per_second, 1)}
        self.records.append(record)
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, float], output_dir: Path, plot: bool) -> None:
        self.bar.close()
        if not self.is_main:
            return
        say(str(summary))
        (output_dir / "train_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        if plot:
            plot_loss(self.records, output_dir / "training_loss.png")


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """The logged training loss, raw and smoothed (exponential moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    smoothed, average = [], None
    for value in losses:
        average = value if average is None else 0.9 * average + 0.1 * value
        smoothed.append(average)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(steps, losses, alpha=0.4, label="loss")
    axes.plot(steps, smoothed, label="smoothed")
    axes.set(xlabel="step", ylabel="loss", title=f"training loss of {path.parent.name}")
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
