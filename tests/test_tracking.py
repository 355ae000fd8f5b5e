"""Experiment tracking (--report_to): the trackers receive exactly trainer_log.jsonl's records, read back from what
each library wrote (TensorBoard's event files, MLflow's file store, wandb's offline run when wandb is installed),
with the resolved config as hyper-parameters; a missing library or a bad value is one line before anything loads.
The 2-rank CLI run (tests/test_multirank.py) checks the same end to end, and that only rank 0 tracks."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_agreement import one_rank_group  # noqa: F401 - the Reporter sums the loss over a (one-rank) group

from lorakit.cli import main
from lorakit.config import Config
from lorakit.distributed import DistInfo
from lorakit.reporting import Reporter
from lorakit.run_record import resolved_config
from lorakit.steps import StepMath
from lorakit.tracking import flat_params, start_trackers

DS_CONFIG = {"train_batch_size": 16, "zero_optimization": {"stage": 3, "overlap_comm": True}}


def jsonl_scalars(log: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of trainer_log.jsonl as (step, value) pairs by name."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    names = {key for record in records for key in record} - {"step"}
    return {name: [(r["step"], r[name]) for r in records if name in r] for name in names}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_hparams(folder: Path) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = EventAccumulator(str(folder)).Reload().PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {name: MessageToDict(value) for name, value in start.hparams.items()}


def mlflow_runs(store: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    return client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])


def mlflow_scalars(store: Path, run_id: str, names: Any) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    return {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)] for name in names}


def assert_same_scalars(tracked: dict[str, list[tuple[int, float]]], logged: dict[str, list[tuple[int, float]]],
                        rel: float = 0.0) -> None:  # fmt: skip
    assert tracked.keys() == logged.keys()
    for name, pairs in logged.items():
        assert [step for step, _ in tracked[name]] == [step for step, _ in pairs], name
        assert [value for _, value in tracked[name]] == pytest.approx([value for _, value in pairs], rel=rel), name


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test does may reach a server: no tracking URI or wandb mode from the caller's environment."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the read-back client (lorakit sets its own)


def report(output_dir: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Six logged steps with evaluations at 3 and 6 through a Reporter with `names`' trackers; the resolved config
    they were given."""
    output_dir.mkdir()
    resolved = resolved_config(Config(), DS_CONFIG)
    trackers = start_trackers(names, output_dir, "", resolved)
    math = StepMath(48, 1, 4, 2, 1, 6, 6, 0)
    reporter = Reporter(output_dir, math, DistInfo(0, 0, 1, torch.device("cpu")), 0, 0.0, trackers)
    for step in range(1, 7):
        reporter.step_done(torch.tensor(3.0 / step + 0.123456), 1000 + step)
        reporter.log(step, 1e-3 * (7 - step) / 6, torch.tensor(0.5 + step / 7), step / 6)
        if step % 3 == 0:
            reporter.log_eval(step, 2.0 / step + 0.0111, step / 6)
    reporter.finish(6, 1.0, plot=False)
    return resolved


def test_tensorboard_and_mlflow_hold_what_the_jsonl_holds_with_the_config(tmp_path: Path, offline: None):
    out = tmp_path / "run-a"
    resolved = report(out, ("tensorboard", "mlflow"))
    logged = jsonl_scalars(out / "trainer_log.jsonl")
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second", "eval_loss"} <= logged.keys()
    assert [step for step, _ in logged["eval_loss"]] == [3, 6] and len(logged["loss"]) == 6
    assert [path.name for path in (out / "runs").iterdir()] == ["run-a"]  # the run is named after output_dir
    assert_same_scalars(tensorboard_scalars(out / "runs" / "run-a"), logged, rel=1e-6)  # stored as float32
    (run,) = mlflow_runs(out / "mlruns")
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert_same_scalars(mlflow_scalars(out / "mlruns", run.info.run_id, logged), logged)  # float64: exact
    params = flat_params(resolved)
    assert params["lorakit.report_to"] == '["none"]' and params["deepspeed.zero_optimization.stage"] == 3
    assert run.data.params == {name: str(value) for name, value in params.items()}
    assert tensorboard_hparams(out / "runs" / "run-a") == params  # numbers (booleans as 1/0) and text


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's .wandb file: after a 7-byte header, blocks of 32 KiB holding chunks of
    (crc32, length, type) + data, a record split over blocks as FIRST/MIDDLE/LAST chunks (LevelDB's log format,
    which wandb writes; its Python reader left the package with wandb-core)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_runs_offline_and_holds_what_the_jsonl_holds_with_the_config(tmp_path: Path, offline: None):
    pytest.importorskip("wandb", reason="wandb is an optional extra, not in the test extra")
    out = tmp_path / "run-w"
    resolved = report(out, ("wandb",))
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing was sent anywhere
    records = wandb_records(run_file)
    rows = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    tracked: dict[str, list[tuple[int, float]]] = {}
    for row in rows:  # one row a step: an evaluation logged at a step joins that step's row
        for item in row.item:
            name = item.key or "/".join(item.nested_key)  # wandb-core writes some keys as a one-part path
            if not name.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                tracked.setdefault(name, []).append((row.step.num, json.loads(item.value_json)))
    # the epoch of an evaluation's record repeats its step's: wandb's one row a step holds it once
    logged = {name: list(dict.fromkeys(pairs)) for name, pairs in jsonl_scalars(out / "trainer_log.jsonl").items()}
    assert_same_scalars(tracked, logged)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert run.display_name == "run-w" and config == flat_params(resolved)


@pytest.mark.parametrize(
    "argv, blocked, message",
    [
        (["--report_to", "tensorboard"], "tensorboard",
         "--report_to tensorboard needs the tensorboard package: pip install 'lorakit[tensorboard]'"),
        (["--report_to", "none,mlflow"], None, "--report_to none,mlflow names trackers and none; drop none"),
        (["--report_to", "tensorboard,mlflow"], "mlflow",
         "--report_to mlflow needs the mlflow package: pip install 'lorakit[mlflow]'"),
        (["--report_to", "wandb"], "wandb", "--report_to wandb needs the wandb package: pip install 'lorakit[wandb]'"),
        (["--report_to", "tensorbord"], None, "--report_to tensorbord is unknown; use none or any of tensorboard, "),
        (["--run_name", "../elsewhere"], None, "--run_name ../elsewhere must be a name, not a path"),
    ],
)  # fmt: skip
def test_a_missing_tracker_library_or_a_bad_value_is_one_line_before_anything_loads(
    argv: list[str], blocked: str | None, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):  # fmt: skip
    if blocked:  # a None entry in sys.modules is how Python marks a module that cannot be imported
        monkeypatch.setitem(sys.modules, blocked, None)
    out = tmp_path / "out"
    # no model folder at all: the tracker check comes before anything is read from it
    assert main(["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lorakit: error: {message}"), err
    assert not out.exists()


@pytest.mark.parametrize("start_step, expected", [(0, [(1, 10.0), (2, 20.0), (3, 30.0)]),
                                                  (2, [(1, 1.0), (2, 2.0), (3, 30.0)])])  # fmt: skip
def test_tensorboard_holds_only_this_runs_steps_after_a_restart(tmp_path: Path, start_step: int, expected: list):
    """A run started afresh in the same output_dir (--overwrite_output_dir, or no checkpoint to resume) replaces the
    earlier run's curve; a resumed one replaces the steps after its checkpoint, which the earlier run had logged and
    the resumed run logs again (trainer_log.jsonl keeps the records up to the checkpoint likewise)."""
    earlier = start_trackers(("tensorboard",), tmp_path, "r", {"lorakit.seed": 1})[0]
    for step in (1, 2, 3, 4):
        earlier.log(step, {"loss": float(step)})
    earlier.close()
    later = start_trackers(("tensorboard",), tmp_path, "r", {"lorakit.seed": 1}, start_step)[0]
    for step in range(start_step + 1, 4):
        later.log(step, {"loss": 10.0 * step})
    later.close()
    assert tensorboard_scalars(tmp_path / "runs" / "r")["loss"] == expected
