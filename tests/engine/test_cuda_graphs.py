"""--torch_compile_mode reduce-overhead: the compiled layers replayed as CUDA graphs train as the same layers
without them under ZeRO-2, and ZeRO-3 falls back to the mode without graphs, saying so.

The decision is a table on the CPU; the training is tests/cuda_graphs_driver.py on up to 2 GPUs (skipped in CI):

    PYTHONPATH=. python -m pytest -q tests/engine/test_cuda_graphs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import REPO, launch, torchrun
from lora_rows import lora_model, loss_and_grads

from lorakit.config import ModelConfig
from lorakit.engine.kernels import GRAPHS_BY_DEFAULT, settle_compile_mode
from lorakit.errors import LorakitError

# where graphs run: ZeRO-2, packed rows, a GPU, no checkpointing, bf16 with nothing offloaded (graphs_tested)
GPU_ZERO2 = {"zero3": False, "checkpointing": False, "packing": True, "on_gpu": True, "graphs_tested": True}
FALLBACK = "torch.compile: mode {mode}, not {requested} ("


@pytest.mark.parametrize(
    ("requested", "run", "mode", "said"),
    [
        (None, {}, "reduce-overhead", GRAPHS_BY_DEFAULT),  # the default where the GPU test below runs graphs
        (None, {"graphs_tested": False}, "default", None),  # not a run the GPU test trains (graphs_tested)
        (None, {"zero3": True}, "default", None),
        (None, {"checkpointing": True}, "default", None),
        (None, {"packing": False}, "default", None),
        (None, {"on_gpu": False}, "default", None),
        ("default", {}, "default", None),  # the way out of the default's graphs
        ("default", {"zero3": True, "checkpointing": True, "packing": False}, "default", None),  # nothing to rule out
        ("max-autotune-no-cudagraphs", {"on_gpu": False}, "max-autotune-no-cudagraphs", None),
        ("reduce-overhead", {}, "reduce-overhead", None),  # ZeRO-2, packed rows, a GPU: the GPU test below
        ("reduce-overhead", {"graphs_tested": False}, "reduce-overhead", None),  # asked for: any precision
        ("reduce-overhead", {"zero3": True}, "default", FALLBACK + "ZeRO-3"),
        ("reduce-overhead", {"checkpointing": True}, "default", FALLBACK + "gradient checkpointing"),
        ("reduce-overhead", {"packing": False}, "default", FALLBACK + "--packing false"),
        ("reduce-overhead", {"on_gpu": False}, "default", FALLBACK + "CUDA graphs need a CUDA GPU"),
        ("max-autotune", {"zero3": True}, "max-autotune-no-cudagraphs", FALLBACK + "ZeRO-3"),
    ],
)
def test_cuda_graphs_by_default_and_when_asked_only_under_zero2_with_packed_rows_on_a_gpu(requested, run, mode, said):
    settled, lines = settle_compile_mode(requested, **(GPU_ZERO2 | run))
    assert settled == mode
    if said is None:
        assert lines == []
    else:
        (line,) = lines
        assert line.startswith(said.format(mode=mode, requested=requested))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"torch_compile_mode": "fast"}, "--torch_compile_mode fast is unknown; use one of default, reduce-overhead"),
        ({"torch_compile_mode": "default", "torch_compile": False}, "with --torch_compile false"),
        ({"torch_compile_mode": "reduce-overhead", "quantization_bit": 4}, "drop --torch_compile_mode"),
    ],
)
def test_a_mode_that_cannot_apply_is_refused(flags, message):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(")):
        ModelConfig(**flags)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_data: Path) -> tuple[Path, str]:
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA GPU")
    workdir = tmp_path_factory.mktemp("graphs")
    script = str(REPO / "tests" / "cuda_graphs_driver.py")
    ranks = min(2, torch.cuda.device_count())
    output = launch([*torchrun(ranks), script, str(workdir), str(tiny_model), str(tiny_data)], workdir / "log")
    return workdir, output


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cuda_graphs_train_as_the_compiled_layers_without_them(trained: tuple[Path, str]):
    """ZeRO-2, same kernels, replayed: every step's loss and gradient norm and every evaluation as without the graphs,
    each step from the same weights (the driver's SameWeightsEachStep), over 12 steps of two micro-batches, where a
    gradient overwritten by a later replay would move a loss or a norm by far more than 1e-3 (the first try,
    without a new round of graphs at each forward, failed outright: an evaluation read a layer's output after a
    later replay overwrote it)."""
    workdir, output = trained
    graphs, plain = (_log(workdir / name / "trainer_log.jsonl") for name in ("zero2_graphs", "zero2_default"))
    assert len(graphs) == len(plain) >= 12
    steps = [(g, p) for g, p in zip(graphs, plain) if "loss" in p]
    assert len(steps) >= 12 and any("eval_loss" in p for p in plain)
    for ours, reference in zip(graphs, plain):
        assert ours.keys() == reference.keys()
        for key in ("loss", "eval_loss"):
            if key in reference:
                assert ours[key] == pytest.approx(reference[key], rel=1e-3), (key, ours.get("step"))
        if "grad_norm" in reference:
            assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-2), ours.get("step")
    assert len({round(p["loss"], 3) for _, p in steps}) > 6  # each step its own weights and rows: nothing constant
    metrics = json.loads((workdir / "metrics.json").read_text())
    # graphs were recorded (2 layers x forward and backward a row length, and the evaluation's forwards), and
    # inductor declined none; the runs without graphs recorded none
    assert metrics["zero2_graphs"]["graphs"] >= 4 and metrics["zero2_graphs"]["cudagraph_skips"] == 0
    assert metrics["zero2_default"]["graphs"] == metrics["zero3_graphs"]["graphs"] == 0
    assert "reduce-overhead: CUDA graphs, one per row length" in output
    print(f"CUDA graphs on {metrics['world_size']} GPU(s)")


@pytest.mark.parametrize("step", [2, 6])
def test_cuda_graphs_hand_over_every_lora_gradient_of_the_layers_without_them(trained: tuple[Path, str], step: int):
    """Every LoRA matrix's gradient of a step (both micro-batches), tensor by tensor, from the same weights: the
    graphs' replay against the compiled layers without graphs, within bf16's rounding (2e-2 of the tensor's norm).
    Step 2 is the first to replay graphs recorded in step 1; step 6 follows the evaluation at step 4, whose forwards
    recorded graphs of their own. The loss and norm test above averages over the tensors."""
    workdir, _ = trained
    graphs, plain = (torch.load(workdir / name / f"grads_step{step}.pt") for name in ("zero2_graphs", "zero2_default"))
    assert graphs.keys() == plain.keys() and len(plain) >= 4
    assert any(".lora_A." in name for name in plain) and any(".lora_B." in name for name in plain)
    for name, reference in plain.items():
        assert float(reference.norm()) > 0, name  # lora_B is non-zero (the driver wrote it), so lora_A's is too
        assert float((graphs[name] - reference).norm()) <= 2e-2 * float(reference.norm()), name


def test_zero3_asked_for_cuda_graphs_runs_the_layers_without_them(trained: tuple[Path, str]):
    """Under ZeRO-3 (lorakit.engine.kernels.settle_compile_mode says why) the request falls back, with a log line,
    and trains exactly as the default mode does (which gave the same numbers run after run, measured on H100s)."""
    workdir, output = trained
    assert "torch.compile: mode default, not reduce-overhead (ZeRO-3:" in output
    graphs, plain = (_log(workdir / name / "trainer_log.jsonl") for name in ("zero3_graphs", "zero3_default"))

    def numbers(log: list[dict]) -> list[dict]:  # not the timings
        return [{k: e[k] for k in ("step", "loss", "grad_norm", "eval_loss") if k in e} for e in log]

    assert numbers(graphs) == numbers(plain)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_each_replay_draws_its_own_lora_dropout_masks(tiny_model: Path, dropout: float):
    """LoRA dropout inside a replayed graph: each replay draws new masks (inductor's graph-safe random state), so the
    same row through the same weights gives another loss and other gradients at every replay; without dropout the
    replays give the same numbers (so a difference is the masks'). A graph that froze its first masks would train
    every later step on them. Replays only: the first calls warm up and record."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA GPU")
    from lorakit.engine.kernels import compile_decoder_layers

    torch._dynamo.reset()
    model = lora_model(tiny_model, torch.bfloat16, "cuda", dropout=dropout)
    compile_decoder_layers(model, mode="reduce-overhead")
    results = [loss_and_grads(model, [128, 128], "cuda") for _ in range(6)]  # the same row each time
    replays = results[3:]
    losses = [loss for loss, _ in replays]

    def same_grads(a: dict, b: dict) -> bool:
        return all(torch.equal(a[name], b[name]) for name in a)

    if dropout:
        assert len(set(losses)) == len(replays), losses
        assert not any(same_grads(a[1], b[1]) for a, b in zip(replays, replays[1:]))
    else:
        assert len(set(losses)) == 1, losses
        assert all(same_grads(grads, replays[0][1]) for _, grads in replays)
    from torch._inductor.cudagraph_trees import get_manager

    assert get_manager(torch.cuda.current_device(), create_if_none_exists=False) is not None  # graphs were made


@pytest.mark.parametrize(
    ("zero", "flags", "mode"),
    [
        ({}, {}, "reduce-overhead"),
        ({"offload_optimizer": {"device": "cpu"}}, {}, "default"),  # ZeRO-Offload's copies to the host: not tested
        ({"stage": 1}, {}, "default"),  # stages 0 and 1: DeepSpeed's other bf16 optimizer, not tested
        ({}, {"bf16": False}, "default"),  # fp32
        ({}, {"use_dora": True, "torch_compile": True}, "default"),  # compiled as asked, without graphs
        ({}, {"additional_target": ("lm_head",), "torch_compile": True}, "default"),
        ({}, {"use_rslora": True}, "reduce-overhead"),  # the same graph, another scale constant
    ],
)
def test_the_run_settles_graphs_from_its_settings(monkeypatch, tmp_path: Path, tiny_model: Path, zero, flags, mode):
    """compile_choice reads the resolved DeepSpeed file and the LoRA settings: CUDA graphs by default only in the
    runs the GPU test above trains (lorakit.engine.graphs_tested)."""
    from transformers import AutoConfig

    from lorakit.config import Config
    from lorakit.engine import compile_choice, plan_engine

    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, **zero}}))
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("d",), "output_dir": "o",
                               "bf16": True, "deepspeed": str(ds_file), **flags})  # fmt: skip
    plan = plan_engine(config, AutoConfig.from_pretrained(tiny_model), world_size=2, on_gpu=True)
    compiled, settled, lines = compile_choice(config, plan, on_gpu=True)
    assert compiled and settled == mode
    assert (GRAPHS_BY_DEFAULT in lines) == (mode == "reduce-overhead")
