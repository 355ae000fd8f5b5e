"""End-to-end on 2 gloo ranks under ZeRO-3 (slow: each launch starts DeepSpeed; they share module fixtures).

- the driver run (torchrun): micro-batch 4 x accumulation 1 vs 1 x 4 give the same updates; the first step's
  gradient equals a plain PyTorch computation of the per-token mean loss over the whole global batch; the saved
  adapter reloads without DeepSpeed and reproduces the trained engine's logits;
- the CLI run (deepspeed launcher, the reference's DeepSpeed file, a YAML config overridden by flags): logs, step
  math, the replaced scheduler, the cosine schedule, the output folder, the falling loss, the experiment trackers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO, free_port, launch
from safetensors.torch import load_file
from test_tracking import assert_same_scalars, jsonl_scalars, mlflow_runs, mlflow_scalars, tensorboard_scalars

from lorakit.data import encode_dataset, load_conversations, plan_epoch, resolve_datasets
from lorakit.engine import load_tokenizer
from lorakit.loss import shifted_cross_entropy_sum
from lorakit.schedule import learning_rate_at
from lorakit.templates import get_template

pytestmark = pytest.mark.multirank
DS_FILE = REPO / "examples" / "ds_config_zero3.json"


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_accumulation_does_not_change_the_update(driver_run: Path):
    wide, deep = (
        read_log(driver_run / "wide" / "trainer_log.jsonl"),
        read_log(driver_run / "deep" / "trainer_log.jsonl"),
    )
    assert len(wide) == len(deep) == 12  # 48 examples, global batch 8, 2 epochs
    assert wide[0]["grad_norm"] == pytest.approx(deep[0]["grad_norm"], rel=1e-5)
    for a, b in zip(wide, deep):
        # fp32 sums in another order differ by rounding, which Adam amplifies a little over the steps
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["learning_rate"] == b["learning_rate"]
    wide_adapter = load_file(driver_run / "wide" / "adapter_model.safetensors")
    deep_adapter = load_file(driver_run / "deep" / "adapter_model.safetensors")
    assert wide_adapter.keys() == deep_adapter.keys()
    for key, tensor in wide_adapter.items():
        torch.testing.assert_close(tensor, deep_adapter[key], rtol=0, atol=2e-3)


def test_whole_layer_gathering_computes_what_per_module_gathering_does(driver_run: Path):
    whole, per_module = (
        read_log(driver_run / "wide" / "trainer_log.jsonl"),
        read_log(driver_run / "per_module" / "trainer_log.jsonl"),
    )
    assert "each Qwen2DecoderLayer is gathered whole" in (driver_run / "driver.log").read_text()
    assert len(whole) == len(per_module) == 12
    assert (whole[0]["loss"], whole[0]["grad_norm"]) == pytest.approx(
        (per_module[0]["loss"], per_module[0]["grad_norm"]), rel=1e-5
    )
    for a, b in zip(whole, per_module):  # reductions in another order round differently; Adam amplifies it a little
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
    whole_adapter = load_file(driver_run / "wide" / "adapter_model.safetensors")
    for key, tensor in load_file(driver_run / "per_module" / "adapter_model.safetensors").items():
        torch.testing.assert_close(whole_adapter[key], tensor, rtol=0, atol=2e-3)


def test_whole_layers_train_through_torchs_own_linear(driver_run: Path):
    """DeepSpeed's memory-efficient linear (a Python autograd function around every F.linear) is left out where
    lorakit gathers whole layers, and kept where DeepSpeed gathers per module; the updates are the same (above)."""
    metrics = json.loads((driver_run / "metrics.json").read_text())
    assert {name: m["torch_linear"] for name, m in metrics.items() if name != "zero2"} == {
        "wide": True, "deep": True, "per_module": False, "checkpointed": True, "resident": True,
        "compiled": True, "first_resident": True, "gathered": True, "contiguous": True, "saving": True,
        "view_saving": True}  # fmt: skip


def test_zero3_trains_as_zero2_does_over_every_step(driver_run: Path):
    zero3, zero2 = (
        read_log(driver_run / "wide" / "trainer_log.jsonl"),
        read_log(driver_run / "zero2" / "trainer_log.jsonl"),
    )
    assert len(zero3) == len(zero2) == 12
    for a, b in zip(zero3, zero2):  # partitioned weights, whole-layer gathers, the adapter re-gathered after steps
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_the_hf_model_called_past_peft_after_a_save_gathers_what_the_save_released(driver_run: Path):
    """A checkpoint's GatheredParameters block partitions the adapter on leaving. PEFT's `generate` (and research
    code's `get_base_model()(...)`) calls the HF model itself, not the PEFT model: DeepSpeed's unit hooks gathered
    the adapter there; with every weight resident (those hooks removed) lorakit's look must run there too."""
    metrics = json.loads((driver_run / "metrics.json").read_text())
    for name in ("wide", "resident"):
        assert metrics[name]["base_logits_error"] == pytest.approx(0.0, abs=1e-5), (name, metrics[name])
        assert isinstance(metrics[name]["generated"], list), (name, metrics[name]["generated"])
    assert metrics["resident"]["generated"] == metrics["wide"]["generated"]  # the same training: the same reply


def test_compiled_layers_train_as_eager_layers_under_zero3(driver_run: Path):
    """--torch_compile (inductor on the CPU here) under ZeRO-3 with every weight resident: the same losses and
    gradient norms as the eager run, step for step (dropout off, so no random stream differs), through checkpoints
    saved every 5 steps (each partitions the adapter it gathered; the next compiled forward needs it whole)."""
    eager, compiled = (read_log(driver_run / name / "trainer_log.jsonl") for name in ("resident", "compiled"))
    assert len(compiled) == 12
    for a, b in zip(eager, compiled):  # inductor's fused kernels sum in another order: fp32 rounding, amplified
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)  # over 12 steps at lr 2e-2 (measured: 3e-4, 0.8 %)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


def test_gradient_checkpointing_computes_the_same_updates(driver_run: Path):
    plain, recomputed = (
        read_log(driver_run / "wide" / "trainer_log.jsonl"),
        read_log(driver_run / "checkpointed" / "trainer_log.jsonl"),
    )
    assert (recomputed[0]["loss"], recomputed[0]["grad_norm"]) == pytest.approx(
        (plain[0]["loss"], plain[0]["grad_norm"]), rel=1e-5
    )
    for a, b in zip(plain, recomputed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
    saved = json.loads((driver_run / "checkpointed" / "lorakit_config.json").read_text())
    assert saved["lorakit"]["gradient_checkpointing"] is True
    metrics = json.loads((driver_run / "metrics.json").read_text())
    assert metrics["checkpointed"]["recomputes"] and not metrics["wide"]["recomputes"]


def test_first_step_gradient_is_the_per_token_mean_over_the_global_batch(
    driver_run: Path, tiny_model: Path, tiny_data: Path
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model))
    conversations = load_conversations(resolve_datasets(str(tiny_data), ("tiny",)), None)
    data = encode_dataset(conversations, get_template("qwen", tokenizer), tokenizer, 256)
    step = plan_epoch(data.lengths, epoch=0, seed=7, world_size=2, micro_batch=4, accumulation=1)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(7)
    targets = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    )
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    )
    total, count = 0.0, 0
    for index in step.examples():
        ids, labels = (torch.from_numpy(a.astype("int64"))[None] for a in data.example(index))
        total = total + shifted_cross_entropy_sum(model(input_ids=ids).logits, labels)
        count += int(data.target_counts[index])
    (total / count).backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.requires_grad))
    logged = read_log(driver_run / "wide" / "trainer_log.jsonl")[0]
    assert logged["loss"] == pytest.approx(float(total / count), abs=1e-4)
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_saved_adapter_reloads_without_deepspeed_and_matches_the_engine(driver_run: Path, tiny_model: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = driver_run / "wide"
    assert (saved / "adapter_model.safetensors").stat().st_size > 10_000  # not the classic empty ZeRO-3 adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, saved).eval()
    expected = torch.load(driver_run / "wide_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        untrained = base.__class__.from_pretrained(tiny_model)(input_ids=expected["input_ids"]).logits
    assert (untrained - logits).abs().max() > 1e-2  # the adapter changed something


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_data: Path) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("cli")
    (workdir / "run.yaml").write_text(
        f"model_name_or_path: {tiny_model}\ntemplate: qwen\ndataset_dir: {tiny_data}\ndataset: tiny\n"
        "cutoff_len: 256\nlearning_rate: 1.0e-3\nnum_train_epochs: 5\nlogging_steps: 1\nlora_target: all\n"
    )
    command = [  # the `deepspeed` launcher, run as its module so no PATH is needed
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "examples/sft.py",
        str(workdir / "run.yaml"),
        "--deepspeed",
        str(DS_FILE),
        "--stage",
        "sft",
        "--do_train",
        "True",
        "--finetuning_type",
        "lora",
        "--learning_rate",
        "2e-2",
        "--num_train_epochs",
        "3",
        "--max_samples",
        "40",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--lr_scheduler_type",
        "cosine",
        "--warmup_ratio",
        "0.2",
        "--max_grad_norm",
        "1.0",
        "--logging_steps",
        "2",
        "--save_steps",
        "4",
        "--neftune_noise_alpha",
        "5",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "16",
        "--lora_dropout",
        "0.1",
        "--output_dir",
        str(workdir / "out"),
        "--plot_loss",
        "True",
        "--val_size",
        "0.2",
        "--eval_steps",
        "4",
        "--seed",
        "3",
        "--report_to",
        "tensorboard,mlflow",
        "--run_name",
        "cli",
    ]
    return workdir / "out", launch(command, workdir / "cli.log")


def test_cli_run_logs_the_step_math_and_replaces_the_file_scheduler(cli_run: tuple[Path, str]):
    _, log = cli_run
    for line in (
        "Num examples = 32",
        "Num Epochs = 3",
        "Instantaneous batch size per device = 4",
        "Total train batch size (w. parallel, distributed & accumulation) = 16",
        "Gradient Accumulation steps = 2",
        "Total optimization steps = 6",
        "evaluation: 8 examples",
        "scheduler (WarmupLR) is replaced by lorakit's schedule",
        "first example: {",
        "'train_runtime'",
        "'train_tokens_per_second'",
    ):
        assert line in log


def test_cli_run_follows_warmup_then_cosine_and_the_loss_falls(cli_run: tuple[Path, str]):
    out, _ = cli_run
    records = [r for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]  # every 2 steps (32 training examples, 2 steps an epoch)
    for record in records:
        expected = learning_rate_at(record["step"] - 1, total_steps=6, peak=2e-2, warmup=2, kind="cosine")
        assert record["learning_rate"] == pytest.approx(expected, rel=1e-9)
        assert set(record) >= {"loss", "grad_norm", "learning_rate", "epoch", "tokens_per_second", "seconds_per_step"}
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    assert records[-1]["epoch"] == 3.0


def test_cli_run_evaluates_the_held_out_examples(cli_run: tuple[Path, str]):
    out, log = cli_run
    evals = [r for r in read_log(out / "trainer_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 6] and all(0 < r["eval_loss"] < 20 for r in evals)
    assert "{'eval_loss': " in log
    assert json.loads((out / "train_results.json").read_text())["eval_loss"] == evals[-1]["eval_loss"]


def test_cli_run_writes_a_complete_output_folder(cli_run: tuple[Path, str]):
    out, _ = cli_run
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "lorakit_config.json",
        "train_results.json",
        "training_loss.png",
        "checkpoint-4/adapter_model.safetensors",
        "checkpoint-6/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    resolved = json.loads((out / "lorakit_config.json").read_text())
    assert resolved["lorakit"]["learning_rate"] == 2e-2 and resolved["lorakit"]["cutoff_len"] == 256  # flag, yaml
    assert "scheduler" not in resolved["deepspeed"]
    assert resolved["deepspeed"]["train_batch_size"] == 16 and resolved["deepspeed"]["gradient_clipping"] == 1.0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16 and "lm_head" not in adapter["target_modules"]


def test_cli_run_tracks_on_rank_0_only_what_the_log_shows(cli_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch):
    out, _ = cli_run
    logged = jsonl_scalars(out / "trainer_log.jsonl")
    assert [step for step, _ in logged["eval_loss"]] == [4, 6] and [step for step, _ in logged["loss"]] == [2, 4, 6]
    assert [path.name for path in (out / "runs").iterdir()] == ["cli"]
    assert len(list((out / "runs" / "cli").iterdir())) == 1  # one event file: rank 1 wrote none
    assert_same_scalars(tensorboard_scalars(out / "runs" / "cli"), logged, rel=1e-6)  # float32 in event files
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's switch for its file store (lorakit sets it)
    (run,) = mlflow_runs(out / "mlruns")  # one run: rank 1 made none
    assert run.info.run_name == "cli" and run.info.status == "FINISHED"
    assert_same_scalars(mlflow_scalars(out / "mlruns", run.info.run_id, logged), logged)
    params = run.data.params
    assert (params["lorakit.learning_rate"], params["lorakit.cutoff_len"]) == ("0.02", "256")  # a flag, the YAML
    assert params["deepspeed.train_batch_size"] == "16" and params["lorakit.report_to"] == '["tensorboard", "mlflow"]'
