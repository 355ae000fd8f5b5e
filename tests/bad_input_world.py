"""The world of one bad-input case (tests/test_bad_inputs_table.py): its folders, the commands it runs, and the small
functions that break one file each. Kept apart from the table so each file stays readable."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import write_checkpoint

from lorakit.checkpoint import ADAPTER_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DS = json.loads((REPO / "examples" / "ds_config_zero3.json").read_text())
ALPACA = [{"instruction": "Which colour is the cat?", "input": "", "output": "The cat is red."}] * 4


@dataclass
class World:
    """One case's files: `tmp` is its own folder; the tiny model, data and adapters are shared and must not change."""

    tmp: Path
    model: Path
    data: Path
    adapter: Path
    other_adapter: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def train(self, *extra: object, model: Path | None = None, data: Path | None = None, dataset: str = "tiny",
              out: Path | None = None) -> list[str]:  # fmt: skip
        argv = ["train", "--model_name_or_path", model or self.model, "--template", "qwen", "--cutoff_len", "256",
                "--dataset_dir", data or self.data, "--dataset", dataset, "--output_dir", out or self.out]  # fmt: skip
        return [str(a) for a in [*argv, *extra]]

    def data_file(self, content: str | bytes, name: str = "d.json", entry: dict | None = None) -> list[str]:
        folder = self.tmp / "data"
        folder.mkdir(exist_ok=True)
        target = folder / name
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        info = {"d": {"file_name": name, **(entry or {})}}
        (folder / "dataset_info.json").write_text(json.dumps(info))
        return self.train(data=folder, dataset="d")

    def info(self, content: str | bytes, *extra: str) -> list[str]:
        folder = self.tmp / "data"
        folder.mkdir()
        (folder / "d.json").write_text(json.dumps(ALPACA))
        (folder / "dataset_info.json").write_bytes(content.encode() if isinstance(content, str) else content)
        return self.train(*extra, data=folder, dataset="d")

    def model_copy(self, change: Callable[[Path], object]) -> Path:
        folder = shutil.copytree(self.model, self.tmp / "model")
        change(folder)
        return folder

    def broken_model(self, change: Callable[[Path], object]) -> list[str]:
        return self.train(model=self.model_copy(change))

    def ds(self, change: Callable[[dict], object], text: str | None = None, *extra: str) -> list[str]:
        config = json.loads(json.dumps(REFERENCE_DS))
        change(config)
        (self.tmp / "ds.json").write_text(text if text is not None else json.dumps(config))
        return self.train("--deepspeed", self.tmp / "ds.json", *extra)

    def checkpoint(self, change: Callable[[Path], object]) -> list[str]:
        folder = write_checkpoint(self.tmp / "old", 4)
        change(folder)
        return self.train("--resume_from_checkpoint", folder)

    def adapter_copy(self, change: Callable[[Path], object], source: Path | None = None) -> Path:
        folder = shutil.copytree(source or self.adapter, self.tmp / "adapter")
        change(folder)
        return folder

    def merge(self, adapter: Path | None = None, base: Path | None = None, out: Path | None = None) -> list[str]:
        return ["merge", "--base", str(base or self.model), "--adapter", str(adapter or self.adapter), "--out",
                str(out or self.out)]  # fmt: skip

    def chat(self, adapter: Path | None = None, model: Path | None = None) -> list[str]:
        argv = ["chat", "--model", str(model or self.model), "--prompt", "hi", "--max_new_tokens", "2"]
        return argv + (["--adapter", str(adapter)] if adapter else [])


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)


def _truncate(name: str, keep: int = -100) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def _config_with(**values: object) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | values))

    return change


def _remove(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / name).unlink() for name in names]


def _sharded_with_missing_shard(folder: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _set(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda config: config.setdefault(section, {}).__setitem__(key, value)


def _adapter_config(**values: object) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | values))

    return change


def _pissa_start_of_rank(rank: int) -> Callable[[Path], None]:
    """An unconverted PiSSA adapter whose pissa_init/ is another run's: its A0 and B0 of rank `rank`."""

    def change(folder: Path) -> None:
        _adapter_config(init_lora_weights="pissa_niter_16")(folder)
        tensors = load_file(folder / ADAPTER_WEIGHTS)
        start = {k: (v[:rank] if ".lora_A." in k else v[:, :rank]).contiguous() for k, v in tensors.items()}
        (folder / "pissa_init").mkdir()
        shutil.copyfile(folder / "adapter_config.json", folder / "pissa_init" / "adapter_config.json")
        save_file(start, folder / "pissa_init" / ADAPTER_WEIGHTS)

    return change


def _empty_safetensors(folder: Path) -> None:
    save_file({}, folder / "adapter_model.safetensors")


def _zero_width_lora(folder: Path) -> None:
    module = "base_model.model.x"
    empty = {f"{module}.lora_A.weight": torch.zeros(0, 4), f"{module}.lora_B.weight": torch.zeros(4, 0)}
    save_file(empty, folder / "adapter_model.safetensors")


def _embedding_of_width(width: int) -> Callable[[Path], None]:
    """The adapter with a module trained in full (modules_to_save) made for a model of another width."""

    def change(folder: Path) -> None:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
        save_file({**tensors, "base_model.model.model.embed_tokens.weight": torch.zeros(8, width)},
                  folder / ADAPTER_WEIGHTS)  # fmt: skip

    return change


def _header_longer_than_file(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")


def _tools(world: World, calls: int, template: str) -> list[str]:
    """Tool-calling data (glaive's layout) whose call turn makes `calls` calls at once, trained with `template`."""
    call = json.dumps([{"name": "f", "arguments": {}}] * calls)
    record = {"conversations": [{"from": "human", "value": "?"}, {"from": "function_call", "value": call}],
              "tools": json.dumps([{"name": "f", "parameters": {}}])}  # fmt: skip
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
    return [*world.data_file(json.dumps([record]), entry=entry), "--template", template]


def _repeating_mixture(world: World, val_size: int) -> list[str]:
    """Datasets of 3 records and 1, interleaved over: 6 examples of 4 records (the small one's record 3 times)."""
    folder = world.tmp / "data"
    folder.mkdir()
    for name, records in (("big", ALPACA[:3]), ("small", ALPACA[:1])):
        (folder / f"{name}.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in ("big", "small")}))
    return world.train("--mix_strategy", "interleave_over", "--val_size", val_size, data=folder, dataset="big,small")


def _existing_checkpoint(world: World) -> list[str]:
    write_checkpoint(world.out, 2)
    return world.train()
