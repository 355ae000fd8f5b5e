"""lorakit: LoRA supervised fine-tuning of chat LLMs on local data, on PEFT and DeepSpeed ZeRO-3.

    import lorakit
    config = lorakit.Config.from_flat({"model_name_or_path": "models/qwen", "template": "qwen",
                                       "dataset_dir": "data", "dataset": ("huanhuan",), "output_dir": "out"})
    result = lorakit.train(config)          # result.metrics: train_loss, train_runtime, ...

From research code: `lorakit.train(config, train_data=conversations, eval_data=..., on_step=f, on_eval=g)` with
conversations built in Python (no dataset_info.json), `f(StepInfo)` after every step and `g(EvalContext)` after
every evaluation on every rank (True from either ends the run), and `lorakit.generate(engine, tokenizer,
template, messages)` during training, ZeRO-3 included (README, "Using lorakit from Python").

The pieces on their own: `resolve_datasets` + `load_conversations` (records), `get_template` +
`encode_conversation` (one conversation to ids and labels), `build_engine` (model + LoRA + DeepSpeed).
"""

from lorakit.config import Config, DataConfig, LoraSettings, ModelConfig, TrainConfig
from lorakit.data import encode_conversation, encode_dataset, load_conversations, plan_epoch, resolve_datasets
from lorakit.engine import build_engine, load_tokenizer
from lorakit.errors import LorakitError
from lorakit.generation import generate
from lorakit.hooks import EvalContext, StepInfo
from lorakit.templates import Message, get_template
from lorakit.train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Config",
    "DataConfig",
    "EvalContext",
    "LoraSettings",
    "LorakitError",
    "Message",
    "ModelConfig",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "build_engine",
    "encode_conversation",
    "encode_dataset",
    "generate",
    "get_template",
    "load_conversations",
    "load_tokenizer",
    "plan_epoch",
    "resolve_datasets",
    "train",
]
