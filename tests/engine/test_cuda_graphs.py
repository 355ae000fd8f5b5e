"""CUDA graphs (--torch_compile_mode reduce-overhead, the default where tested): the compiled layers replayed as
graphs train as the same layers without them under ZeRO-2 and under ZeRO-3 keeping every weight whole; where ZeRO-3
partitions weights, a request falls back to the mode without graphs, saying so.

The decision is a table on the CPU; the training is tests/cuda_graphs_driver.py on up to 2 GPUs (skipped in CI):

    PYTHONPATH=. python -m pytest -q tests/engine/test_cuda_graphs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO, launch, run, torchrun
from lora_rows import lora_model, loss_and_grads

from lorakit.config import ModelConfig
from lorakit.engine.kernels import GRAPHS_BY_DEFAULT, settle_compile_mode
from lorakit.errors import LorakitError

# where graphs run: ZeRO-2 (or ZeRO-3 with every weight whole), packed rows, a GPU, no checkpointing, bf16 with
# nothing offloaded (graphs_by_default)
GPU_ZERO2 = {
    "zero3_partitioned": False,
    "checkpointing": False,
    "packing": True,
    "on_gpu": True,
    "graphs_by_default": True,
}
FALLBACK = "torch.compile: mode {mode}, not {requested} ("
ASKED = {"torch_compile_mode": "reduce-overhead"}
PARTITIONED = "ZeRO-3 offloads the parameters (offload_param)"  # one of deepspeed_config.zero3_partitions' reasons


@pytest.mark.parametrize(
    ("requested", "run", "mode", "said"),
    [
        (None, {}, "reduce-overhead", GRAPHS_BY_DEFAULT),  # the default where the GPU test below runs graphs
        (None, {"graphs_by_default": False}, "default", None),  # not a run the GPU test trains, or ZeRO-3
        (None, {"peak_share": 0.5}, "reduce-overhead", GRAPHS_BY_DEFAULT),  # room for the graphs' own pool
        (None, {"pass_tokens": 1183}, "reduce-overhead", GRAPHS_BY_DEFAULT),  # the reference per-GPU batch
        (None, {"pass_tokens": 2048}, "reduce-overhead", GRAPHS_BY_DEFAULT),  # GRAPHS_MAX_PASS_TOKENS
        (
            None,
            {"pass_tokens": 2307},
            "default",
            "torch.compile: mode default, without CUDA graphs: a rank's forward pass holds ~2,307 tokens on average",
        ),  # 128 examples a step on 4 GPUs: the whole job lost 6.5 s to them (session 19)
        (
            None,
            {"pass_tokens": 4600, "peak_share": 0.72},
            "default",
            "torch.compile: mode default, without CUDA graphs: a rank's forward pass holds ~4,600",
        ),  # one line, the first reason
        ("reduce-overhead", {"pass_tokens": 4600}, "reduce-overhead", None),  # asked for: obeyed
        (
            None,
            {"peak_share": 0.72},
            "default",
            "torch.compile: mode default, without CUDA graphs: the memory plan's peak is 72% of the free memory",
        ),  # measured out of memory with graphs (GRAPHS_PEAK_SHARE)
        (
            "reduce-overhead",
            {"peak_share": 0.72},
            "reduce-overhead",
            "torch.compile: CUDA graphs as asked, though the memory plan's peak is 72%",
        ),  # asked for: obeyed, saying what it risks
        (None, {"zero3_partitioned": PARTITIONED}, "default", None),
        (None, {"checkpointing": True}, "default", None),
        (None, {"packing": False}, "default", None),
        (None, {"on_gpu": False}, "default", None),
        ("default", {}, "default", None),  # the way out of the default's graphs
        (
            "default",
            {"zero3_partitioned": PARTITIONED, "checkpointing": True, "packing": False},
            "default",
            None,
        ),  # nothing to rule out
        ("max-autotune-no-cudagraphs", {"on_gpu": False}, "max-autotune-no-cudagraphs", None),
        ("reduce-overhead", {}, "reduce-overhead", None),  # ZeRO-2, packed rows, a GPU: the GPU test below
        ("reduce-overhead", {"graphs_by_default": False}, "reduce-overhead", None),  # asked for: any precision
        (
            "reduce-overhead",
            {"zero3_partitioned": PARTITIONED},
            "default",
            FALLBACK + PARTITIONED + ": a partitioned weight is gathered",
        ),
        ("reduce-overhead", {"checkpointing": True}, "default", FALLBACK + "gradient checkpointing"),
        ("reduce-overhead", {"packing": False}, "default", FALLBACK + "--packing false"),
        ("reduce-overhead", {"on_gpu": False}, "default", FALLBACK + "CUDA graphs need a CUDA GPU"),
        ("max-autotune", {"zero3_partitioned": PARTITIONED}, "max-autotune-no-cudagraphs", FALLBACK + "ZeRO-3"),
    ],
)
def test_cuda_graphs_by_default_and_when_asked_only_with_weights_in_place_and_packed_rows_on_a_gpu(
    requested, run, mode, said
):
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


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_cuda_graphs_train_as_the_compiled_layers_without_them(trained: tuple[Path, str], stage: str):
    """Same kernels, replayed: every step's loss and gradient norm and every evaluation as without the graphs, each
    step from the same weights (the driver's SameWeightsEachStep), over 12 steps of two micro-batches, where a
    gradient overwritten by a later replay would move a loss or a norm by far more than 1e-3 (the first try,
    without a new round of graphs at each forward, failed outright: an evaluation read a layer's output after a
    later replay overwrote it). Under ZeRO-3 every weight stays whole (the tiny model fits), checkpoints are saved
    every 5 steps (their gather and release of the adapter), and stage 3 reduces on the compute stream."""
    workdir, output = trained
    graphs, plain = (_log(workdir / f"{stage}_{mode}" / "trainer_log.jsonl") for mode in ("graphs", "default"))
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
    assert metrics[f"{stage}_graphs"]["graphs"] >= 4 and metrics[f"{stage}_graphs"]["cudagraph_skips"] == 0
    assert metrics[f"{stage}_default"]["graphs"] == 0
    assert "reduce-overhead: CUDA graphs, one per row length" in output
    assert "steps ran the layers eager" not in output  # no warm-up beside these runs: every step compiled
    if stage == "zero3":
        assert "ZeRO-3: every weight stays gathered between steps" in output
        assert "ZeRO-3 with CUDA graphs: overlap_comm -> false" in output
        assert "not reduce-overhead" not in output  # no fallback
    print(f"CUDA graphs under {stage} on {metrics['world_size']} GPU(s)")


@pytest.mark.parametrize(("stage", "step"), [("zero2", 2), ("zero2", 6), ("zero3", 2), ("zero3", 6)])
def test_cuda_graphs_hand_over_every_lora_gradient_of_the_layers_without_them(
    trained: tuple[Path, str], stage: str, step: int
):
    """Every LoRA matrix's gradient of a step (both micro-batches), tensor by tensor, from the same weights: the
    graphs' replay against the compiled layers without graphs, within bf16's rounding (2e-2 of the tensor's norm).
    Step 2 is the first to replay graphs recorded in step 1; step 6 follows the evaluation at step 4, whose forwards
    recorded graphs of their own (and, under ZeRO-3, the checkpoint of step 5). The loss and norm test above averages
    over the tensors."""
    workdir, _ = trained
    graphs, plain = (torch.load(workdir / f"{stage}_{mode}" / f"grads_step{step}.pt") for mode in ("graphs", "default"))
    assert graphs.keys() == plain.keys() and len(plain) >= 4
    assert any(".lora_A." in name for name in plain) and any(".lora_B." in name for name in plain)
    for name, reference in plain.items():
        assert float(reference.norm()) > 0, name  # lora_B is non-zero (the driver wrote it), so lora_A's is too
        assert float((graphs[name] - reference).norm()) <= 2e-2 * float(reference.norm()), name


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
        ({"stage": 3}, {}, "default"),  # ZeRO-3, the frozen weights partitioned (the memory plan may keep them whole)
        ({"stage": 3, "stage3_param_persistence_threshold": 10**12}, {}, "reduce-overhead"),  # every weight whole
        ({"stage": 3, "stage3_param_persistence_threshold": 10**12}, {"torch_compile_mode": "default"}, "default"),
        ({"stage": 3, "stage3_param_persistence_threshold": 10**12}, ASKED, "reduce-overhead"),  # every weight whole
        (
            {"stage": 3, "stage3_param_persistence_threshold": 10**12, "stage3_model_persistence_threshold": 10**4},
            ASKED,
            "default",
        ),  # the model-wide cap partitions the rest
        (
            {"stage": 3, "stage3_param_persistence_threshold": 10**12, "offload_param": {"device": "cpu"}},
            ASKED,
            "default",
        ),
    ],
)
def test_the_run_settles_graphs_from_its_settings(monkeypatch, tmp_path: Path, tiny_model: Path, zero, flags, mode):
    """compile_choice reads the resolved DeepSpeed file and the LoRA settings: CUDA graphs by default only in the
    runs the GPU test above trains (lorakit.engine.graphs_by_default), under ZeRO-2 and under ZeRO-3 where every
    weight stays whole (lorakit.engine.deepspeed_config.zero3_partitions)."""
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    settled, lines = _settled_mode(tmp_path, tiny_model, zero, flags)
    assert settled == mode
    assert (GRAPHS_BY_DEFAULT in lines) == (mode == "reduce-overhead" and "torch_compile_mode" not in flags)


def _settled_mode(tmp_path: Path, tiny_model: Path, zero: dict, flags: dict, peak_share: float = 0.0,
                  mean_share: int = 0):  # fmt: skip
    """compile_choice's mode and lines for the tiny model on 2 GPUs, the DeepSpeed file's ZeRO section `zero` (over
    stage 2), the flags, a memory plan's peak share and a rank's mean tokens a step."""
    import dataclasses

    from transformers import AutoConfig

    from lorakit.config import Config
    from lorakit.engine import compile_choice, plan_engine

    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, **zero}}))
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("d",), "output_dir": "o",
                               "bf16": True, "deepspeed": str(ds_file), **flags})  # fmt: skip
    plan = plan_engine(config, AutoConfig.from_pretrained(tiny_model), world_size=2, on_gpu=True)
    plan = dataclasses.replace(plan, peak_share=peak_share, mean_step_share=mean_share)
    compiled, settled, lines = compile_choice(config, plan, on_gpu=True)
    assert compiled
    return settled, lines


@pytest.mark.parametrize(
    ("mean_share", "pack_tokens", "mode"),
    [
        (1183, 4096, "reduce-overhead"),  # the reference per-GPU batch on 2 GPUs
        (2307, 4096, "default"),  # 128 examples a step on 4 GPUs
        (4614, 4096, "default"),  # 128 on 2: two passes of ~2,307
        (4614, 2048, "reduce-overhead"),  # three passes of ~1,538 tokens: each pass launch-bound
        (0, 4096, "reduce-overhead"),  # unknown (no packing plan): the other rules decide
    ],
)
def test_a_rank_s_mean_pass_decides_the_default_graphs(monkeypatch, tmp_path, tiny_model, mean_share, pack_tokens,
                                                       mode):  # fmt: skip
    """The plan's mean share of a step (EnginePlan.mean_step_share, set by plan_run_memory from the data), in rows of
    at most --pack_tokens, reaches settle_compile_mode as a pass's mean tokens, under ZeRO-2 and ZeRO-3 alike."""
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    for zero in ({}, {"stage": 3, "stage3_param_persistence_threshold": 10**12}):
        flags = {"pack_tokens": pack_tokens}
        settled, lines = _settled_mode(tmp_path, tiny_model, zero, flags, mean_share=mean_share)
        assert settled == mode, zero
        assert any("a rank's forward pass holds" in line for line in lines) == (mode == "default")


@pytest.mark.parametrize(("peak_share", "flags", "mode"), [(0.49, {}, "reduce-overhead"), (0.72, {}, "default"),
                                                          (0.72, ASKED, "reduce-overhead")])  # fmt: skip
def test_the_memory_plan_s_peak_decides_zero2_s_default_graphs(monkeypatch, tmp_path, tiny_model, peak_share, flags,
                                                               mode):  # fmt: skip
    """The memory plan's peak (EnginePlan.peak_share, set by plan_run_memory) reaches settle_compile_mode: above
    GRAPHS_PEAK_SHARE ZeRO-2 runs without graphs by default, saying so; asked for, they run."""
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    settled, lines = _settled_mode(tmp_path, tiny_model, {}, flags, peak_share)
    assert settled == mode
    assert any("without CUDA graphs: the memory plan's peak is 72%" in line for line in lines) == (mode == "default")


@pytest.mark.parametrize(
    ("mode", "stay", "settled"),
    [
        ("reduce-overhead", True, "reduce-overhead"),
        ("reduce-overhead", False, "default"),  # zero3_partitions' forecast missed: no graphs
        ("max-autotune", False, "max-autotune-no-cudagraphs"),
        ("default", False, "default"),
        ("max-autotune-no-cudagraphs", False, "max-autotune-no-cudagraphs"),
    ],
)
def test_graphs_are_dropped_where_zero3_left_weights_partitioned_after_all(mode, stay, settled):
    from lorakit.engine import graphs_only_if_weights_stay

    result, lines = graphs_only_if_weights_stay(mode, stay)
    assert result == settled
    assert (lines != []) == (settled != mode)
    assert all(f"mode {settled}, not {mode} (ZeRO-3 left some weights partitioned" in line for line in lines)


_BUILD_WITH_GRAPHS = """
import json, sys
import lorakit, lorakit.engine as engine
from lorakit.distributed import init_distributed

modes = []
# the GPU's choice, on the CPU: compiled layers with CUDA graphs (compile_decoder_layers records the mode it gets)
engine.compile_choice = lambda config, plan, on_gpu: (True, "reduce-overhead", [])
engine.compile_decoder_layers = lambda model, backend="inductor", mode="default": modes.append(mode) or []
dist = init_distributed()
for name, ds_file in zip(("partitioned", "whole"), sys.argv[2:]):
    flags = {"model_name_or_path": sys.argv[1], "template": "qwen", "output_dir": "o", "lora_rank": 4,
             "deepspeed": ds_file}
    built = engine.build_engine(lorakit.Config.from_flat(flags), dist)
    print("BUILT", json.dumps({"name": name, "mode": modes[-1], "stay": built.weights_stay_gathered,
                               "file_overlap": built.ds_config["zero_optimization"]["overlap_comm"],
                               "engine_overlap": bool(built.engine.zero_overlap_comm()), "notes": built.notes}))
"""


def test_zero3_builds_graphs_only_on_weights_that_stay_and_reduces_on_the_compute_stream(tmp_path, tiny_model):
    """build_engine's wiring around the graphs, on one CPU rank (compile_choice made to choose graphs, as on a GPU):
    the DeepSpeed config the engine is built from has `overlap_comm` off, and where ZeRO-3 left weights partitioned
    after all (the engine says so), the layers are compiled without graphs, saying so; where every weight stays
    whole, with them."""
    files = []
    for name, threshold in (("partitioned", 1000), ("whole", 10**12)):
        ds = {"zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_param_persistence_threshold": threshold}}
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(ds))
    done = run([sys.executable, "-c", _BUILD_WITH_GRAPHS, str(tiny_model), *map(str, files)], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    built = {b["name"]: b for b in (json.loads(line[6:]) for line in done.stdout.splitlines() if line[:6] == "BUILT ")}
    assert built["whole"]["stay"] and built["whole"]["mode"] == "reduce-overhead"
    assert not built["partitioned"]["stay"] and built["partitioned"]["mode"] == "default"
    assert any("not reduce-overhead (ZeRO-3 left some weights partitioned" in n for n in built["partitioned"]["notes"])
    assert not any("not reduce-overhead" in n for n in built["whole"]["notes"])
    for one in built.values():  # the engine built from the changed config
        assert one["file_overlap"] is False and one["engine_overlap"] is False
        assert any(n.startswith("ZeRO-3 with CUDA graphs: overlap_comm -> false") for n in one["notes"])
