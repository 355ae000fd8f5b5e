"""The peer baseline: HF Trainer + PEFT + DeepSpeed ZeRO-3 as LLaMA-Factory runs the reference job (micro-batch
4 x accumulation 4, padding collator, gradient checkpointing, bf16), on the same tokenised examples as lorakit.

    torchrun --nproc_per_node 2 benchmarks/hf_baseline.py MODEL DATA_DIR DS_CONFIG STEPS OUT.json
Prints and writes tokens/s per GPU over the steps after the first (non-padding tokens, as lorakit counts).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,  # fmt: skip
)

from lorakit.data import encode_dataset, load_conversations, resolve_datasets
from lorakit.engine import load_tokenizer
from lorakit.templates import get_template

model_dir, data_dir, ds_config, steps, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
args = TrainingArguments(output_dir="/tmp/hf_baseline", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                         learning_rate=5e-4, lr_scheduler_type="cosine", max_steps=steps, logging_steps=1, bf16=True,
                         gradient_checkpointing=True, deepspeed=ds_config, save_strategy="no", report_to=[],
                         max_grad_norm=1.0, remove_unused_columns=False, dataloader_drop_last=False)  # fmt: skip
tokenizer = load_tokenizer(model_dir)
conversations = load_conversations(resolve_datasets(data_dir, ("huanhuan",)), None)
data = encode_dataset(conversations, get_template("qwen", tokenizer), tokenizer, 1024)
examples = [{"input_ids": data.example(i)[0].tolist(), "labels": data.example(i)[1].tolist()} for i in range(len(data))]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)  # zero.Init via the TrainingArguments
model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "v_proj", "k_proj", "gate_proj", "up_proj",
                                                         "o_proj", "down_proj"]))  # fmt: skip


class Clock(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, *_args, **_kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


clock = Clock()
trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=DataCollatorForSeq2Seq(tokenizer),
                  callbacks=[clock])  # fmt: skip
trainer.train()
world = torch.distributed.get_world_size()
tokens_per_step = 4 * 4 * world * float(data.lengths.mean())
seconds = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
result = {
    "step_seconds": seconds,
    "tokens_per_second_per_gpu": tokens_per_step / seconds / world,
    "world": world,
    "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    "steps_timed": len(clock.times) - 1,
}
if torch.distributed.get_rank() == 0:
    print("HF_BASELINE", json.dumps(result))
    with open(out, "w") as handle:
        json.dump(result, handle)
