"""The LoRA variant flags (rsLoRA, DoRA, LoRA+) and LoRA+'s optimizer groups, on one process (no DeepSpeed)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.adapter import lora_deltas
from lorakit.cli import parse_config
from lorakit.config import LoraSettings
from lorakit.engine import parameter_groups
from lorakit.engine.model import attach_lora
from lorakit.errors import LorakitError
from lorakit.train import set_learning_rate


class _Engine:  # what set_learning_rate reads of a DeepSpeed engine: its optimizer
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_flags_and_yaml_name_the_same_fields(tmp_path: Path):
    argv = ["--use_rslora", "--use_dora", "true", "--loraplus_lr_ratio", "16"]
    lora = parse_config(argv).lora
    assert (lora.use_rslora, lora.use_dora, lora.loraplus_lr_ratio) == (True, True, 16.0)
    path = tmp_path / "c.yaml"
    path.write_text("use_rslora: true\nuse_dora: true\nloraplus_lr_ratio: 16\n")
    assert parse_config([str(path)]).lora == lora
    default = parse_config([]).lora
    assert (default.use_rslora, default.use_dora, default.loraplus_lr_ratio) == (False, False, None)


@pytest.mark.parametrize("ratio", [0.0, -2.0, float("nan"), float("inf")])
def test_a_ratio_that_is_not_positive_is_one_line(ratio: float):
    with pytest.raises(LorakitError, match="--loraplus_lr_ratio .* must be a positive number") as err:
        LoraSettings(loraplus_lr_ratio=ratio)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def peft_model(tiny_model: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return attach_lora(model, LoraSettings(lora_rank=4, lora_alpha=8, use_rslora=True), seed=0)


def test_rslora_scales_by_alpha_over_sqrt_rank_and_merge_reads_it(peft_model, tmp_path: Path):
    scalings = {m.scaling["default"] for m in peft_model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {8 / 2}  # alpha / sqrt(4); plain LoRA would be 8 / 4
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    assert lora_deltas(tmp_path)[1] == 4.0


def test_loraplus_puts_every_lora_b_and_nothing_else_in_the_ratio_group(peft_model):
    plain, (rest, b_group) = parameter_groups(peft_model, None), parameter_groups(peft_model, 16.0)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert len(plain) == 1 and len(plain[0]["params"]) == len(rest["params"]) + len(b_group["params"])
    assert b_group["lr_multiplier"] == 16.0 and rest["lr_multiplier"] == 1.0
    assert all(".lora_B." in names[id(p)] for p in b_group["params"])
    assert all(".lora_A." in names[id(p)] for p in rest["params"])
    assert len(b_group["params"]) == len(rest["params"]) > 0


def test_the_schedule_keeps_each_groups_ratio_at_every_step(peft_model):
    optimizer = torch.optim.AdamW(parameter_groups(peft_model, 16.0), lr=1.0)
    for lr in (1e-3, 5e-4, 0.0):
        set_learning_rate(_Engine(optimizer), lr)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, 16 * lr])


def test_a_variant_is_part_of_the_resume_fingerprint_and_absent_when_off(tmp_path: Path, tiny_model: Path):
    from lorakit.resume import run_fingerprint

    base = ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path)]
    plain = run_fingerprint(parse_config(base), "data", ["q_proj"])["lora"]
    assert set(plain) == {"r", "alpha", "dropout", "targets"}  # as checkpoints written before the variants have it
    for flags in (["--use_dora"], ["--use_rslora"], ["--loraplus_lr_ratio", "16"]):
        assert run_fingerprint(parse_config([*base, *flags]), "data", ["q_proj"])["lora"] != plain
