"""lorakit from research code, end to end on 2 gloo ranks under ZeRO-3 (one launch: tests/research_driver.py):
data from Python, hooks on every step and evaluation, a stop asked by one rank, generation mid-training, and the
example examples/research_inmemory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
from launch import REPO, launch, torchrun
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.engine import load_tokenizer
from lorakit.generation import generate_reply
from lorakit.templates import Message, get_template

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def research_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    workdir = tmp_path_factory.mktemp("research")
    persona_model = tiny.make_model(workdir / "persona_model", initializer_range=0.3)
    command = [*torchrun(2), str(REPO / "tests" / "research_driver.py"), str(workdir), str(tiny_model),
               str(REPO / "examples" / "ds_config_zero3.json"), str(persona_model)]  # fmt: skip
    launch(command, workdir / "driver.log")
    return workdir


def _ranks(workdir: Path) -> list[dict]:
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(2)]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_on_step_sees_what_the_log_shows_and_one_ranks_stop_ends_every_rank_as_a_finished_run(research_run: Path):
    ranks, log = _ranks(research_run), _log(research_run / "plain" / "trainer_log.jsonl")
    train_lines, eval_lines = [r for r in log if "loss" in r], [r for r in log if "eval_loss" in r]
    for seen in ranks:
        steps = seen["plain"]["steps"]
        assert [s[0] for s in steps] == [1, 2, 3, 4]  # rank 1 asked at step 4, which logs: read at once
        assert {s[1] for s in steps} == {12}  # 48 examples, global batch 8, 2 epochs: the step math of files
        for (step, _, epoch, loss, grad_norm, lr, tokens_per_second), line in zip(steps, train_lines):
            logged = (line["step"], line["loss"], line["grad_norm"], line["learning_rate"])
            assert (step, round(loss, 4), round(grad_norm, 4), lr) == logged
            assert epoch == pytest.approx(step / 6) and tokens_per_second > 0
        evals = seen["plain"]["evals"]
        assert [e[0] for e in evals] == [3, 4]  # --eval_steps 3, and the stop evaluates as a last step does
        assert [round(e[1], 4) for e in evals] == [r["eval_loss"] for r in eval_lines]
    assert [e[2] for e in ranks[0]["plain"]["evals"]] == [e[2] for e in ranks[1]["plain"]["evals"]]
    assert [s[3] for s in ranks[0]["plain"]["steps"]] == [s[3] for s in ranks[1]["plain"]["steps"]]
    assert len(train_lines) == 4 and (research_run / "plain" / "checkpoint-4").is_dir()
    assert (research_run / "plain" / "adapter_model.safetensors").is_file()
    assert json.loads((research_run / "plain" / "train_results.json").read_text())["epoch"] == pytest.approx(0.67)
    assert "stopped at step 4: a hook asked to" in (research_run / "driver.log").read_text()


def test_the_loops_collector_passes_skip_the_set_up_and_the_process_gets_it_back(research_run: Path):
    for seen in _ranks(research_run):
        frozen = seen["plain"]["frozen"]
        assert len(frozen) == 4 and min(frozen) > 10_000, frozen  # the model, DeepSpeed's and torch's objects
        assert seen["plain"]["frozen_after"] == 0


def test_training_after_a_generation_continues_exactly_as_without_it(research_run: Path):
    ranks = _ranks(research_run)
    plain, generating = ranks[0]["plain"]["steps"], ranks[0]["generating"]["steps"]
    assert [s[0] for s in generating] == [1, 2, 3, 4]  # rank 1's on_eval asked at step 3; read with step 4's flags
    assert (research_run / "generating" / "checkpoint-4").is_dir()
    assert [s[3:5] for s in plain] == [s[3:5] for s in generating]  # losses and gradient norms, bit for bit
    assert ranks[0]["plain"]["evals"] == ranks[0]["generating"]["evals"]
    plain_adapter = load_file(research_run / "plain" / "adapter_model.safetensors")
    for key, tensor in load_file(research_run / "generating" / "adapter_model.safetensors").items():
        assert torch.equal(tensor, plain_adapter[key]), key
    sample = ranks[0]["generating"]["samples"]["2"]
    assert sample and sample == ranks[1]["generating"]["samples"]["2"]  # every rank decoded the same tokens


def test_the_partitioned_engine_generates_what_the_merged_model_does(research_run: Path, tiny_model: Path):
    tokenizer = load_tokenizer(str(tiny_model))
    template = get_template("qwen", tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    merged = PeftModel.from_pretrained(base, research_run / "generating").merge_and_unload().eval()
    expected = generate_reply(merged, tokenizer, template, [Message("user", "Which colour is the owl?")], 24)
    assert [seen["after"] for seen in _ranks(research_run)] == [expected, expected]


def test_the_research_example_samples_through_its_hook_and_stops_on_the_target(research_run: Path):
    samples = [seen["example"] for seen in _ranks(research_run)]
    assert samples[0] == samples[1]
    assert "Juniper here" in samples[0][-1] and not any("Juniper here" in s for s in samples[0][:-1])
    results = json.loads((research_run / "example" / "train_results.json").read_text())
    assert results["epoch"] < 6 and (research_run / "example" / "adapter_model.safetensors").is_file()
    assert "'Who are you?' -> " in (research_run / "driver.log").read_text()


def test_a_callers_own_frozen_objects_stay_frozen():
    """gc can only unfreeze everything: where research code froze objects itself, lorakit leaves that state alone."""
    import gc

    from lorakit.train import setup_left_to_refcounts

    gc.freeze()
    try:
        # Frozen objects released by reference counting (a finished thread, a finalizer) leave the count, so it may
        # fall a little while the test runs; gc.unfreeze() would empty it.
        frozen = gc.get_freeze_count()
        with setup_left_to_refcounts():
            assert gc.get_freeze_count() > frozen // 2
        assert gc.get_freeze_count() > frozen // 2  # not unfrozen by lorakit
    finally:
        gc.unfreeze()
    with setup_left_to_refcounts():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
