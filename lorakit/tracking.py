"""Experiment tracking (--report_to): trainer_log.jsonl's records, step for step, in TensorBoard, Weights & Biases
or MLflow, with the resolved configuration (lorakit_config.json, flattened to `lorakit.learning_rate`,
`deepspeed.zero_optimization.stage`, ...) as the run's hyper-parameters.

Each backend is the library itself behind the same two calls, `log(step, scalars)` and `close()`; the `Reporter`
(lorakit.reporting) hands every record it appends to trainer_log.jsonl to each tracker, so the trackers see exactly
the file's numbers. Only rank 0 makes trackers. Every backend works without a server: TensorBoard writes event
files, wandb runs offline unless WANDB_MODE says otherwise, MLflow writes a file store in output_dir unless
MLFLOW_TRACKING_URI names another. The libraries are optional extras; `check_trackers` runs in lorakit.validate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from lorakit.errors import LorakitError

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # --report_to name -> import
Scalar = bool | int | float | str


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: tuple[str, ...]) -> None:
    """Each tracker's library imports (looked up, not imported: mlflow and wandb take seconds to import)."""
    for name in names:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise LorakitError(f"--report_to {name} needs the {MODULES[name]} package: pip install "
                               f"'lorakit[{name}]' (or drop {name} from --report_to)")  # fmt: skip


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested settings as `a.b.c` keys; lists and None as the JSON text lorakit_config.json holds for them."""
    params: dict[str, Scalar] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(flat_params(value, f"{name}."))
        else:
            params[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    return params


class TensorBoardTracker:
    """Event files in output_dir/runs/<run_name>; a resumed run appends a new event file to the same folder."""

    def __init__(self, output_dir: Path, run_name: str, params: dict[str, Scalar], start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # TensorBoard drops the folder's earlier events from purge_step on: a run started afresh in the same
        # output_dir would otherwise draw both runs' curves as one, a resumed run the steps after its checkpoint twice
        purge_step = start_step + 1 if start_step else 0
        self.writer = SummaryWriter(log_dir=str(output_dir / "runs" / run_name), purge_step=purge_step)
        # SummaryWriter.add_hparams would open a second writer in a time-stamped sub-folder (a second "run" in
        # TensorBoard's list); the three hparams summaries go into this run's own event file instead
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a run killed later keeps what it logged (the writer's own flush waits 2 minutes)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in output_dir/wandb, offline unless WANDB_MODE is set (then `wandb sync` uploads it)."""

    def __init__(self, output_dir: Path, run_name: str, params: dict[str, Scalar]):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else "offline"  # None: wandb reads WANDB_MODE itself
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=run_name,
                              dir=str(output_dir), config=params, mode=mode)  # fmt: skip

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in experiment $MLFLOW_EXPERIMENT_NAME (default `lorakit`) of $MLFLOW_TRACKING_URI, else of a
    file store in output_dir/mlruns. The client's own calls only: no global active run for research code to trip on."""

    def __init__(self, output_dir: Path, run_name: str, params: dict[str, Scalar]):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store (the one store that needs no database package) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS: dict[str, Callable[[Path, str, dict[str, Scalar]], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


def start_trackers(names: tuple[str, ...], output_dir: Path, run_name: str, resolved: dict[str, Any],
                   start_step: int = 0) -> list[Tracker]:  # fmt: skip
    """One tracker per name, each with `resolved` (lorakit_config.json's content) as hyper-parameters; `run_name`
    "" is output_dir's folder name; `start_step`: a resumed run's checkpoint step (0: a run started afresh)."""
    run_name = run_name or output_dir.resolve().name
    params = flat_params(resolved)
    backends = {**BACKENDS, "tensorboard": partial(TensorBoardTracker, start_step=start_step)}
    return [backends[name](output_dir, run_name, params) for name in names]
