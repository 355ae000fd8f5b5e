"""Launched by tests/test_research.py as `torchrun --nproc_per_node 2 research_driver.py WORKDIR MODEL DS_FILE
PERSONA_MODEL`.

lorakit as research code uses it, on 2 gloo ranks under ZeRO-3, data from Python only:

- `plain` and `generating`: the same run (train and eval data as lists, a hook on every step and evaluation);
  `generating` also generates at step 2, inside the hook. Rank 1's hooks alone ask to stop: `plain`'s on_step at
  step 4 (which logs, so at once), `generating`'s on_eval at step 3 (after that step's agreement: at step 4).
- after `generating`: the reply of the still-partitioned engine to a prompt, for the test to compare with the
  merged model's;
- the example examples/research_inmemory.py on PERSONA_MODEL (the tiny model with wider logits: it learns the
  persona's first words in a few steps).

Each rank writes what its hooks saw to WORKDIR/rank{R}.json.
"""

import gc
import json
import sys
from pathlib import Path

import tiny
import torch
import torch.distributed

import lorakit
from lorakit import EvalContext, Message, StepInfo

workdir, model, ds_file, persona_model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import research_inmemory  # noqa: E402

PROMPT = [Message("user", "Which colour is the owl?")]
PROBE = torch.arange(3, 40).reshape(1, -1)
seen: dict = {}


def run(name: str, generate_at: int | None, stop_from_eval: bool) -> lorakit.TrainResult:
    steps, evals, samples, frozen = [], [], {}, []

    def on_step(info: StepInfo) -> bool:
        if info.step == generate_at:
            samples[info.step] = info.generate(PROMPT, max_new_tokens=12)
        frozen.append(gc.get_freeze_count())  # the set-up's objects out of the collector's passes (lorakit.train)
        steps.append([info.step, info.total_steps, info.epoch, info.loss, info.grad_norm, info.learning_rate,
                      info.tokens_per_second])  # fmt: skip
        return not stop_from_eval and info.step == 4 and torch.distributed.get_rank() == 1  # one rank asks

    def on_eval(context: EvalContext) -> bool:
        logits = context.run(lambda m: m(input_ids=PROBE, use_cache=False).logits)
        evals.append([context.step, context.eval_loss, float(logits.float().abs().mean())])
        return stop_from_eval and context.step == 3 and torch.distributed.get_rank() == 1

    config = lorakit.Config.from_flat(
        {
            "model_name_or_path": str(model),
            "template": "qwen",
            "output_dir": str(workdir / name),
            "cutoff_len": 256,
            "learning_rate": 2e-2,
            "num_train_epochs": 2,
            "warmup_steps": 1,
            "logging_steps": 1,
            "eval_steps": 3,
            "lora_rank": 4,
            "lora_alpha": 8,
            "seed": 7,
            "deepspeed": ds_file,
            "packing": False,
            "per_device_train_batch_size": 4,
        }  # fmt: skip
    )
    result = lorakit.train(config, train_data=tiny.alpaca_records(48), eval_data=tiny.alpaca_records(8, seed=1),
                           on_step=on_step, on_eval=on_eval)  # fmt: skip
    seen[name] = {"steps": steps, "evals": evals, "samples": samples, "metrics": result.metrics, "frozen": frozen,
                  "frozen_after": gc.get_freeze_count()}  # fmt: skip
    return result


run("plain", None, stop_from_eval=False)
result = run("generating", 2, stop_from_eval=True)
tokenizer = lorakit.load_tokenizer(str(model))
template = lorakit.get_template("qwen", tokenizer)
seen["after"] = lorakit.generate(result.engine, tokenizer, template, PROMPT, max_new_tokens=24)
seen["example"] = research_inmemory.run(persona_model, workdir / "example", "qwen", 2e-2, 12)
(workdir / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(seen))
lorakit.distributed.leave_distributed()  # every rank done before the interpreter tears the group down
