"""The run plan (lorakit.plan, made by lorakit.validate): each fact of a run worked out once, before any process
group, and handed on. Counted here by wrapping the functions that read and resolve, through one run's set-up as
far as it goes without ranks (the tokenised data, the evaluation split, then the memory plan on the CPU)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from lorakit.config import Config
from lorakit.data import prepare_data
from lorakit.data.build import build
from lorakit.distributed import DistInfo
from lorakit.engine import plan_run_memory
from lorakit.engine.deepspeed_config import resolve_deepspeed_config
from lorakit.engine.model import linear_module_names, load_base_model
from lorakit.evaluate import eval_data
from lorakit.train import pass_bound
from lorakit.validate import validate


def _count(monkeypatch: pytest.MonkeyPatch, function: Callable) -> list[tuple]:
    """Every call of `function`, wherever lorakit imported it by name; the calls' arguments, in order."""
    calls: list[tuple] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return function(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("lorakit") and getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, counted)
    return calls


def _count_config_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every config.json transformers reads (AutoConfig, a model class's from_pretrained: all go through here)."""
    calls: list[tuple] = []
    original = PretrainedConfig.get_config_dict.__func__

    def counted(cls: type, path: Any, **kwargs: Any) -> Any:
        calls.append((cls.__name__, str(path)))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", classmethod(counted))
    return calls


@pytest.fixture
def two_datasets(tmp_path: Path) -> Path:
    folder = tiny.write_dataset(tmp_path / "data", tiny.alpaca_records(48), name="train")
    (folder / "held.json").write_text(json.dumps(tiny.alpaca_records(8, seed=1)))
    info = {"train": {"file_name": "train.json"}, "held": {"file_name": "held.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def test_one_run_reads_the_model_config_once_resolves_deepspeed_once_and_loads_the_data_once(
    tiny_model: Path, two_datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config_reads = _count_config_reads(monkeypatch)
    resolves = _count(monkeypatch, resolve_deepspeed_config)
    builds = _count(monkeypatch, build)  # each reads and tokenises its datasets' files once, in a child process
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "template": "qwen", "cutoff_len": 256,
                               "dataset_dir": str(two_datasets), "dataset": ("train",), "eval_dataset": ("held",),
                               "output_dir": str(tmp_path / "out")})  # fmt: skip
    plan = validate(config)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))  # the CPU: no collective
    data, _, cached = prepare_data(plan.config.data, plan.tokenizer, plan.template, source=plan.train_data)
    train, held_out = eval_data(plan, data)
    share = pass_bound(plan, train, held_out, 1)  # as set-up does: the data before the memory plan
    settled, _, _ = plan_run_memory(plan.config, dist, plan.engine, share)
    assert settled.data == plan.config.data  # the memory plan settles rows, not the data tokenised before it
    engine = plan.engine
    model = load_base_model(str(tiny_model), engine.hf_config, torch.float32, engine.ds_config, False, 0)
    assert [path for _, path in config_reads] == [str(tiny_model)]
    assert len(resolves) == 1
    assert [[spec.path.name for spec in args[0]] for args in builds] == [["train.json"], ["held.json"]]
    assert not cached and (len(train), len(held_out)) == (48, 8)
    assert sum(p.numel() for p in model.parameters()) == engine.shape.parameters


def test_the_plan_holds_the_final_deepspeed_config_and_the_models_shape(tiny_model: Path, tiny_data: Path,
                                                                        tmp_path: Path):  # fmt: skip
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "template": "qwen", "dataset_dir": str(tiny_data),
                               "dataset": ("tiny",), "lora_rank": 8, "output_dir": str(tmp_path / "out")})  # fmt: skip
    plan = validate(config)
    zero = plan.engine.ds_config["zero_optimization"]
    # the LoRA-dependent threshold (rank 8 x intermediate 128, + 1), not the hidden size's (10 x 64): the memory
    # plan and the engine see this one config
    assert zero["stage"] == 3 and plan.engine.zero3 and zero["stage3_param_persistence_threshold"] == 8 * 128 + 1
    real = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert plan.engine.shape.parameters == sum(p.numel() for p in real.parameters())
    assert (plan.engine.shape.layers, plan.engine.shape.hidden, plan.engine.shape.dtype_bytes) == (2, 64, 4)
    assert list(plan.engine.lora_targets) == linear_module_names(real)
    assert plan.train_data.meta["examples"] == 48 and plan.eval_data is None and plan.resume is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.template = None  # type: ignore[misc]


def test_set_up_hands_the_memory_plan_a_ranks_mean_step_share(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """CUDA graphs' default reads it from the engine plan (lorakit.engine.compile_choice): set_up works it out from
    the tokenised data and the step's shape, as plan_epoch deals it (lorakit.data.batching.mean_step_share)."""
    from lorakit.data.batching import mean_step_share

    training = sys.modules["lorakit.train"]  # the module: the package's `lorakit.train` is its function
    seen: dict = {}

    class Planned(Exception):
        pass

    def plan(config: Config, dist: DistInfo, engine: Any, share: int, mean_share: int) -> None:
        seen.update(share=share, mean_share=mean_share, world_size=dist.world_size)
        raise Planned

    def prepared(*args: Any, **kwargs: Any) -> Any:
        seen["data"] = prepare_data(*args, **kwargs)[0]
        return seen["data"], None, False

    monkeypatch.setattr(training, "init_distributed", lambda: DistInfo(0, 0, 1, torch.device("cpu")))
    monkeypatch.setattr(training, "prepare_data", prepared)
    monkeypatch.setattr(training, "plan_run_memory", plan)
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "template": "qwen", "dataset_dir": str(tiny_data),
                               "dataset": ("tiny",), "output_dir": str(tmp_path / "out"), "packing": True,
                               "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3})  # fmt: skip
    with pytest.raises(Planned):
        training.set_up(validate(config))
    assert seen["mean_share"] == mean_step_share(seen["data"].lengths, 1, 2, 3) > 0
    assert seen["share"] >= seen["mean_share"]  # the largest share bounds the mean
