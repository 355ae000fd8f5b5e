"""Checkpoint files without a process group: RNG states without pickle, the file list and its verification (also
how `lorakit.resume` picks a checkpoint by it), the refusal of the earlier pickled layout, and file modes under
the user's umask. The checkpoints here are folders of real files written by lorakit's own functions."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lorakit.checkpoint import (
    ADAPTER_WEIGHTS,
    STATE_FILE,
    TRAINER_STATE,
    checkpoint_folders,
    file_list,
    first_difference,
    read_state,
    save_adapter,
)
from lorakit.config import Config
from lorakit.errors import LorakitError
from lorakit.files import current_umask, save_safetensors
from lorakit.resume import find_checkpoint
from lorakit.rng import legacy_rng_file, load_legacy_rng_state, load_rng_state, rng_file, save_rng_state
from lorakit.run_record import CONFIG_FILE


def _draws() -> tuple:
    """The next values of every stream a resumed run depends on (numpy's and Python's gaussians use a cache)."""
    return torch.rand(4).tolist(), np.random.randn(3).tolist(), np.random.rand(2).tolist(), random.gauss(0, 1), \
        random.random()  # fmt: skip


def test_rng_states_round_trip_exactly_and_the_file_holds_no_pickle(tmp_path: Path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.randn(), random.gauss(0, 1)  # leaves a cached gaussian in both: part of the state
    save_rng_state(tmp_path / rng_file(0))
    expected = _draws()
    _draws()
    load_rng_state(tmp_path / rng_file(0))
    assert _draws() == expected
    with safe_open(tmp_path / rng_file(0), framework="pt") as handle:  # plain tensors + JSON metadata
        assert set(handle.keys()) == {"torch", "numpy_keys", "python_words"}
        assert json.loads(handle.metadata()["lorakit_rng"])["cuda_devices"] == 0


def test_a_legacy_rng_file_is_read_by_the_restricted_unpickler_only(tmp_path: Path):
    torch.manual_seed(7), np.random.seed(8), random.seed(9)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(state, tmp_path / legacy_rng_file(0))  # exactly what lorakit wrote before
    expected = _draws()
    load_legacy_rng_state(tmp_path / legacy_rng_file(0))
    assert _draws() == expected

    class Payload:  # what a malicious file would carry: a class the loader would have to import and call
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({**state, "torch": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_legacy_rng_state(tmp_path / "evil.pt")


def write_checkpoint(folder: Path, step: int, legacy: bool = False) -> Path:
    """A checkpoint folder as save_checkpoint lays it out (random tensors; the files are what matters here)."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_safetensors({"lora_A": torch.randn(4, 8)}, checkpoint / ADAPTER_WEIGHTS)
    save_safetensors({"lora_A::master": torch.randn(4, 8)}, checkpoint / TRAINER_STATE)
    (checkpoint / "adapter_config.json").write_text("{}")
    (checkpoint / CONFIG_FILE).write_text(json.dumps({"lorakit": {}}))
    state = {"position": {"step": step, "epoch": 0, "offset": 8 * step}, "world_size": 1,
             "optimizer_steps": [float(step)], "fingerprint": {}, "loss_sum": 0.0}  # fmt: skip
    if legacy:
        torch.save({"torch": torch.get_rng_state()}, checkpoint / legacy_rng_file(0))
    else:
        save_rng_state(checkpoint / rng_file(0))
        state["files"] = file_list(checkpoint)
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    return checkpoint


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _relist(checkpoint: Path, change) -> None:
    state = read_state(checkpoint)
    change(state["files"])
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


CORRUPTIONS = [
    (lambda c: _truncate(c / TRAINER_STATE), r"^trainer_state.safetensors has \d+ bytes, \d+ when it was written$"),
    (lambda c: _flip_last_byte(c / ADAPTER_WEIGHTS), r"^adapter_model.safetensors differs .*\(sha256\)$"),
    (lambda c: (c / rng_file(0)).unlink(), r"^rng_state_rank0.safetensors is missing$"),
    (lambda c: _relist(c, lambda files: files.pop(TRAINER_STATE)), r"^trainer_state.safetensors is not in the file"),
    (lambda c: _relist(c, lambda files: files.update({"../x": {"size": 1, "sha256": ""}})), r"^\.\./x is missing$"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS)
def test_the_first_file_that_differs_is_named(tmp_path: Path, corrupt, message: str):
    checkpoint = write_checkpoint(tmp_path, 4)
    assert set(read_state(checkpoint)["files"]) == {ADAPTER_WEIGHTS, TRAINER_STATE, "adapter_config.json",
                                                    CONFIG_FILE, rng_file(0)}  # fmt: skip
    assert first_difference(checkpoint, read_state(checkpoint)) is None
    corrupt(checkpoint)
    difference = first_difference(checkpoint, read_state(checkpoint))
    assert difference is not None and re.search(message, difference), difference


def _resume(output_dir: Path, which: str = "auto", *extra_flags: tuple[str, object]) -> Config:
    flags = {"output_dir": str(output_dir), "resume_from_checkpoint": which, **dict(extra_flags)}
    return Config.from_flat(flags)


def test_a_named_checkpoint_that_differs_is_refused_naming_the_file(tmp_path: Path):
    checkpoint = write_checkpoint(tmp_path, 4)
    _truncate(checkpoint / TRAINER_STATE)
    with pytest.raises(LorakitError, match=r"cannot resume .*checkpoint-4: trainer_state.safetensors has .*copy the"):
        find_checkpoint(_resume(tmp_path, str(checkpoint)))


def test_auto_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path: Path):
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step)
    _flip_last_byte(tmp_path / "checkpoint-6" / ADAPTER_WEIGHTS)
    (tmp_path / "checkpoint-4" / STATE_FILE).write_text('{"position": ')  # a copy cut off mid-file
    checkpoint, notes = find_checkpoint(_resume(tmp_path))
    assert checkpoint == tmp_path / "checkpoint-2"
    assert notes == [
        f"warning: {tmp_path / 'checkpoint-6'} does not verify: adapter_model.safetensors differs from the file that "
        "was written (sha256); trying the next older checkpoint",
        f"warning: {tmp_path / 'checkpoint-4'} does not verify: lorakit_state.json is not the JSON lorakit wrote; "
        "trying the next older checkpoint",
    ]
    _truncate(tmp_path / "checkpoint-2" / rng_file(0))
    with pytest.raises(LorakitError, match=r"no checkpoint in .* verifies \(the newest, checkpoint-6: adapter_model"):
        find_checkpoint(_resume(tmp_path))


@pytest.mark.parametrize("which", ["auto", "checkpoint-3"])
def test_the_earlier_pickled_layout_is_refused_unless_the_flag_names_the_risk(tmp_path: Path, which: str):
    checkpoint = write_checkpoint(tmp_path, 3, legacy=True)
    requested = which if which == "auto" else str(checkpoint)
    with pytest.raises(LorakitError, match=r"earlier checkpoint layout .* continue it with --unpickle_legacy_check"):
        find_checkpoint(_resume(tmp_path, requested))
    found, _ = find_checkpoint(_resume(tmp_path, requested, ("unpickle_legacy_checkpoint", True)))
    assert found == checkpoint


def test_the_legacy_flag_needs_a_resume():
    with pytest.raises(LorakitError, match="--unpickle_legacy_checkpoint applies only to a resume"):
        Config.from_flat({"unpickle_legacy_checkpoint": True})


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=lambda mask: f"umask{mask:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_files_follow_the_umask(tmp_path: Path, umask: int):
    assert current_umask() == umask
    checkpoint = write_checkpoint(tmp_path, 1)
    assert _modes(checkpoint) == {name: 0o666 & ~umask for name in _modes(checkpoint)}


def test_a_saved_adapter_follows_the_umask(tiny_model: Path, tmp_path: Path, umask: int):
    """PEFT's save_pretrained writes the weights through safetensors, which alone would leave them 0600."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "out", is_main=True)
    modes = _modes(tmp_path / "out")
    assert ADAPTER_WEIGHTS in modes and modes == {name: 0o666 & ~umask for name in modes}


def test_copies_keep_verifying(tmp_path: Path):
    """A checkpoint copied elsewhere (another cluster, a bucket) verifies: the list holds names, not paths."""
    checkpoint = write_checkpoint(tmp_path / "a", 5)
    copy = shutil.copytree(checkpoint, tmp_path / "b" / "checkpoint-5")
    assert find_checkpoint(_resume(tmp_path / "b")) == (copy, [])


@pytest.mark.parametrize(
    "legacy, message",
    [(True, "has lorakit's earlier checkpoint layout"), (False, "trainer_state.safetensors has")],
    ids=["legacy", "damaged"],
)
def test_the_cli_refuses_in_one_line_before_anything_is_loaded(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture, legacy: bool,
                                                               message: str):  # fmt: skip
    from lorakit.cli import main

    output_dir = tmp_path / "out"
    checkpoint = write_checkpoint(output_dir, 3, legacy=legacy)
    _truncate(checkpoint / TRAINER_STATE)
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    argv = ["--model_name_or_path", str(tiny_model), "--template", "qwen", "--dataset_dir", str(tiny_data),
            "--dataset", "tiny", "--cutoff_len", "256", "--output_dir", str(output_dir),
            "--resume_from_checkpoint", "auto" if legacy else str(checkpoint)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error: cannot resume ") and message in err[0], err
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before


def test_save_total_limit_never_deletes_the_checkpoint_just_written(tmp_path: Path):
    """A run resumed from checkpoint-4 into the output_dir that also holds the earlier run's checkpoint-8: with
    --save_total_limit 1 its new checkpoint-6 is the one kept, not deleted at once with the one it resumed from."""
    from lorakit.checkpoint import prune_checkpoints

    for step in (4, 6, 8):
        write_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep=1, saved=tmp_path / "checkpoint-6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    for step in (8, 10):
        write_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep=2, saved=tmp_path / "checkpoint-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-8"]


def test_a_branch_sets_aside_the_checkpoints_past_the_one_it_resumed(tmp_path: Path):
    """Resumed from checkpoint-4 of a run that went on to 8: 6 and 8 belong to the abandoned branch. Renamed (kept),
    so that `auto` after a later interruption, and --save_total_limit, see only this run's checkpoints; a second
    branch from the same point keeps the first one's copies apart."""
    from lorakit.resume import set_aside_later_checkpoints

    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step)
    (line,) = set_aside_later_checkpoints(tmp_path, 4)
    assert "checkpoint-6, checkpoint-8" in line and "abandoned" in line
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "checkpoint-8.abandoned" / STATE_FILE).is_file()  # nothing deleted
    write_checkpoint(tmp_path, 6)  # the branch saves its own checkpoint-6, then is interrupted again
    config = Config.from_flat({"output_dir": str(tmp_path), "resume_from_checkpoint": "auto"})
    assert find_checkpoint(config)[0] == tmp_path / "checkpoint-6"  # its own, not the abandoned checkpoint-8
    write_checkpoint(tmp_path, 8)
    set_aside_later_checkpoints(tmp_path, 4)
    abandoned = sorted(p.name for p in tmp_path.iterdir() if "abandoned" in p.name)
    assert abandoned == ["checkpoint-6.abandoned", "checkpoint-6.abandoned-2", "checkpoint-8.abandoned",
                         "checkpoint-8.abandoned-2"]  # fmt: skip
    assert set_aside_later_checkpoints(tmp_path, 4) == []  # nothing past step 4 is left
