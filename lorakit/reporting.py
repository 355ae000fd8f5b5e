"""What a person reads: the step math at start, one line per logging step, a final summary; and the same
records in `output_dir/trainer_log.jsonl` (and `training_loss.png` with --plot_loss), each also handed to the
experiment trackers of --report_to (lorakit.tracking). Only rank 0 reports.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit.distributed import DistInfo
from lorakit.engine.kernels import compile_cache_misses, compile_seconds
from lorakit.steps import StepMath
from lorakit.tracking import Tracker


def say(message: str, is_main: bool = True) -> None:
    if is_main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class Reporter:
    """The log window (steps since the last log line), run totals, trainer_log.jsonl and the progress bar.

    Every rank calls every method (the loss is summed over ranks when a line is logged); only rank 0 writes.
    """

    def __init__(self, output_dir: Path, math: StepMath, dist: DistInfo, start_step: int, loss_sum: float,
                 trackers: Sequence[Tracker] = ()):  # fmt: skip
        """A resumed run (start_step > 0) keeps the log records up to its checkpoint and its running loss.
        `trackers` (rank 0's) receive every record written to trainer_log.jsonl from here on, and are closed by
        `finish`."""
        self.output_dir, self.math, self.dist, self.trackers = output_dir, math, dist, trackers
        self.log_path = output_dir / "trainer_log.jsonl"
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.total_loss, self.total_tokens, self.start_step = loss_sum, 0, start_step
        self.start = self.window_start = time.perf_counter()
        self.compile_start = compile_seconds()  # an earlier run's compile in this process (research code trains twice)
        self.cache_misses_start = compile_cache_misses()
        interval = 1.0 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=math.total_steps, initial=start_step, disable=not dist.is_main, desc="train",
                        mininterval=interval)  # fmt: skip
        self.records: list[dict[str, Any]] = []
        self.last_eval_loss: float | None = None
        if dist.is_main:
            if start_step and self.log_path.is_file():
                earlier = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
                self.records = [r for r in earlier if r["step"] <= start_step]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def step_done(self, loss: Any, tokens: int) -> None:
        """`loss`: this rank's share of the step's mean token loss (a tensor: no device sync until logged)."""
        self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1
        self.window_tokens += tokens
        self.total_tokens += tokens
        self.bar.update(1)

    def loss_sum(self) -> float:
        """Sum of every step loss so far, the window not yet logged included (a collective)."""
        return self.total_loss + self.dist.sum([float(self.window_loss)])[0]

    def log(self, step: int, learning_rate: float, grad_norm: Any, epoch: float) -> None:
        mean_loss = self.dist.sum([float(self.window_loss)])[0] / self.window_steps
        self.total_loss += mean_loss * self.window_steps
        elapsed = time.perf_counter() - self.window_start
        tokens_per_second, seconds_per_step = self.window_tokens / elapsed, elapsed / self.window_steps
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.window_start = time.perf_counter()
        if not self.dist.is_main:
            return
        line = {
            "loss": round(mean_loss, 4),
            "grad_norm": round(float("nan") if grad_norm is None else float(grad_norm), 4),
            "learning_rate": learning_rate,
            "epoch": round(epoch, 2),
        }
        say(str(line))
        record = {"step": step, **line, "tokens_per_second": round(tokens_per_second, 1),
                  "seconds_per_step": round(seconds_per_step, 4)}  # fmt: skip
        self._append(record)

    def log_eval(self, step: int, eval_loss: float, epoch: float) -> None:
        self.last_eval_loss = eval_loss
        if not self.dist.is_main:
            return
        line = {"eval_loss": round(eval_loss, 4), "epoch": round(epoch, 2)}
        say(str(line))
        self._append({"step": step, **line})

    def _append(self, record: dict[str, Any]) -> None:
        """One record into trainer_log.jsonl, the plot's records and every tracker: the same numbers everywhere."""
        self.records.append(record)
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {key: value for key, value in record.items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(record["step"], scalars)

    def finish(self, steps: int, epochs: float, plot: bool) -> dict[str, float]:
        """The final summary (printed and written to train_results.json); the same dict on every rank. Rates
        count this session's steps; train_loss covers the whole run, resumed or not."""
        self.bar.close()
        runtime = time.perf_counter() - self.start
        session_epochs = epochs * (steps - self.start_step) / max(steps, 1)
        summary = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(self.math.num_examples * session_epochs / runtime, 3),
            "train_steps_per_second": round((steps - self.start_step) / runtime, 3),
            "train_tokens_per_second": round(self.total_tokens / runtime, 1),
            "train_loss": round(self.total_loss / max(steps, 1), 4),
            "epoch": round(epochs, 2),
        }
        if self.last_eval_loss is not None:
            summary["eval_loss"] = round(self.last_eval_loss, 4)
        if self.dist.device.type == "cuda":  # the compile is part of the runtime: said, so a reader can set it apart
            compiled = max(compile_seconds() - self.compile_start, 0.0)  # 0 after a torch._dynamo.reset() between
            missed = max(compile_cache_misses() - self.cache_misses_start, 0)
            peak, compiling, misses = self.dist.max([torch.cuda.max_memory_allocated(self.dist.device) / 2**30,
                                                     compiled, float(missed)])  # fmt: skip
            summary["peak_gpu_memory_gib"] = round(peak, 2)
            if compiling:  # and how many graphs that compiled afresh, not from the cache (0: the warm-up's worked)
                summary["compile_seconds"], summary["compile_cache_misses"] = round(compiling, 1), int(misses)
        if self.dist.is_main:
            say(str(summary))
            (self.output_dir / "train_results.json").write_text(json.dumps(summary, indent=2) + "\n")
            if plot:
                plot_loss(self.records, self.output_dir / "training_loss.png")
        for tracker in self.trackers:
            tracker.close()
        return summary


def smooth(values: list[float]) -> list[float]:
    """A centred moving average over about a tenth of the points, narrowed symmetrically at the ends (the first
    and last points are their own average). An exponential average lags: with the 0.9 weight lorakit used, the
    smoothed line of a 300-step run sat a whole epoch behind the falling loss, 2-4 units above it. A centred
    window follows the curve without a lag, and a symmetric one does not pull the steep start down."""
    half, last = max(1, len(values) // 10) // 2, len(values) - 1
    spans = [min(half, i, last - i) for i in range(len(values))]
    return [sum(values[i - k : i + k + 1]) / (2 * k + 1) for i, k in enumerate(spans)]


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """The logged training loss, raw and smoothed (a centred moving average), and the eval loss if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "eval_loss" in r]
    records = [r for r in records if "loss" in r]
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(steps, losses, alpha=0.4, label="loss")
    axes.plot(steps, smooth(losses), label="smoothed")
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axes.set(xlabel="step", ylabel="loss", title=f"training loss of {path.parent.name}")
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
