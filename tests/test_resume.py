"""Checkpoints, exact resume and faults, on 2 gloo ranks (slow: shared module fixtures, few launches).

The uninterrupted runs (eager, and compiled with inductor) and their resumed runs come from one driver launch
(tests/resume_driver.py), under umask 027 so that every file it writes can be checked against it; the kill -9,
SIGTERM, different-world-size and 2-node runs are launches of their own. Every resumed run must match the
uninterrupted one exactly: fp32 on the CPU, same data order, same RNG streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from launch import REPO, finish, free_port, launch, start, stop_unread, torchrun
from safetensors.torch import load_file

from lorakit.cli import main, parse_config
from lorakit.errors import LorakitError
from lorakit.resume import find_checkpoint
from lorakit.validate import validate

pytestmark = pytest.mark.multirank
# 3 epochs, not 6: each resumed run still crosses an epoch boundary and the schedule's warmup, at half the steps
# (each step saves a checkpoint: ~0.5 s on 2 ranks; the driver's runs, kill -9's and SIGTERM's resumes and the
# one-rank resume took ~40 s more with 6)
EPOCHS = 3
ARGS = ["--template", "qwen", "--dataset", "tiny", "--cutoff_len", "256", "--learning_rate", "1e-2",
        "--num_train_epochs", str(EPOCHS), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--logging_steps", "1", "--save_steps", "1", "--lora_rank", "4", "--lora_dropout", "0.1",
        "--neftune_noise_alpha", "5", "--seed", "11", "--warmup_steps", "2"]  # fmt: skip
STEPS = 3 * EPOCHS  # 48 examples, global batch 16: 3 steps an epoch
UMASK = 0o027  # of the driver launch: neither the usual 022 nor what 0600 files would pass for


def _args(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_dir", str(data), *ARGS, "--output_dir", str(output_dir),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_data: Path) -> Path:
    workdir = tmp_path_factory.mktemp("resume")
    command = [*torchrun(), str(REPO / "tests" / "resume_driver.py"), str(workdir), str(tiny_model), str(tiny_data)]
    previous = os.umask(UMASK)  # inherited by the launcher and its ranks
    try:
        launch(command, workdir / "driver.log")
    finally:
        os.umask(previous)
    return workdir


def _records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "trainer_log.jsonl").read_text().splitlines())}


def _assert_same_adapter(a: Path, b: Path) -> None:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("resumed, from_step", [("mid", 4), ("boundary", 3), ("legacy", 4)])
def test_resumed_run_equals_the_uninterrupted_run(runs: Path, resumed: str, from_step: int):
    full, again = _records(runs / "full"), _records(runs / resumed)
    assert sorted(again) == list(range(from_step + 1, STEPS + 1))
    for step, record in again.items():
        for key in ("loss", "grad_norm", "learning_rate", "epoch"):
            assert record[key] == full[step][key], (step, key)
    _assert_same_adapter(runs / "full", runs / resumed)
    full_loss = json.loads((runs / "full" / "train_results.json").read_text())["train_loss"]
    assert json.loads((runs / resumed / "train_results.json").read_text())["train_loss"] == full_loss


def test_a_compiled_run_with_dropout_resumes_exactly(runs: Path):
    """Inductor's dropout inside the compiled layers seeds itself from torch's CPU generator each time a graph runs
    (aten.randint in the generated wrapper), so the restored generator gives the uninterrupted run's masks. Without
    that restore they differ (measured, resumed at step 2: step 3's loss 5.7426 instead of 5.7432, every step after
    too, and the final adapter by up to 0.027)."""
    assert (
        "torch.compile: the forward of each of 2 Qwen2DecoderLayers compiled (inductor, default)"
        in (runs / "driver.log").read_text()
    )
    full, again = _records(runs / "compiled_full"), _records(runs / "compiled_mid")
    assert sorted(full) == list(range(1, 7)) and sorted(again) == [5, 6]
    for step, record in again.items():
        for key in ("loss", "grad_norm", "learning_rate", "epoch"):
            assert record[key] == full[step][key], (step, key)
    _assert_same_adapter(runs / "compiled_full", runs / "compiled_mid")


def test_checkpoints_hold_engine_state_and_a_standalone_adapter(runs: Path):
    checkpoint = runs / "full" / "checkpoint-4"
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.safetensors",
                 "rng_state_rank0.safetensors", "rng_state_rank1.safetensors", "lorakit_config.json",
                 "lorakit_state.json"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "lorakit_state.json").read_text())
    assert state["position"] == {"step": 4, "epoch": 1, "offset": 16} and state["world_size"] == 2
    assert set(state["fingerprint"]) == {"data", "model", "lora", "seed"}
    others = sorted(p.name for p in checkpoint.iterdir() if p.name != "lorakit_state.json")
    assert sorted(state["files"]) == others
    for name, record in state["files"].items():
        data = (checkpoint / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert (runs / "full" / f"checkpoint-{STEPS}").is_dir()  # the end of training writes one too


def test_nothing_a_run_writes_is_a_pickle_and_every_file_follows_the_umask(runs: Path):
    files = [p for p in (runs / "full").rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.safetensors" for p in files) and any(p.suffix == ".jsonl" for p in files)
    for path in files:
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle (plain, or torch's zip)"
    modes = {str(p.relative_to(runs)): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {name: oct(0o666 & ~UMASK) for name in modes}


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(runs: Path):
    message = (runs / "diverge_error.txt").read_text()
    assert message.startswith("step 2: the loss") and "not finite" in message
    assert "the last good checkpoint is checkpoint-1" in message
    assert [p.name for p in (runs / "diverge").glob("checkpoint-*")] == ["checkpoint-1"]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children]


def test_kill_9_then_resume_auto_finishes_like_an_uninterrupted_run(runs: Path, tiny_model: Path, tiny_data: Path,
                                                                    tmp_path: Path):  # fmt: skip
    output = tmp_path / "killed"
    run = start([*torchrun(), "examples/sft.py", *_args(tiny_model, tiny_data, output)], tmp_path / "killed.log")
    _wait_for(output / "checkpoint-5", run)
    os.kill(_rank_pids(run)[-1], signal.SIGKILL)
    assert run.wait(timeout=120) != 0
    assert not (output / f"checkpoint-{STEPS}").exists()
    resume = [
        *torchrun(),
        "examples/sft.py",
        *_args(tiny_model, tiny_data, output, "--resume_from_checkpoint", "auto"),
    ]
    log = launch(resume, tmp_path / "resumed.log")
    assert "resuming from" in log
    _assert_same_adapter(runs / "full", output)


def test_sigterm_on_one_rank_checkpoints_and_the_resumed_run_completes(runs: Path, tiny_model: Path, tiny_data: Path,
                                                                        tmp_path: Path):  # fmt: skip
    output = tmp_path / "stopped"
    run = start([*torchrun(), "examples/sft.py", *_args(tiny_model, tiny_data, output)], tmp_path / "stopped.log")
    _wait_for(output / "checkpoint-3", run)
    os.kill(_rank_pids(run)[-1], signal.SIGTERM)  # one rank only: the other learns of it at the step's end
    assert run.wait(timeout=120) != 0
    log = (tmp_path / "stopped.log").read_text()
    line = next(line for line in log.splitlines() if "lorakit: error: stopped by SIGTERM" in line)
    step = int(line.split("after step ")[1].split(";")[0])
    assert 3 <= step < STEPS and "--resume_from_checkpoint auto" in line
    assert json.loads((output / f"checkpoint-{step}" / "lorakit_state.json").read_text())["position"]["step"] == step
    resume = [
        *torchrun(),
        "examples/sft.py",
        *_args(tiny_model, tiny_data, output, "--resume_from_checkpoint", "auto"),
    ]
    launch(resume, tmp_path / "resumed.log")
    _assert_same_adapter(runs / "full", output)


@pytest.fixture(scope="module")
def one_process_resumes(runs: Path, tiny_model: Path, tiny_data: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # fmt: skip
    """The runs of the two tests below, each one plain process resuming `full` (one core each of the 2), started
    together by whichever of the tests comes first: one after the other, the two took the time of both (each ~12 s,
    mostly imports and set-up). Each test reads its own run's output folder and log."""
    single, branch = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("branch")
    single_args = _args(tiny_model, tiny_data, single / "single", "--resume_from_checkpoint",
                        str(runs / "full" / "checkpoint-4"), "--max_steps", "1000")  # fmt: skip
    # resumed from checkpoint-4 of a copy of the finished run, in that copy
    output = Path(shutil.copytree(runs / "full", branch / "full"))
    branch_args = _args(tiny_model, tiny_data, output, "--resume_from_checkpoint", str(output / "checkpoint-4"),
                        "--max_steps", "6")  # fmt: skip
    started = {}  # name: (process, folder of its log and output)
    for name, args, folder in (("single", single_args, single), ("branch", branch_args, branch)):
        started[name] = (start([sys.executable, "examples/sft.py", *args], folder / f"{name}.log"), folder)
    yield started
    stop_unread([process for process, _ in started.values()])


def test_resume_on_a_different_number_of_ranks_works(one_process_resumes: dict):
    """A 2-rank checkpoint continued by one plain process: same example order, global batch 8 instead of 16."""
    process, folder = one_process_resumes["single"]  # --resume_from_checkpoint full/checkpoint-4 --max_steps 1000
    log, output = finish(process, folder / "single.log"), folder / "single"
    assert "written by 2 ranks) on 1" in log
    # a cap past the epochs' end (HF's Trainer would train on): said, and the epochs' count stands
    last = 4 + 4 + 6 * (EPOCHS - 2)  # rest of epoch 1: 32 examples; each later epoch: 6 steps of 8
    assert f"note: --max_steps 1000 is past the end of --num_train_epochs {EPOCHS} ({last} steps)" in log
    records = _records(output)
    assert min(records) == 5 and max(records) == last
    assert records[max(records)]["epoch"] == float(EPOCHS)


def test_a_run_branched_from_an_older_checkpoint_sets_the_later_ones_aside(
    one_process_resumes: dict, tiny_model: Path, tiny_data: Path
):
    """Resumed from checkpoint-4 of a finished run, in its own output_dir: checkpoints 5-9 belong to the run it
    branches from. They are renamed, not deleted, before this run saves its own checkpoint-5 and -6, so `auto`
    after an interruption continues this branch (checkpoint-6), not the abandoned checkpoint-9."""
    process, folder = one_process_resumes["branch"]  # in a copy of `full`: its checkpoint-4, --max_steps 6
    log, output = finish(process, folder / "branch.log"), folder / "full"
    assert "set aside checkpoint-5, checkpoint-6, checkpoint-7" in log
    assert sorted(p.name for p in output.glob("checkpoint-*.abandoned")) == sorted(
        f"checkpoint-{step}.abandoned" for step in range(5, STEPS + 1)
    )
    config = parse_config(_args(tiny_model, tiny_data, output, "--resume_from_checkpoint", "auto"))
    assert find_checkpoint(config)[0] == output / "checkpoint-6"


def test_two_nodes_of_one_rank_each(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    port, output = str(free_port()), tmp_path / "two-nodes"
    nodes = [
        start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port, "examples/sft.py",
                *_args(tiny_model, tiny_data, output, "--num_train_epochs", "1")], tmp_path / f"node{rank}.log")
        for rank in (0, 1)
    ]  # fmt: skip
    assert [node.wait(timeout=300) for node in nodes] == [0, 0], (tmp_path / "node0.log").read_text()[-2000:]
    log = (tmp_path / "node0.log").read_text()
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in log
    assert (output / "adapter_model.safetensors").is_file() and (output / "checkpoint-3").is_dir()


def test_output_dir_with_checkpoints_needs_a_decision(tiny_model: Path, tiny_data: Path, tmp_path: Path, capsys):
    """Reference pitfall 3: a restart into an old output_dir is an error before anything is loaded."""
    output = tmp_path / "old"
    (output / "checkpoint-100").mkdir(parents=True)
    (output / "checkpoint-100" / "keep.txt").write_text("earlier work")
    assert main(_args(tiny_model, tiny_data, output)) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints (checkpoint-100)" in err and "--resume_from_checkpoint auto" in err
    assert (output / "checkpoint-100" / "keep.txt").read_text() == "earlier work"


def test_fingerprint_mismatch_names_what_differs(runs: Path, tiny_model: Path, tiny_data: Path, tmp_path: Path):
    checkpoint = str(runs / "full" / "checkpoint-4")
    for extra, what in ((["--lora_rank", "8"], "the LoRA settings"), (["--cutoff_len", "200"], "the data"),
                        (["--seed", "12"], "--seed (the data order)")):  # fmt: skip
        config = parse_config(_args(tiny_model, tiny_data, tmp_path / "x", "--resume_from_checkpoint", checkpoint,
                                    *extra))  # fmt: skip
        with pytest.raises(LorakitError, match=f"cannot resume .*checkpoint-4: {re.escape(what)}.* changed since"):
            validate(config)
    allowed = parse_config(_args(tiny_model, tiny_data, tmp_path / "y", "--resume_from_checkpoint", checkpoint,
                                 "--learning_rate", "5e-3", "--num_train_epochs", "8"))  # fmt: skip
    notes = validate(allowed).notes
    assert any(f"changed settings: learning_rate 0.01 -> 0.005, num_train_epochs {EPOCHS} -> 8" in n for n in notes)


def test_auto_skips_half_written_checkpoints(runs: Path, tiny_model: Path, tiny_data: Path, tmp_path: Path):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(runs / "full" / "checkpoint-4", output / "checkpoint-4")
    shutil.copytree(runs / "full" / "checkpoint-5", output / "checkpoint-5")
    (output / "checkpoint-5" / "lorakit_state.json").unlink()  # killed before the last file
    (output / ".checkpoint-6.incomplete").mkdir()  # killed before the rename
    config = parse_config(_args(tiny_model, tiny_data, output, "--resume_from_checkpoint", "auto"))
    checkpoint, notes = find_checkpoint(config)
    assert checkpoint == output / "checkpoint-4"
    assert notes == [f"skipped incomplete checkpoint {output / 'checkpoint-5'} (a save was interrupted); it is ignored"]
    explicit = parse_config(
        _args(tiny_model, tiny_data, output, "--resume_from_checkpoint", str(output / "checkpoint-5"))
    )
    with pytest.raises(LorakitError, match="is not a complete lorakit checkpoint"):
        validate(explicit)


def test_a_damaged_copy_is_passed_over_by_auto(runs: Path, tiny_model: Path, tiny_data: Path, tmp_path: Path):
    """A checkpoint copied with one file cut short: `auto` warns, names the file, and resumes the one before."""
    import shutil

    output = tmp_path / "copied"
    for step in (4, 5):
        shutil.copytree(runs / "full" / f"checkpoint-{step}", output / f"checkpoint-{step}")
    adapter = output / "checkpoint-5" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    plan = validate(parse_config(_args(tiny_model, tiny_data, output, "--resume_from_checkpoint", "auto")))
    assert plan.resume.checkpoint == output / "checkpoint-4" and plan.resume.position.step == 4
    warning = next(note for note in plan.notes if "does not verify" in note)
    assert f"{output / 'checkpoint-5'} does not verify: adapter_model.safetensors has 100 bytes" in warning


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path: Path):
    from lorakit.checkpoint import STATE_FILE, TRAINER_STATE, prune_checkpoints

    for step in (2, 4, 6, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / STATE_FILE).write_text("{}")
        (folder / TRAINER_STATE).write_text("")
    (tmp_path / "checkpoint-10").mkdir()  # incomplete: not counted, not deleted
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]
    prune_checkpoints(tmp_path, keep=0)  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 3
