"""The ZeRO-3 machinery lorakit adds around DeepSpeed, on 2 gloo ranks: the driver run's (tests/conftest.py
`driver_run`, tests/multirank_driver.py) ZeRO-3 variants against its plain `wide` run: the same updates, and the
gathers, memory and hooks each change is for (lorakit.engine.zero3, lorakit.engine.deepspeed_config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_multirank import read_log

pytestmark = pytest.mark.multirank


def assert_same_updates(driver_run: Path, run: str, reference: str, within: float = 0.0) -> None:
    """`run` logged the loss and gradient norm of `reference` at each of the 12 steps: exactly, or within `within`
    (the loss absolutely, the gradient norm relatively)."""
    logs = [read_log(driver_run / name / "trainer_log.jsonl") for name in (run, reference)]
    assert len(logs[0]) == len(logs[1]) == 12
    for a, b in zip(*logs):
        if within:
            assert a["loss"] == pytest.approx(b["loss"], abs=within)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=within)
        else:
            assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])


def test_zero3_with_the_frozen_weights_kept_whole_trains_as_partitioned_zero3_does(driver_run: Path):
    """What the memory plan chooses when the weights fit: the same updates, and no gather of a frozen weight."""
    assert_same_updates(driver_run, "resident", "wide", within=1e-5)
    metrics = json.loads((driver_run / "metrics.json").read_text())
    # partitioned, every frozen weight is gathered at least once a step (the next layer's gather coalesced with
    # another's where DeepSpeed prefetches, so the collectives are fewer than the units)
    assert metrics["wide"]["elements_gathered_a_step"] >= metrics["wide"]["frozen_elements"]
    assert metrics["wide"]["all_gathers"] > metrics["resident"]["all_gathers"]
    # after the first step only the adapter is gathered (DeepSpeed's own way released every resident weight at
    # each optimizer step and gathered the whole frozen model again: 129 k elements a step here, 8 k now)
    resident_run = metrics["resident"]
    assert resident_run["elements_gathered_a_step"] < resident_run["frozen_elements"] / 4, resident_run
    # every weight resident: ZeRO-3's per-unit fetch/release hooks are off (lorakit.engine.zero3), the same updates
    assert resident_run["unit_hooks"] == 0 and metrics["compiled"]["unit_hooks"] == 0
    assert metrics["wide"]["unit_hooks"] > 0 and metrics["zero2"]["unit_hooks"] is None
    # the adapter stays at one address (what CUDA graphs replay on) through every step and the compiled run's saves,
    # which release it (DeepSpeed's gather alone puts it in new memory: tests/engine/test_zero3.py)
    assert resident_run["adapter_moved"] == 0 and metrics["compiled"]["adapter_moved"] == 0
    assert metrics["wide"]["adapter_moved"] == 0
    # nor is it released at each step: its gathered copy is brought up to date in place, one all-gather of
    # DeepSpeed's flat partition buffer (lorakit.engine.zero3.refresh_in_place); the compiled run's saves release it
    assert resident_run["adapter_releases_after_step_1"] == 0, resident_run
    assert metrics["compiled"]["adapter_releases_after_step_1"] > 0


def test_a_layer_kept_whole_is_not_gathered_again_and_trains_as_partitioned(driver_run: Path):
    """lorakit.engine.zero3.keep_first_layers_whole: the same updates as `wide`, and the first layer's frozen
    weights (partitioned in `wide`) gathered once for the run instead of at every step."""
    assert_same_updates(driver_run, "first_resident", "wide", within=1e-5)
    metrics = json.loads((driver_run / "metrics.json").read_text())
    wide, kept = metrics["wide"], metrics["first_resident"]
    assert wide["layer0_partitioned"] > 0 and kept["layer0_partitioned"] == 0
    saved = wide["elements_gathered_a_step"] - kept["elements_gathered_a_step"]
    # at least once a step: this small model's layer stays gathered from its forward to its backward (within the
    # file's stage3_max_reuse_distance); a 32B layer is gathered for each (RESULTS.md session 13: 130 a step)
    assert saved >= wide["layer0_partitioned"], (saved, wide["layer0_partitioned"])
    assert kept["all_gathers"] < wide["all_gathers"] and kept["unit_hooks"] > 0  # layer 1 still gathered


def test_layers_fetched_by_all_reduce_train_exactly_as_by_all_gather(driver_run: Path):
    """lorakit.engine.deepspeed_config.fetch_layers_by_all_reduce (the default, in `wide`): each element is one
    rank's value plus zeros, so every loss and gradient norm equals DeepSpeed's all-gather fetch (`gathered`)."""
    assert_same_updates(driver_run, "wide", "gathered")
    metrics = json.loads((driver_run / "metrics.json").read_text())
    assert metrics["wide"]["all_gathers"] == metrics["gathered"]["all_gathers"]  # the same fetches, another collective
    assert metrics["wide"]["all_reduce_fetches"] > 0 and metrics["gathered"]["all_reduce_fetches"] == 0


def test_adapter_gradients_reduced_without_the_bucket_copies_train_exactly_as_with_them(driver_run: Path):
    """lorakit.engine.deepspeed_config.reduce_adapter_gradients_in_place (the default, in `wide`): stage 3
    reduce-scatters the same per-parameter gradients either way, so every loss and gradient norm equals the run
    with the file's contiguous_gradients (`contiguous`)."""
    assert_same_updates(driver_run, "wide", "contiguous")
    metrics = json.loads((driver_run / "metrics.json").read_text())
    assert metrics["wide"]["contiguous_gradients"] is False and metrics["contiguous"]["contiguous_gradients"] is True


def test_an_adapter_a_save_released_comes_back_without_its_layers_memory(driver_run: Path):
    """lorakit.engine.zero3.gather_released_residents_before_forward: after each save (which releases the adapter),
    the LoRA matrices keep no more memory alive than the resident weights' own (fetched again with their layer by
    the all-reduce fetch, each would be a view of the layer's whole buffer: every layer kept gathered); the same
    updates as `wide`."""
    assert_same_updates(driver_run, "saving", "wide")
    metrics = json.loads((driver_run / "metrics.json").read_text())["saving"]
    assert 0 < metrics["adapter_storage_bytes"] <= metrics["resident_bytes"], metrics


def test_zero3_regathers_the_updated_adapter_in_one_collective(driver_run: Path):
    metrics = json.loads((driver_run / "metrics.json").read_text())
    per_step = metrics["wide"]["all_gathers"] / 12
    # 2 decoder layers x (forward + backward) and the embedding/head gathers; DeepSpeed alone adds one all-gather
    # per LoRA matrix after every step: 2 layers x 7 projections x (A, B) = 28 more (49 a step, measured)
    assert per_step < 28, per_step
    assert metrics["zero2"]["all_gathers"] < metrics["wide"]["all_gathers"]


def test_each_decoder_layer_is_gathered_while_the_one_before_computes(driver_run: Path):
    """lorakit.engine.deepspeed_config.gather_next_layer_ahead: with the frozen weights partitioned, every weight a
    layer needs after the first step (which records DeepSpeed's trace) was gathered ahead, none only when the layer
    asked for it (with HF's prefetch bucket, a tenth of this model's layer, a third of the weights were fetched
    then: 450,560 of 1,327,744 in `wide`; recomputed layers included)."""
    metrics = json.loads((driver_run / "metrics.json").read_text())
    for name in ("wide", "deep", "checkpointed"):
        fetched = metrics[name]["fetched_after_step_1"]
        assert fetched["on_demand"] == 0 and fetched["prefetched"] > 0, (name, fetched)


def test_frozen_linears_let_zero3_free_each_released_weight_during_the_forward(driver_run: Path):
    """lorakit.engine.frozen_linear: torch's eager linear saves a view of each gathered frozen weight for the
    backward, so ZeRO-3's release frees nothing and the whole gathered model is alive when the forward ends (on 4 x
    H200 the 32B ran out of memory so); saving the weight itself frees it, with the same updates."""
    assert_same_updates(driver_run, "wide", "view_saving")
    metrics = json.loads((driver_run / "metrics.json").read_text())
    frozen = metrics["wide"]["frozen_weight_bytes"]  # the embedding's too, which autograd never saves
    held = {run: metrics[run]["held_after_forward"] for run in ("wide", "view_saving")}  # the first step's forward
    assert held["view_saving"] > 0.5 * frozen and held["wide"] == 0, (held, frozen)
