"""A table of bad inputs across everything a command reads (data files, dataset_info.json, flags, model folders,
DeepSpeed files, output folders, checkpoints, merge and chat), each run through the real CLI entry in-process.

For every case: a non-zero exit status, exactly one `lorakit: error:` line on stderr naming the culprit (a path or a
flag) with the expected reason, no traceback, and not one file created, changed or removed anywhere the command
could write (the case's tmp folder, the shared model, data and adapters, the data cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bad_input_world import (
    ALPACA,
    World,
    _adapter_config,
    _config_with,
    _embedding_of_width,
    _empty_safetensors,
    _existing_checkpoint,
    _header_longer_than_file,
    _pissa_start_of_rank,
    _remove,
    _repeating_mixture,
    _set,
    _sharded_with_missing_shard,
    _tools,
    _truncate,
    _write,
    _zero_width_lora,
)
from peft import LoraConfig, get_peft_model
from test_checkpoint import write_checkpoint
from tiny import make_model
from transformers import AutoModelForCausalLM

from lorakit.__main__ import entry
from lorakit.checkpoint import ADAPTER_WEIGHTS, STATE_FILE, TRAINER_STATE
from lorakit.rng import rng_file


def _finished_run(world: World, extra: tuple[str, ...]) -> list[str]:
    """An output_dir holding the adapter a finished run saved, its checkpoints deleted to free the disk."""
    world.out.mkdir(parents=True, exist_ok=True)
    (world.out / ADAPTER_WEIGHTS).write_bytes(b"the trained adapter")
    return world.train(*extra)


def _in_epoch(epoch: int) -> Callable[[Path], None]:
    def move(checkpoint: Path) -> None:  # the state file is not in its own file list: the checkpoint still verifies
        state = json.loads((checkpoint / STATE_FILE).read_text())
        state["position"]["epoch"] = epoch
        (checkpoint / STATE_FILE).write_text(json.dumps(state))

    return move


def _foreign_resume(world: World) -> list[str]:
    write_checkpoint(world.out, 2)  # this output_dir's own run
    return world.train("--resume_from_checkpoint", write_checkpoint(world.tmp / "other", 4))


def _reasoning(world: World) -> list[str]:
    """A reply with its reasoning (record 1), trained with qwen3, which writes replies without it."""
    records = [{**ALPACA[0], "output": "b"}, {**ALPACA[0], "output": "<think>\nhmm\n</think>\n\nb"}]
    return [*world.data_file(json.dumps(records)), "--template", "qwen3"]


def _adapter(base: Path, folder: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An adapter of the tiny model, and one of a narrower model with the same module names."""
    root = tmp_path_factory.mktemp("adapters")
    other = make_model(root / "other-model", hidden_size=32)
    return _adapter(tiny_model, root / "tiny-adapter"), _adapter(other, root / "other-adapter")


Setup = Callable[[World], list[str]]
W = World
# name: (setup, culprit named in the line, what the line says)
# fmt: off
CASES: dict[str, tuple[Setup, str, str]] = {
    # data files
    "json object wrapping the list": (lambda w: w.data_file(json.dumps({"data": ALPACA})), "d.json", "under 'data'"),
    "json object wrapping, indented": (lambda w: w.data_file(json.dumps({"rows": ALPACA}, indent=1)), "d.json",
                                       "under 'rows'"),
    "json object over lines": (lambda w: w.data_file('{\n"instruction": "a",\n"output": "b"\n}'), "d.json",
                               "one JSON object over several lines"),
    "data file not utf-8": (lambda w: w.data_file(json.dumps(ALPACA).encode().replace(b"cat", b"c\xe9t")), "d.json",
                            "is not UTF-8 text"),
    "jsonl bad second line": (lambda w: w.data_file('{"instruction": "a", "output": "b"}\n{"instruction": }',
                                                    "d.jsonl"), "d.jsonl", "line 2 is not valid JSON"),
    "records are lists": (lambda w: w.data_file('[["a", "b"]]'), "d.json", "record 0 is a list, not an object"),
    "trailing comma": (lambda w: w.data_file('[{"instruction": "a", "output": "b"},]'), "d.json", "not valid JSON"),
    "output is a number": (lambda w: w.data_file('[{"instruction": "a", "output": 5}]'), "d.json",
                           "field 'output' must be a string"),
    "csv without output column": (lambda w: w.data_file("instruction,input\na,b\n", "d.csv"), "d.csv",
                                  "has no 'output' field"),
    "csv not utf-8": (lambda w: w.data_file(b"instruction,output\nc\xe9t,b\n", "d.csv"), "d.csv", "not UTF-8"),
    "parquet that is not one": (lambda w: w.data_file("not parquet", "d.parquet"), "d.parquet",
                                "not a readable Parquet file"),
    "text file": (lambda w: w.data_file("hello", "d.txt"), "d.txt", "has type '.txt'"),
    "history not pairs": (lambda w: w.data_file('[{"instruction": "a", "output": "b", "history": ["x"]}]'), "d.json",
                          "history turn 0 must be a [user, assistant] pair"),
    "sharegpt ends with the user": (
        lambda w: w.data_file(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]),
                              entry={"formatting": "sharegpt"}), "d.json", "has role 'human'"),
    "sharegpt messages not a list": (
        lambda w: w.data_file(json.dumps([{"conversations": "hi"}]), entry={"formatting": "sharegpt"}), "d.json",
        "must be a list of messages"),
    "openai tool_calls": (lambda w: w.data_file(json.dumps([{"messages": [
        {"role": "user", "content": "?"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}]), entry={"formatting": "sharegpt"}),
        "d.json record 0", "message 1 has OpenAI 'tool_calls'"),
    "val_size counting an example cut to nothing": (lambda w: [*w.data_file(json.dumps(
        [ALPACA[0], {**ALPACA[0], "instruction": "long " * 2000}, ALPACA[0]])), "--val_size", "2"],
        "--val_size 2", "leaves no training examples of 2"),
    "val_size holding out every record a mixture repeats": (lambda w: _repeating_mixture(w, 4), "--val_size 4",
                                                            "leaves no training examples of 4 records"),
    "empty list": (lambda w: w.data_file("[]"), "'d'", "no examples left"),
    # dataset_info.json
    "info not utf-8": (lambda w: w.info(b'{"d": {"file_name": "d.json", "x": "\xff"}}'), "dataset_info.json",
                       "is not UTF-8 text"),
    "info invalid json": (lambda w: w.info('{"d": {"file_name": "d.json"}'), "dataset_info.json", "not valid JSON"),
    "info is a list": (lambda w: w.info('[{"file_name": "d.json"}]'), "dataset_info.json", "must be a JSON object"),
    "info entry without file_name": (lambda w: w.info('{"d": {"name": "d.json"}}'), "dataset_info.json",
                                     "needs a string 'file_name'"),
    "info entry with LLaMA-Factory's num_samples": (
        lambda w: w.info('{"d": {"file_name": "d.json", "num_samples": 3}}'), "dataset 'd'",
        "num_samples not supported (for num_samples: --max_samples)"),
    "info entry with a typo": (lambda w: w.info('{"d": {"file_name": "d.json", "fromatting": "alpaca"}}'),
                               "dataset 'd'", "fromatting not supported"),
    "info unknown formatting": (lambda w: w.info('{"d": {"file_name": "d.json", "formatting": "openai"}}'),
                                "dataset_info.json", "formatting 'openai' is unsupported"),
    "info unknown column": (lambda w: w.info('{"d": {"file_name": "d.json", "columns": {"answer": "a"}}}'),
                            "dataset_info.json", "unknown columns ['answer']"),
    "info tags on alpaca": (lambda w: w.info('{"d": {"file_name": "d.json", "tags": {"role_tag": "r"}}}'),
                            "dataset_info.json", "'tags' apply to formatting 'sharegpt' only"),
    "info file missing": (lambda w: w.info('{"d": {"file_name": "gone.json"}}'), "gone.json", "not found"),
    "eval dataset undefined": (lambda w: w.info('{"d": {"file_name": "d.json"}}', "--eval_dataset", "nope"),
                               "dataset 'nope'", "is not defined in"),
    # flags
    "max_steps 0": (lambda w: w.train("--max_steps", "0"), "--max_steps 0", "or -1 to run every epoch"),
    "max_steps -2": (lambda w: w.train("--max_steps", "-2"), "--max_steps -2", "must be at least 1"),
    "lora_alpha 0": (lambda w: w.train("--lora_alpha", "0"), "--lora_alpha 0", "must be a positive number"),
    "lora_alpha negative": (lambda w: w.train("--lora_alpha", "-8"), "--lora_alpha -8", "positive"),
    "seed -1": (lambda w: w.train("--seed", "-1"), "--seed -1", "must be a whole number from 0"),
    "adam_beta1 1.5": (lambda w: w.train("--adam_beta1", "1.5"), "--adam_beta1 1.5", "must be in [0, 1)"),
    "adam_beta2 1": (lambda w: w.train("--adam_beta2", "1"), "--adam_beta2 1.0", "must be in [0, 1)"),
    "adam_epsilon 0": (lambda w: w.train("--adam_epsilon", "0"), "--adam_epsilon 0", "positive"),
    "weight_decay negative": (lambda w: w.train("--weight_decay", "-0.1"), "--weight_decay -0.1", "must be >= 0"),
    "learning_rate 0": (lambda w: w.train("--learning_rate", "0"), "--learning_rate 0", "positive"),
    "learning_rate nan": (lambda w: w.train("--learning_rate", "nan"), "--learning_rate nan", "positive"),
    "lora_rank 0": (lambda w: w.train("--lora_rank", "0"), "--lora_rank 0", "at least 1"),
    "lora_target all among names": (lambda w: w.train("--lora_target", "all,q_proj"), "--lora_target all,q_proj",
                                    "give `all` alone"),
    "lora_dropout 1": (lambda w: w.train("--lora_dropout", "1"), "--lora_dropout 1", "must be in [0, 1)"),
    "pissa_iter without pissa": (lambda w: w.train("--pissa_iter", "4"), "--pissa_iter", "add --pissa_init"),
    "pissa_convert without pissa": (lambda w: w.train("--pissa_convert", "false"), "--pissa_convert",
                                    "applies to PiSSA only"),
    "pissa_iter -2": (lambda w: w.train("--pissa_init", "--pissa_iter", "-2"), "--pissa_iter -2", "must be -1"),
    "pissa rank above a weight's side": (lambda w: w.train("--pissa_init", "--lora_rank", "40"), "--lora_rank 40",
                                         "model.layers.0.self_attn.k_proj has 32"),
    "unknown additional target": (lambda w: w.train("--additional_target", "embed"), "--additional_target embed",
                                  "matches no module of the model; modules with weights are named down_proj, embed"),
    "additional target LoRA adapts": (lambda w: w.train("--additional_target", "q_proj"),
                                      "--additional_target q_proj", "a module LoRA adapts"),
    "additional target inside another": (lambda w: w.train("--lora_target", "q_proj", "--additional_target",
                                                           "mlp,down_proj"), "--additional_target down_proj",
                                         "inside model.layers.0.mlp"),
    "eval_steps negative": (lambda w: w.train("--eval_steps", "-1"), "--eval_steps -1", "must be >= 0"),
    "save_steps negative": (lambda w: w.train("--save_steps", "-5"), "--save_steps -5", "must be >= 0"),
    "logging_steps 0": (lambda w: w.train("--logging_steps", "0"), "--logging_steps 0", "at least 1"),
    "cutoff_len 0": (lambda w: w.train("--cutoff_len", "0"), "--cutoff_len 0", "too small"),
    "epochs 0": (lambda w: w.train("--num_train_epochs", "0"), "--num_train_epochs 0", "at least 1"),
    "micro batch 0": (lambda w: w.train("--per_device_train_batch_size", "0"), "--per_device_train_batch_size 0",
                      "at least 1"),
    "accumulation 0": (lambda w: w.train("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps 0",
                       "at least 1"),
    "warmup_ratio 1.5": (lambda w: w.train("--warmup_ratio", "1.5"), "--warmup_ratio 1.5", "must be in [0, 1)"),
    "max_grad_norm negative": (lambda w: w.train("--max_grad_norm", "-1"), "--max_grad_norm -1", ">= 0"),
    "neftune negative": (lambda w: w.train("--neftune_noise_alpha", "-1"), "--neftune_noise_alpha -1", ">= 0"),
    "zero_stage 4": (lambda w: w.train("--zero_stage", "4"), "--zero_stage 4", "must be 0, 1, 2 or 3"),
    "val_size 1.5": (lambda w: w.train("--val_size", "1.5"), "--val_size 1.5", "fraction below 1"),
    "val_size nan": (lambda w: w.train("--val_size", "nan"), "--val_size nan", "fraction below 1"),
    "config file list for a path": (lambda w: w.train(_yaml(w, "data_cache_dir: [a, b]\n")), "--data_cache_dir",
                                    "expected one value, got a list"),
    "config file null for a path": (lambda w: w.train(_yaml(w, "data_cache_dir:\n")), "--data_cache_dir",
                                    "expected a value, got null"),
    "config file mapping for a list": (lambda w: w.train(_yaml(w, "lora_target: {q_proj: 1}\n")), "--lora_target",
                                       "got a mapping"),
    "config file boolean for a count": (lambda w: w.train(_yaml(w, "num_train_epochs: yes\n")),
                                        "--num_train_epochs", "expected a number, got true"),
    "unknown command": (lambda w: ["trian", *w.train()[1:]], "trian", "unknown command"),
    "no command": (lambda w: [], "no command", "train, preview, merge or chat"),
    "max_samples 0": (lambda w: w.train("--max_samples", "0"), "--max_samples 0", "at least 1"),
    "preprocessing_num_workers 0": (lambda w: w.train("--preprocessing_num_workers", "0"),
                                    "--preprocessing_num_workers 0", "at least 1"),
    "data_cache_dir is a file": (lambda w: w.train("--data_cache_dir", _touch(w.tmp / "cache")), "--data_cache_dir",
                                 "is a file, not a folder"),
    "unknown scheduler": (lambda w: w.train("--lr_scheduler_type", "step"), "--lr_scheduler_type step", "unknown"),
    "llama3 template on a chatml tokenizer": (lambda w: w.train("--template", "llama3"), "--template llama3",
                                              "this template's special tokens do not exist in this tokenizer"),
    "unknown template": (lambda w: w.train("--template", "vicuna"), "--template vicuna", "is unknown"),
    "reasoning data, qwen3": (_reasoning, "d.json record 1", "contains </think>"),
    "tool data, default template": (lambda w: _tools(w, 1, "default"), "--template default",
                                    "cannot render tool calls"),
    "bf16 and fp16": (lambda w: w.train("--bf16", "--fp16"), "--bf16 and --fp16", "choose one precision"),
    "seed not a number": (lambda w: w.train("--seed", "x"), "--seed", "could not convert"),
    # QLoRA (the machine-dependent ones are made so by MACHINE below)
    "quantization_bit 3": (lambda w: w.train("--quantization_bit", "3"), "--quantization_bit 3", "4 or 8 bits"),
    "quantization_type int4": (lambda w: w.train("--quantization_bit", "4", "--quantization_type", "int4"),
                               "--quantization_type int4", "use nf4 or fp4"),
    "quantization_method gptq": (lambda w: w.train("--quantization_bit", "4", "--quantization_method", "gptq"),
                                 "--quantization_method gptq", "bitsandbytes only"),
    "8-bit under ZeRO-3": (lambda w: w.train("--quantization_bit", "8"), "--quantization_bit 8",
                           "does not work under ZeRO-3"),
    "torch_compile with quantisation": (lambda w: w.train("--torch_compile", "--quantization_bit", "4"),
                                        "--torch_compile", "drop --torch_compile"),
    "torch_compile_mode unknown": (lambda w: w.train("--torch_compile_mode", "fast"), "--torch_compile_mode fast",
                                   "use one of default, reduce-overhead"),
    "torch_compile_mode without compiling": (lambda w: w.train("--torch_compile_mode", "reduce-overhead",
                                                               "--torch_compile", "false"),
                                             "--torch_compile_mode", "drop one of the two"),
    "PiSSA on a quantised base": (lambda w: w.train("--quantization_bit", "4", "--pissa_init"), "--pissa_init",
                                  "--quantization_bit 4 stores packed"),
    "quantised linear trained in full": (lambda w: w.train("--quantization_bit", "4", "--lora_target", "q_proj",
                                                           "--additional_target", "mlp"),
                                         "trains model.layers.0.mlp in full", "stores packed"),
    "quantization on the CPU": (lambda w: w.train("--quantization_bit", "4"), "--quantization_bit 4",
                                "needs a CUDA GPU"),
    "quantization without bitsandbytes": (lambda w: w.train("--quantization_bit", "4", "--zero_stage", "2"),
                                          "--quantization_bit 4", "pip install 'lorakit[qlora]'"),
    # model folders
    "config.json truncated": (lambda w: w.broken_model(_truncate("config.json", 40)), "config.json",
                              "is not valid JSON"),
    "config.json a list": (lambda w: w.broken_model(_write("config.json", "[]")), "config.json", "JSON object"),
    "config.json not utf-8": (lambda w: w.broken_model(_write("config.json", b'{"model_type": "\xff"}')),
                              "config.json", "is not valid JSON"),
    "unknown model_type": (lambda w: w.broken_model(_config_with(model_type="qwen9")), "config.json",
                           "model_type 'qwen9' is unknown to transformers"),
    "no model_type": (lambda w: w.broken_model(_config_with(model_type=None)), "config.json", "model_type None"),
    "weights truncated": (lambda w: w.broken_model(_truncate("model.safetensors")), "model.safetensors",
                          "is truncated"),
    "weights not safetensors": (lambda w: w.broken_model(_write("model.safetensors", "hello")), "model.safetensors",
                                "is not a safetensors file"),
    "weights header past the end": (lambda w: w.broken_model(_header_longer_than_file), "model.safetensors",
                                    "no readable header"),
    "no weights": (lambda w: w.broken_model(_remove("model.safetensors")), "model", "has no *.safetensors weights"),
    "index names a missing shard": (lambda w: w.broken_model(_sharded_with_missing_shard), "model",
                                    "lacks weight files its index names"),
    "no tokenizer files": (lambda w: w.broken_model(_remove("tokenizer.json")), "model", "has no tokenizer files"),
    # DeepSpeed files
    "ds stage 4": (lambda w: w.ds(_set("zero_optimization", "stage", 4)), "ds.json",
                   "zero_optimization.stage=4 is rejected by DeepSpeed's config schema"),
    "ds overlap_comm not boolean": (lambda w: w.ds(_set("zero_optimization", "overlap_comm", "sometimes")), "ds.json",
                                    "zero_optimization.overlap_comm='sometimes'"),
    "ds offload to a bad device": (
        lambda w: w.ds(_set("zero_optimization", "offload_param", {"device": "floppy"})), "ds.json",
        "rejected by DeepSpeed's config schema"),
    "ds invalid json": (lambda w: w.ds(lambda c: None, '{"zero_optimization": {'), "ds.json", "not valid JSON"),
    "ds a list": (lambda w: w.ds(lambda c: None, "[]"), "ds.json", "must hold a JSON object"),
    "ds missing": (lambda w: w.train("--deepspeed", w.tmp / "none.json"), "none.json", "file not found"),
    "ds sgd": (lambda w: w.ds(_set("optimizer", "type", "SGD")), "ds.json", "optimizer type SGD is unsupported"),
    "ds auto lorakit cannot fill": (lambda w: w.ds(_set("zero_optimization", "sub_group_size", "auto")), "ds.json",
                                    '"zero_optimization.sub_group_size": "auto"'),
    "pack_tokens without packing": (lambda w: w.train("--packing", "false", "--pack_tokens", "512"),
                                    "--pack_tokens 512", "--packing false packs none"),
    "ds lr contradicts the flag": (lambda w: w.ds(lambda c: c["optimizer"]["params"].update(lr=1.0)), "ds.json",
                                   "but --learning_rate gives"),
    "ds betas contradict the flags": (lambda w: w.ds(lambda c: c["optimizer"]["params"].update(betas=[0.9, 0.95])),
                                      "ds.json", "sets betas=[0.9, 0.95] but --adam_beta1/--adam_beta2 gives"),
    "ds weight_decay contradicts the flag": (
        lambda w: w.ds(lambda c: c["optimizer"]["params"].update(weight_decay=0.5)), "ds.json",
        "but --weight_decay gives"),
    # output folders
    "output_dir is a file": (lambda w: w.train(out=_touch(w.tmp / "out")), "out", "is a file, not a folder"),
    "output_dir parent is a file": (lambda w: w.train(out=_touch(w.tmp / "plain") / "out"), "plain",
                                    "cannot be created"),
    "output_dir holds checkpoints": (_existing_checkpoint, "out", "already holds checkpoints"),
    "output_dir holds a finished run's adapter": (lambda w: _finished_run(w, ()), "out",
                                                  "already holds a trained adapter"),
    "auto over a finished run without checkpoints": (lambda w: _finished_run(w, ("--resume_from_checkpoint", "auto")),
                                                     "out", "no checkpoint to continue"),
    "another folder's checkpoint into a used output_dir": (_foreign_resume, "checkpoint-4",
                                                           "is not one of its checkpoints"),
    "a checkpoint past the epochs asked for": (lambda w: [*w.checkpoint(_in_epoch(2)), "--num_train_epochs", "1"],
                                               "checkpoint-4", "with --num_train_epochs 1: it is in epoch 3 already"),
    "a checkpoint of other settings": (lambda w: w.checkpoint(lambda _: None), "checkpoint-4",
                                       "changed since the run that wrote it (was None, now {"),
    # checkpoints
    "trainer state truncated": (lambda w: w.checkpoint(_truncate(TRAINER_STATE, -10)), "checkpoint-4",
                                "trainer_state.safetensors has"),
    "rng file missing": (lambda w: w.checkpoint(_remove(rng_file(0))), "checkpoint-4", "is missing"),
    "adapter weights changed": (lambda w: w.checkpoint(_truncate(ADAPTER_WEIGHTS, -1)), "checkpoint-4",
                                "adapter_model.safetensors has"),
    "state file not json": (lambda w: w.checkpoint(_write(STATE_FILE, "{")), "checkpoint-4", "is not the JSON"),
    "state file without the position": (lambda w: w.checkpoint(_without_position), "checkpoint-4", "is not the JSON"),
    "not a checkpoint": (lambda w: w.train("--resume_from_checkpoint", _mkdir(w.tmp / "empty")), "empty",
                         "is not a complete lorakit checkpoint"),
    "auto finds none that verifies": (
        lambda w: (_truncate(TRAINER_STATE, -10)(write_checkpoint(w.out, 3)), w.train("--resume_from_checkpoint",
                   "auto"))[1], "checkpoint-3", "no checkpoint in"),
    "checkpoint past --max_steps": (lambda w: [*w.checkpoint(lambda _: None), "--max_steps", "2"], "checkpoint-4",
                                    "--max_steps 2"),
    "resume and overwrite": (lambda w: w.train("--resume_from_checkpoint", "auto", "--overwrite_output_dir"),
                             "--resume_from_checkpoint and --overwrite_output_dir", "contradict"),
    # merge
    "merge 0-byte adapter": (lambda w: w.merge(w.adapter_copy(_write("adapter_model.safetensors", b""))),
                             "adapter_model.safetensors", "is not a safetensors file (0 bytes"),
    "merge adapter with no tensors": (lambda w: w.merge(w.adapter_copy(_empty_safetensors)),
                                      "adapter_model.safetensors", "holds no LoRA weights"),
    "merge zero-width lora": (lambda w: w.merge(w.adapter_copy(_zero_width_lora)), "adapter_model.safetensors",
                              "holds no LoRA weights"),
    "merge adapter truncated": (lambda w: w.merge(w.adapter_copy(_truncate("adapter_model.safetensors"))),
                                "adapter_model.safetensors", "is truncated"),
    "merge adapter config not json": (lambda w: w.merge(w.adapter_copy(_write("adapter_config.json", "{"))),
                                      "adapter_config.json", "is not valid JSON"),
    "merge adapter rank 0": (lambda w: w.merge(w.adapter_copy(_adapter_config(r=0))), "adapter_config.json",
                             "needs r >= 1"),
    "merge adapter of another model": (lambda w: w.merge(w.other_adapter), "other-adapter", "does not fit the base"),
    "merge unconverted pissa without its start": (
        lambda w: w.merge(w.adapter_copy(_adapter_config(init_lora_weights="pissa_niter_16"))), "pissa_init",
        "is missing"),
    "merge unconverted pissa with another start": (lambda w: w.merge(w.adapter_copy(_pissa_start_of_rank(2))),
                                                    "pissa_init", "is not the starting point of"),
    "chat unconverted pissa": (lambda w: w.chat(w.adapter_copy(_adapter_config(init_lora_weights="pissa"))),
                               "adapter", "merge it first"),
    "merge full module of another shape": (lambda w: w.merge(w.adapter_copy(_embedding_of_width(32))),
                                           "model.embed_tokens.weight", "does not fit the base model"),
    "merge adapter folder empty": (lambda w: w.merge(_mkdir(w.tmp / "nothing")), "nothing",
                                   "has no adapter_config.json"),
    "merge out under a file": (lambda w: w.merge(out=_touch(w.tmp / "f") / "m"), "--out", "cannot be created"),
    "merge out is the adapter, overwritten": (lambda w: [*w.merge(out=w.adapter), "--overwrite"], "--out",
                                              "would delete the --adapter folder"),
    "merge out holds the base, overwritten": (lambda w: [*w.merge(out=w.model.parent), "--overwrite"], "--out",
                                              "would delete the --base folder"),
    "merge out exists": (lambda w: w.merge(out=_mkdir(w.tmp / "taken")), "--out", "already exists"),
    "merge base truncated": (lambda w: w.merge(base=w.model_copy(_truncate("model.safetensors"))),
                             "model.safetensors", "is truncated"),
    "merge base unknown model_type": (lambda w: w.merge(base=w.model_copy(_config_with(model_type="qwen9"))),
                                      "config.json", "unknown to transformers"),
    "merge onto a quantised base": (lambda w: w.merge(base=w.model_copy(_config_with(quantization_config={
        "quant_method": "bitsandbytes", "load_in_4bit": True}))), "model", "already-quantised model"),
    # chat
    "chat adapter of another model": (lambda w: w.chat(w.other_adapter), "other-adapter", "does not fit the base"),
    "chat full module of another shape": (  # PEFT's size-mismatch traceback after loading the model
        lambda w: w.chat(w.adapter_copy(lambda f: (_embedding_of_width(32)(f), _adapter_config(
            modules_to_save=["embed_tokens"])(f)))), "model.embed_tokens.weight", "does not fit the base model"),
    "chat adapter onto a quantised base": (lambda w: w.chat(w.adapter, model=w.model_copy(_config_with(
        quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}))), "model",
        "already-quantised model"),
    "chat empty adapter": (lambda w: w.chat(w.adapter_copy(_empty_safetensors)), "adapter_model.safetensors",
                           "holds no LoRA weights"),
    "chat adapter without config": (lambda w: w.chat(w.adapter_copy(_remove("adapter_config.json"))), "adapter",
                                    "has no adapter_config.json"),
    "chat model truncated weights": (lambda w: w.chat(model=w.model_copy(_truncate("model.safetensors"))),
                                     "model.safetensors", "is truncated"),
    "chat model config truncated": (lambda w: w.chat(model=w.model_copy(_truncate("config.json", 30))),
                                    "config.json", "is not valid JSON"),
    "chat max_new_tokens 0": (lambda w: [*w.chat(), "--max_new_tokens", "0"], "--max_new_tokens 0", "at least 1"),
    "chat no model folder": (lambda w: w.chat(model=w.tmp / "none"), "none", "no such model folder"),
    # preview (reads the model folder's config and tokenizer, and the data)
    "preview llama3 template on a chatml tokenizer": (
        lambda w: ["preview", *w.train("--template", "llama3")[1:]], "--template llama3", "special tokens"),
    "preview no tokenizer files": (
        lambda w: ["preview", *w.broken_model(_remove("tokenizer.json"))[1:]], "model", "has no tokenizer files"),
    "preview json object wrapping the list": (
        lambda w: ["preview", *w.data_file(json.dumps({"data": ALPACA}))[1:]], "d.json", "under 'data'"),
    "preview reasoning data, qwen3": (lambda w: ["preview", *_reasoning(w)[1:]], "d.json record 1",
                                      "contains </think>"),
    "preview tool data, default template": (
        lambda w: ["preview", *_tools(w, 1, "default")[1:]], "--template default", "cannot render tool calls"),
}
# fmt: on
_find_spec = importlib.util.find_spec


def _without(package: str) -> Callable[..., object]:
    return lambda name, *rest: None if name == package else _find_spec(name, *rest)


MACHINE: dict[str, Callable[[pytest.MonkeyPatch], object]] = {  # the machine a case needs, on any test host
    "quantization on the CPU": lambda mp: mp.setattr(torch.cuda, "is_available", lambda: False),
    "quantization without bitsandbytes": lambda mp: (
        mp.setattr(torch.cuda, "is_available", lambda: True),
        mp.setattr(importlib.util, "find_spec", _without("bitsandbytes")),
    ),
}


def _without_position(checkpoint: Path) -> None:
    """Valid JSON, its files verifying, but not all lorakit writes (lorakit_state.json is not in its own file list)."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["position"]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


def _yaml(world: World, text: str) -> Path:
    path = world.tmp / "run.yaml"
    path.write_text(text)
    return path


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under `roots` with its size, modification time and mode."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            info = path.lstat()
            found[str(path)] = (info.st_size if path.is_file() else 0, info.st_mtime_ns, info.st_mode)
    return found


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: str, tiny_model: Path, tiny_data: Path, adapters: tuple[Path, Path], tmp_path: Path,
                   capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    setup, culprit, reason = CASES[case]
    MACHINE.get(case, lambda _: None)(monkeypatch)
    world = World(tmp_path, tiny_model, tiny_data, *adapters)
    argv = setup(world)
    roots = (tmp_path, tiny_model, tiny_data, adapters[0].parent, Path(os.environ["LORAKIT_CACHE"]))
    before = snapshot(*roots)
    capsys.readouterr()
    status = entry(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert status != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), lines
    assert culprit in lines[0] and reason in lines[0], lines[0]
    assert snapshot(*roots) == before


def test_the_table_spans_every_input_and_has_sixty_cases() -> None:
    assert len(CASES) >= 60
