"""The compile warm-up process builds the graph the run compiles (lorakit.engine.warmup): same code, same inputs.

Graphs are read through a recording dynamo backend: the warm-up's one-layer model (random weights, a small
vocabulary) against the real model loaded from its folder, as lorakit.engine.build_engine prepares it. Equal
graphs with equal inputs are what inductor's cache keys on, so the run's first compile reads the warm-up's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.config import LoraSettings
from lorakit.engine.kernels import compile_decoder_layers
from lorakit.engine.model import attach_lora, recompute_first_layers_only
from lorakit.engine.warmup import WarmupSpec, start_warmup, wait_for_warmup, warm_up
from lorakit.loss import model_loss_sum


def _recorder(graphs: list, row_tokens: int) -> object:
    """A dynamo backend that records each graph's code and its inputs (the row's length, symbolic in the code,
    written as L: the two paths train rows of different lengths)."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        inputs = [(["L" if n == row_tokens else n for n in t.shape], t.dtype, t.requires_grad)
                  for t in example_inputs if isinstance(t, torch.Tensor)]  # fmt: skip
        graphs.append((gm.code, inputs))
        return gm.forward

    return backend


def _spec(tiny_model: Path, settings: LoraSettings, checkpointed_layers: int | None = None) -> WarmupSpec:
    return WarmupSpec(str(tiny_model), False, "float32", dataclasses.asdict(settings), 3, checkpointed_layers, 96,
                      "cpu", "aot_eager")  # fmt: skip


def _real_graphs(tiny_model: Path, settings: LoraSettings, checkpointed_layers: int | None) -> list:
    graphs: list = []
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if checkpointed_layers is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recompute_first_layers_only(model, checkpointed_layers)
    model = attach_lora(model, settings, 3)
    model.train()
    compile_decoder_layers(model, backend=_recorder(graphs, 130))
    input_ids = torch.randint(3, model.config.vocab_size, (1, 130))
    position_ids = torch.cat([torch.arange(40), torch.arange(70), torch.arange(20)])[None]  # another length, 3 rows
    model_loss_sum(model, {"input_ids": input_ids, "position_ids": position_ids}, input_ids.clone()).backward()
    return graphs


LORA = LoraSettings(lora_rank=8, lora_alpha=16, lora_dropout=0.1, lora_target=("all",))
# Not DoRA: PEFT's DoRA layer breaks dynamo's graph into ~23 pieces a layer, and the pieces after a break see the
# row's length as a constant, so only the first length's run could reuse them (DoRA stays eager by default).


@pytest.mark.parametrize(
    "settings, checkpointed_layers",
    [
        (LORA, None),
        (dataclasses.replace(LORA, lora_target=("q_proj", "v_proj"), use_rslora=True), None),
        (LORA, 1),  # the memory plan's partial recomputation: a checkpointed layer and a plain one, two graphs
        (LORA, 2),  # every layer recomputed
    ],
    ids=["lora", "rslora-qv", "first-layer-recomputed", "all-recomputed"],
)
def test_the_warmup_compiles_the_graphs_the_run_compiles(tiny_model: Path, settings, checkpointed_layers):
    torch._dynamo.reset()
    real = _real_graphs(tiny_model, settings, checkpointed_layers)
    torch._dynamo.reset()
    warmed: list = []
    warm_up(dataclasses.replace(_spec(tiny_model, settings, checkpointed_layers), backend=_recorder(warmed, 96)))
    assert len(real) == (2 if checkpointed_layers == 1 else 1)
    assert sorted(map(str, warmed)) == sorted(map(str, real))


def test_the_warmup_process_runs_and_a_failed_one_is_named(tiny_model: Path, tmp_path: Path):
    (line,) = wait_for_warmup(start_warmup(_spec(tiny_model, LORA)))
    assert "compiled by a warm-up process" in line
    broken = dataclasses.replace(_spec(tiny_model, LORA), model_name_or_path=str(tmp_path / "missing"))
    (line,) = wait_for_warmup(start_warmup(broken))
    assert "the warm-up process failed (exit 1, log: " in line and "the first step compiles" in line
    log = Path(line.split("log: ")[1].split(")")[0])
    assert "missing" in log.read_text()
    assert wait_for_warmup(None) == []
