"""The memory plan: rows and gradient checkpointing from the model's shape and free GPU memory.

Cases are real cards against Qwen2.5-7B's shape in bf16; the estimate is checked against the peaks measured
on H200s on 2026-11-26 (benchmarks/RESULTS.md, torch 2.11.0, deepspeed 0.19.8, liger-kernel 0.8.5).
"""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.engine.memory import (
    HEADROOM,
    GiB,
    ModelShape,
    pass_tokens,
    plan_memory,
    resident_layer_bytes,
    row_candidates,
)

QWEN7B = ModelShape(layers=28, hidden=3584, intermediate=18944, vocab=152064, parameters=7_615_616_512, dtype_bytes=2)
QWEN32B = ModelShape(layers=64, hidden=5120, intermediate=27648, vocab=152064, parameters=32_763_876_352,
                     dtype_bytes=2)  # fmt: skip
H200, H100, A100_40 = 139 * GiB, 79 * GiB, 39 * GiB


@pytest.mark.parametrize(
    "free, zero3, pack_tokens, checkpointing, expected_rows, expected_checkpointing",
    [
        (H200, False, 0, None, 8192, False),  # a 141 GB card: rows of 8k, no recomputation
        (H200, True, 0, None, 8192, False),
        (H100, False, 0, None, 4096, False),  # 80 GB: rows of 4k (8k would need ~75 GiB)
        (H100, True, 0, None, 4096, False),
        (A100_40, False, 0, None, 16384, True),  # 40 GB: long rows only with checkpointing
        (A100_40, False, 0, False, 1024, False),  # ... or short rows without it, if asked
        (H100, False, 8192, None, 8192, True),  # rows fixed by the user: checkpointing only if they don't fit
        (H200, False, 8192, None, 8192, False),
        (H100, False, 0, True, 16384, True),  # checkpointing asked for: the longest rows that fit with it
        (H100, False, 0, False, 4096, False),
        (None, True, 0, None, 4096, False),  # the CPU: nothing planned
        (None, True, 2048, True, 2048, True),
    ],
)
def test_plan(free, zero3, pack_tokens, checkpointing, expected_rows, expected_checkpointing):
    plan = plan_memory(QWEN7B, free, zero3, 1, 1024, pack_tokens, checkpointing)
    assert (plan.pack_tokens, plan.gradient_checkpointing) == (expected_rows, expected_checkpointing)
    assert len(plan.lines) == (0 if free is None else 1)  # no warning in any of these cases


# (ZeRO-3, GPUs, tokens in the longest row, measured peak GiB): benchmarks/RESULTS.md, leases 6-8
MEASURED = [(False, 1, 1280, 25.2), (False, 1, 4096, 44.4), (True, 1, 1280, 30.7), (True, 1, 4096, 58.8),
            (True, 2, 1280, 22.8), (True, 2, 4096, 53.2), (True, 4, 2432, 34.2), (False, 2, 4864, 53.2),
            (False, 4, 2432, 33.6), (False, 2, 1280, 23.4)]  # fmt: skip


@pytest.mark.parametrize("zero3, gpus, tokens, measured", MEASURED)
def test_estimate_is_within_a_few_gib_of_every_measured_peak(zero3, gpus, tokens, measured):
    estimate = (QWEN7B.activation_bytes(tokens, False, zero3) + QWEN7B.fixed_bytes(zero3, gpus)) / GiB
    assert measured - 2 <= estimate <= measured + 3.5


# Qwen2.5-32B under ZeRO-3 on 4 H100s, compiled layers, lorakit's whole-layer units (DeepSpeed's memory-efficient
# linear off), a rank's largest pass 2,688 tokens: (layers recomputed, measured peak GiB), RESULTS.md session 13
MEASURED_32B = [(50, 38.5), (43, 42.0), (17, 71.2)]


@pytest.mark.parametrize("recomputed, measured", MEASURED_32B)
def test_estimate_without_deepspeeds_linear_bounds_the_measured_32b_peaks(recomputed, measured):
    estimate = (QWEN32B.activation_bytes(2688, True, True, recomputed, efficient_linear=False)
                + QWEN32B.fixed_bytes(True, 4, True, recomputed)) / GiB  # fmt: skip
    assert measured <= estimate <= measured + 8
    # with DeepSpeed's linear counted (what the plan assumed before session 13): up to 23 GiB over
    eager_linear = (QWEN32B.activation_bytes(2688, True, True, recomputed)
                    + QWEN32B.fixed_bytes(True, 4, True, recomputed)) / GiB  # fmt: skip
    assert eager_linear > estimate


def test_the_32b_plan_recomputes_fewer_layers_where_deepspeeds_linear_is_off():
    plans = [plan_memory(QWEN32B, 72 * GiB, True, 4, 1024, 0, None, step_tokens=2824, efficient_linear=linear)
             for linear in (True, False)]  # fmt: skip
    assert [p.checkpointed_layers for p in plans] == [43, 39]


def test_headroom_covers_the_worst_miss():
    # ZeRO-3 on 2 GPUs, one 4,864-token row: 66.8 GiB measured, 7 GiB over the estimate
    estimate = (QWEN7B.activation_bytes(4864, False, True) + QWEN7B.fixed_bytes(True, 2)) / GiB
    assert estimate < 66.8 <= estimate / HEADROOM


def test_packing_off_plans_checkpointing_for_the_largest_micro_batch():
    plan = plan_memory(QWEN7B, H100, False, 1, 1024, 0, None, batch_tokens=16 * 1024)
    assert plan.gradient_checkpointing and plan.pack_tokens == 0
    assert "micro-batches of 16,384 tokens" in plan.lines[0]


def test_nothing_fits_warns_instead_of_guessing():
    plan = plan_memory(QWEN7B, 16 * GiB, False, 1, 1024, 0, None)
    assert plan.gradient_checkpointing and plan.pack_tokens == 1024
    assert plan.lines[1].startswith("WARNING: the estimate exceeds 80% of free memory")


def test_row_candidates_never_go_below_the_cutoff():
    assert row_candidates(1024) == [16384, 8192, 4096, 2048, 1024]
    assert row_candidates(3000) == [16384, 8192, 4096, 3000]
    assert row_candidates(32768) == [32768]


class _TwoGpuRanks:
    """What plan_run_memory needs of DistInfo, on 'GPUs' whose free memory differs per rank."""

    device = __import__("torch").device("cuda", 0)
    world_size = 2

    def __init__(self, free_per_rank: list[float]):
        self.free_per_rank = free_per_rank

    def max(self, values: list[float]) -> list[float]:  # the collective: every rank's -free, element-wise max
        assert values == [-self.free_per_rank[0]]
        return [max(-free for free in self.free_per_rank)]


def test_every_rank_plans_from_the_smallest_free_memory(tiny_model, monkeypatch):
    import torch
    from transformers import AutoConfig

    from lorakit.config import Config
    from lorakit.engine import plan_engine, plan_run_memory

    # the tiny model in fp32: rank 0's 1 GiB would take rows of 16,384 tokens as they are; rank 1's 60 MiB fit rows
    # of 4,096 only with recomputation, and rank 1 decides for both
    free = [2**30, 60 * 2**20]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free[0]), 80 * GiB))
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("d",), "output_dir": "o",
                               "cutoff_len": 256})  # fmt: skip
    engine = plan_engine(config, AutoConfig.from_pretrained(tiny_model), world_size=2, on_gpu=True)
    planned, planned_engine, lines = plan_run_memory(config, _TwoGpuRanks(free), engine, 0, 1183)
    assert (planned.train.pack_tokens, planned.train.gradient_checkpointing) == (4096, True)
    assert planned_engine.mean_step_share == 1183  # kept for CUDA graphs' default (lorakit.engine.compile_choice)
    assert lines[0].startswith("memory plan: 0 GiB free on the smallest GPU; rows of 4,096 tokens, gradient ")
    assert planned.data == config.data and planned.lora == config.lora  # nothing else changes
    # the tiny model's weights are a sliver of 60 MiB: ZeRO-3 keeps them whole, and the engine plan says so
    zero = planned_engine.ds_config["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == engine.shape.parameters + 1 and "kept whole" in lines[-1]
    assert engine.ds_config["zero_optimization"]["stage3_param_persistence_threshold"] < engine.shape.parameters


def test_the_plan_counts_activations_by_whether_deepspeeds_linear_runs(tiny_model, monkeypatch):
    """lorakit's whole-layer units turn DeepSpeed's memory-efficient linear off: the plan is told, and counts
    ZERO3_ACTIVATIONS_TORCH_LINEAR instead of the 1.4 that linear costs."""
    import torch
    from transformers import AutoConfig

    import lorakit.engine
    from lorakit.config import Config
    from lorakit.engine import plan_engine, plan_run_memory

    told = []
    real_plan_memory = lorakit.engine.plan_memory
    monkeypatch.setattr(lorakit.engine, "plan_memory",
                        lambda *args, **kwargs: told.append(args[-1]) or real_plan_memory(*args, **kwargs))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * GiB))
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("d",), "output_dir": "o"})
    engine = plan_engine(config, AutoConfig.from_pretrained(tiny_model), world_size=2, on_gpu=True)
    assert engine.ds_config["zero_optimization"]["memory_efficient_linear"] is False
    plan_run_memory(config, _TwoGpuRanks([2**30, 2**30]), engine)
    assert told == [False]


@pytest.mark.parametrize(
    "shape, free, zero3, may_keep, expected",
    [
        (QWEN7B, H100, True, True, True),  # 14 GiB of weights on an 80 GB card: kept whole
        (QWEN7B, H100, True, False, False),  # the DeepSpeed file set its own threshold
        (QWEN7B, A100_40, True, True, False),  # over a quarter of a 40 GB card: partitioned
        (QWEN32B, H100, True, True, False),  # 61 GiB: partitioned
        (QWEN7B, H100, False, True, False),  # ZeRO-2 keeps every weight anyway
        (QWEN7B, None, True, True, False),  # the CPU: nothing planned
    ],
)
def test_frozen_weights_stay_whole_under_zero3_when_they_fit(shape, free, zero3, may_keep, expected):
    plan = plan_memory(shape, free, zero3, 4, 1024, 0, None, step_tokens=2300, may_keep_frozen=may_keep)
    assert plan.keep_frozen == expected
    if expected:  # the rows and checkpointing of the partitioned plan, never longer or riskier ones
        partitioned = plan_memory(shape, free, zero3, 4, 1024, 0, None, step_tokens=2300)
        assert (plan.pack_tokens, plan.gradient_checkpointing) == (partitioned.pack_tokens,
                                                                   partitioned.gradient_checkpointing)  # fmt: skip


def test_a_70b_model_under_zero3_plans_checkpointed_rows_not_a_false_alarm():
    llama70b = ModelShape(layers=80, hidden=8192, intermediate=28672, vocab=128256, parameters=70_553_706_496,
                          dtype_bytes=2)  # fmt: skip
    for gpus in (4, 8):  # 132 GiB of weights, partitioned: rows of 8,192 tokens with recomputation, no warning
        plan = plan_memory(llama70b, H100, True, gpus, 1024, 0, None)
        assert (plan.pack_tokens, plan.gradient_checkpointing, len(plan.lines)) == (8192, True, 1)
    assert plan_memory(llama70b, H100, False, 8, 1024, 0, None).lines[1].startswith("WARNING")  # ZeRO-2: no room


@pytest.mark.parametrize(
    "step_tokens, expected_rows, expected_recomputed",
    [
        (0, 16384, 62),  # share unknown: the longest rows (the 32B run planned this), nearly all recomputed
        # the reference batch on 4 GPUs: ~2,300 tokens a rank, one row of 4,096 holding 2,304 at most: the plan
        # sizes that pass, not the row (47 layers recomputed when it sized the row)
        (2300, 4096, 31),
        (5000, 8192, 51),  # a pass of 5,120 tokens in rows of 8,192
        (40000, 16384, 62),  # a share longer than any row: as without it
    ],
)
def test_rows_are_planned_from_a_ranks_share_of_a_step(step_tokens, expected_rows, expected_recomputed):
    plan = plan_memory(QWEN32B, H100, True, 4, 1024, 0, None, step_tokens=step_tokens)
    assert plan.pack_tokens == expected_rows and plan.gradient_checkpointing  # 32B activations need recompute here
    assert plan.checkpointed_layers == expected_recomputed
    assert f"gradient checkpointing on for {expected_recomputed} of 64 layers" in plan.lines[0]


@pytest.mark.parametrize("shape, free, gpus, step_tokens", [(QWEN32B, H100, 4, 2300), (QWEN32B, H100, 4, 5000),
                                                            (QWEN32B, A100_40, 8, 2300)])  # fmt: skip
def test_recomputation_covers_the_fewest_layers_that_fit(shape, free, gpus, step_tokens):
    """Every layer not recomputed saves a forward of it in backward: the plan recomputes the first k layers, k the
    fewest for which the estimate stays within HEADROOM of free memory (one fewer would not)."""
    plan = plan_memory(shape, free, True, gpus, 1024, 0, None, step_tokens=step_tokens)
    k, rows = plan.checkpointed_layers, plan.pack_tokens
    assert k is not None and 0 < k < shape.layers

    def needed(recomputed: int) -> float:
        tokens = pass_tokens(rows, step_tokens)
        return shape.activation_bytes(tokens, True, True, recomputed) + shape.fixed_bytes(True, gpus, True, recomputed)

    assert needed(k) <= HEADROOM * free < needed(k - 1)
    assert needed(k) > needed(shape.layers) + 1 * GiB  # fewer recomputed layers keep more activations
    asked = plan_memory(shape, free, True, gpus, 1024, 0, True, step_tokens=step_tokens)  # --gradient_checkpointing
    assert (asked.gradient_checkpointing, asked.checkpointed_layers) == (True, None)  # asked for: every layer


def test_qwen72b_on_four_h200s_plans_partitioned_checkpointed_rows_that_fit():
    """Issue 11's 72B case, by the plan (no 4-GPU machine was lent to run it): 145 GB of bf16 weights, partitioned
    over 4 H200s (too large to keep whole), the rows sized from a rank's share of the reference's 128-example step
    (~2,300 tokens on 4 GPUs; ~4,700 with 8 examples a GPU more), recomputation on, no warning; lorakit's whole-layer
    units (DeepSpeed's memory-efficient linear off)."""
    qwen72b = ModelShape(layers=80, hidden=8192, intermediate=29568, vocab=152064, parameters=72_706_203_648,
                         dtype_bytes=2)  # fmt: skip
    for step_tokens, rows, recomputed, peak in ((2300, 4096, 30, 111), (4700, 8192, 58, 110)):
        plan = plan_memory(qwen72b, H200, True, 4, 1024, 0, None, step_tokens=step_tokens, may_keep_frozen=True,
                           efficient_linear=False)  # fmt: skip
        assert (plan.pack_tokens, plan.gradient_checkpointing, plan.keep_frozen) == (rows, True, False)
        assert plan.checkpointed_layers == recomputed  # the fewest layers that fit (test above)
        assert len(plan.lines) == 1 and f"about {peak} GiB" in plan.lines[0]


@pytest.mark.parametrize(
    "rows, step_tokens, expected",
    [
        (4096, 0, 4096),  # the share unknown: a full row
        (4096, 2300, 2304),  # one pass holds the rank's whole share, padded to 128 tokens as on a GPU
        (4096, 2304, 2304),
        (4096, 9000, 4096),  # a share longer than a row: full rows
    ],
)
def test_a_pass_holds_a_row_or_a_ranks_share_whichever_is_shorter(rows, step_tokens, expected):
    assert pass_tokens(rows, step_tokens) == expected


def test_the_plan_sizes_activations_for_the_pass_not_the_row():
    """A 32B on 4 H100s at the reference batch: the share (2,304 tokens a pass) fits with far fewer layers recomputed
    than a filled row of 4,096 would need, and the log line says what a pass holds."""
    share = plan_memory(QWEN32B, H100, True, 4, 1024, 0, None, step_tokens=2300)
    filled = plan_memory(QWEN32B, H100, True, 4, 1024, 4096, None, step_tokens=0)  # rows fixed, share unknown
    assert share.pack_tokens == filled.pack_tokens == 4096
    assert share.checkpointed_layers < filled.checkpointed_layers - 10
    assert "a pass holds at most 2,304" in share.lines[0] and "a pass holds" not in filled.lines[0]


def test_padded_micro_batches_are_sized_as_they_are_not_by_a_packed_share():
    """Packing off: a pass is micro-batch x longest row, padded; a packed share (were one passed) says nothing of it."""
    padded = plan_memory(QWEN32B, H100, True, 4, 1024, 0, None, batch_tokens=4096)
    with_share = plan_memory(QWEN32B, H100, True, 4, 1024, 0, None, batch_tokens=4096, step_tokens=2300)
    assert with_share.checkpointed_layers == padded.checkpointed_layers and with_share.lines == padded.lines


QWEN32B_LAYERED = dataclasses.replace(QWEN32B, largest_layer=487_605_248)  # a decoder layer's weights


@pytest.mark.parametrize(
    "free, may_keep, quantized, expected",
    [
        (H200, True, 0, 8),  # no recomputation; the plan's ~7 GiB left keeps the first 8 layers whole (0.91 GiB each)
        (H100, True, 0, 0),  # recomputation (34 layers) takes the room
        (H200, False, 0, 0),  # the DeepSpeed file's own persistence threshold: not lorakit's to choose
        (H200, True, 31_000_000_000, 0),  # QLoRA's packed weights: their own in-flight rule
    ],
)
def test_room_the_plan_leaves_keeps_the_first_layers_whole(free, may_keep, quantized, expected):
    shape = dataclasses.replace(QWEN32B_LAYERED, quantized=quantized, quantized_bytes=0.52 if quantized else 0.0)
    plan = plan_memory(shape, free, True, 4, 1024, 0, None, step_tokens=2824, may_keep_frozen=may_keep,
                       efficient_linear=False)  # fmt: skip
    assert plan.resident_layers == expected
    assert any(f"first {expected} of 64 decoder layers" in line for line in plan.lines) == bool(expected)
    if expected:  # the kept layers fit the plan's budget with the rows and activations planned
        planned = (shape.activation_bytes(2944, False, True, 0, efficient_linear=False) + shape.fixed_bytes(True, 4)
                   + expected * resident_layer_bytes(shape))  # fmt: skip
        assert planned <= HEADROOM * free < planned + resident_layer_bytes(shape)
        assert resident_layer_bytes(shape) == 2 * 487_605_248  # the whole bf16 layer: its partition stays beside it


@pytest.mark.parametrize(
    "free, stay, expected",
    [
        (74 * GiB, True, True),  # the reference 7B on H100s (weights kept whole): eager steps beside the warm-up
        (74 * GiB, False, False),  # ZeRO-3 releasing gathered weights: eager layers would hold them
        (50 * GiB, True, False),  # the same rows planned near the memory's end: no room for eager's extra
        (None, True, True),  # the CPU plans nothing (and runs no warm-up)
    ],
)
def test_eager_steps_beside_the_warmup_only_where_the_plan_leaves_room(free, stay, expected):
    """lorakit.train.eager_while_compiling reads the plan's estimated peak over the free memory (here the
    reference 7B's plan: 4 GPUs, a rank's share 2,944 tokens a step, the weights kept whole)."""
    from types import SimpleNamespace

    from lorakit.engine import BuiltEngine
    from lorakit.train import EAGER_PEAK_SHARE, eager_while_compiling

    plan = plan_memory(QWEN7B, free, True, 4, 1024, 0, None, step_tokens=2944, may_keep_frozen=True)
    if free is not None:
        estimate = float(plan.lines[0].split("about ")[1].split(" GiB")[0]) * GiB
        assert plan.peak_share == pytest.approx(estimate / free, abs=0.5 * GiB / free)
    built = BuiltEngine(None, {}, [], 0, 0, None, stay)
    assert eager_while_compiling(built, SimpleNamespace(peak_share=plan.peak_share)) == expected
    assert (plan.peak_share <= EAGER_PEAK_SHARE) == (free != 50 * GiB)
