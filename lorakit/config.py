"""Typed, frozen configuration.

Every field is a command-line flag of the same name (`--lora_rank 8`) and a key of the same name in a YAML/JSON
config file, so the reference run's flags, a config file and research code all describe a run the same way.
The four groups only organise the fields; names are unique across them, which keeps the flag space flat. The
LoRA group (LoraSettings) lives in lorakit.lora_settings, with its variants.

Checks that need nothing but the values live in `__post_init__`; checks that touch the disk or the hardware
(files exist, bf16 is supported) run in `lorakit.validate` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError
from lorakit.lora_settings import LoraSettings


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": " ".join(text.split()), **extra}


QUANTIZATION_TYPES = ("nf4", "fp4")
# torch.compile's modes (HF's --torch_compile_mode takes the same): "reduce-overhead" and the plain "max-autotune"
# replay each layer's kernels as CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str = field(
        default="", metadata=_doc("Local folder of a Hugging Face causal LM (safetensors).")
    )
    template: str = field(
        default="auto",
        metadata=_doc(
            "Chat format: qwen, qwen3, chatml, llama3, llama3_1, default, or auto (the tokenizer's own chat_template)."
        ),
    )
    strict_template: bool = field(
        default=False,
        metadata=_doc("Stop, instead of warning, when --template renders differently from the tokenizer's own."),
    )
    bf16: bool = field(default=False, metadata=_doc("Train in bfloat16 (needs a GPU that supports it)."))
    fp16: bool = field(default=False, metadata=_doc("Train in float16 with loss scaling (GPU only)."))
    trust_remote_code: bool = field(
        default=False,
        metadata=_doc(
            "Run the Python code a model folder ships (auto_map in its config) to load it; without this, such a "
            "model is refused. Read that code first: it runs in every process of the job."
        ),
    )
    enable_liger_kernel: bool | None = field(
        default=None,
        metadata=_doc(
            "Fused RMSNorm, RoPE and SwiGLU kernels from liger-kernel (lorakit[kernels]); default: on where they "
            "can run (a CUDA GPU, liger-kernel installed, a model family it knows)."
        ),
    )

    quantization_bit: int | None = field(
        default=None,
        metadata=_doc(
            "QLoRA: load the frozen base model quantised to 4 or 8 bits with bitsandbytes, on the fly while "
            "loading (lorakit[qlora], a CUDA GPU; 8 bits not under ZeRO-3); default: not quantised."
        ),
    )
    quantization_method: str = field(
        default="bnb", metadata=_doc("How --quantization_bit quantises: only `bnb` (bitsandbytes).")
    )
    quantization_type: str = field(
        default="nf4", metadata=_doc("The 4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4.")
    )
    double_quantization: bool = field(
        default=True,
        metadata=_doc(
            "4-bit: quantise the quantisation constants too (QLoRA's double quantisation, ~0.4 bit a weight less)."
        ),  # fmt: skip
    )

    torch_compile: bool | None = field(
        default=None,
        metadata=_doc(
            "Compile each decoder layer's forward (and so its backward) with torch.compile (inductor, shapes "
            "dynamic); DeepSpeed's hooks stay outside. Default: on for a CUDA GPU with triton, unless "
            "--quantization_bit, --enable_liger_kernel true, --additional_target or --use_dora is set (the log "
            "says why it is off); with it, --enable_liger_kernel defaults to off (inductor fuses those ops)."
        ),
    )
    torch_compile_mode: str | None = field(
        default=None,
        metadata=_doc(
            "torch.compile's mode for the compiled layers (HF's flag): default, reduce-overhead (each layer's "
            "kernels replayed as CUDA graphs, one per row length), max-autotune or max-autotune-no-cudagraphs. "
            "Setting it compiles the layers. Unset: reduce-overhead under ZeRO-2, and ZeRO-3 keeping every weight "
            "whole, in bf16 with packed rows on a GPU, without gradient checkpointing, offloading, DoRA or modules "
            "trained in full (tested to train as without graphs; 0.188 -> 0.118 s a step at the reference per-GPU "
            "batch on 2 H100s under ZeRO-2, 0.204 -> 0.134 under ZeRO-3), where a rank's forward pass holds on "
            "average at most 2,048 tokens and the memory plan's peak is at most half the free memory, else default "
            "(a log line says which rule); `default` keeps the layers without graphs. Asked for, CUDA graphs fall "
            "back to the mode without them where ZeRO-3 partitions weights, with gradient checkpointing, --packing "
            "false or on a CPU, with a log line (README, CUDA graphs)."
        ),
    )

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise LorakitError("--bf16 and --fp16 are both set; choose one precision")
        if self.quantization_bit not in (None, 4, 8):
            raise LorakitError(f"--quantization_bit {self.quantization_bit} is not supported; bitsandbytes "
                               "quantises to 4 or 8 bits (leave it out to train on the unquantised model)")  # fmt: skip
        if self.quantization_method != "bnb":
            raise LorakitError(f"--quantization_method {self.quantization_method} is not supported; lorakit "
                               "quantises with bitsandbytes only (`bnb`)")  # fmt: skip
        if self.quantization_type not in QUANTIZATION_TYPES:
            raise LorakitError(f"--quantization_type {self.quantization_type} is unknown; use nf4 or fp4")
        if self.torch_compile and self.quantization_bit is not None:  # bitsandbytes' kernels break dynamo's graphs
            raise LorakitError("--torch_compile with --quantization_bit is not supported; drop --torch_compile")
        if self.torch_compile_mode is not None:
            if self.torch_compile_mode not in COMPILE_MODES:
                raise LorakitError(f"--torch_compile_mode {self.torch_compile_mode} is unknown; use one of "
                                   f"{', '.join(COMPILE_MODES)}")  # fmt: skip
            if self.torch_compile is False:
                raise LorakitError("--torch_compile_mode with --torch_compile false: the mode is for compiled "
                                   "layers; drop one of the two")  # fmt: skip
            if self.quantization_bit is not None:
                raise LorakitError("--torch_compile_mode with --quantization_bit is not supported (bitsandbytes' "
                                   "kernels break dynamo's graphs); drop --torch_compile_mode")  # fmt: skip


MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


@dataclass(frozen=True)
class DataConfig:
    dataset: tuple[str, ...] = field(default=(), metadata=_doc("Comma-separated names from dataset_info.json."))
    dataset_dir: str = field(default="data", metadata=_doc("Folder holding dataset_info.json and the data files."))
    cutoff_len: int = field(default=1024, metadata=_doc("Longest example in tokens; longer ones are truncated."))
    max_samples: int | None = field(default=None, metadata=_doc("Use at most this many records of each dataset."))
    data_cache_dir: str = field(
        default="",
        metadata=_doc("Where tokenised data is cached (default: $LORAKIT_CACHE or ~/.cache/lorakit/data)."),
    )
    overwrite_cache: bool = field(default=False, metadata=_doc("Tokenise again even if a cached copy exists."))
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata=_doc("Processes that read and tokenise the data (default: every core this process may use)."),
    )
    val_size: float = field(
        default=0.0,
        metadata=_doc("Hold out this fraction (< 1) or number (>= 1) of records for evaluation, split by --seed."),
    )
    eval_dataset: tuple[str, ...] = field(
        default=(),
        metadata=_doc("Comma-separated names from dataset_info.json to evaluate on (instead of --val_size)."),
    )
    train_on_prompt: bool = field(default=False, metadata=_doc("Train on the prompts too, not only the replies."))
    mask_history: bool = field(
        default=False,
        metadata=_doc("Train only on each conversation's last reply; truncation drops the earliest turns first."),
    )
    system: str | None = field(
        default=None, metadata=_doc('System prompt for every record, replacing its own ("": none at all).')
    )
    default_system: str | None = field(
        default=None,
        metadata=_doc('System prompt for records without one, instead of the template\'s default ("": none).'),
    )
    mix_strategy: str = field(
        default="concat",
        metadata=_doc(
            "How several --dataset make one training set (LLaMA-Factory's names): concat (all of each, in order), "
            "interleave_under (drawn by --interleave_probs until the first dataset runs out) or interleave_over "
            "(until every dataset has run out once: the smaller ones repeat). Draws follow --seed."
        ),
    )
    interleave_probs: tuple[float, ...] = field(
        default=(),
        metadata=_doc(
            "Comma-separated probabilities of drawing from each --dataset, summing to 1, for interleave_under/over "
            "(default: one from each in turn)."
        ),
    )

    def __post_init__(self) -> None:
        if self.cutoff_len < 8:
            raise LorakitError(f"--cutoff_len {self.cutoff_len} is too small; use at least 8 tokens")
        val_size = self.val_size  # nan passes every comparison, then fails as a count of examples at the split
        if not math.isfinite(val_size) or val_size < 0 or (val_size >= 1 and not float(val_size).is_integer()):
            raise LorakitError(f"--val_size {self.val_size} must be a fraction below 1 or a whole number of examples")
        if self.val_size and self.eval_dataset:
            raise LorakitError("--val_size and --eval_dataset both choose the evaluation data; give one")
        if self.max_samples is not None and self.max_samples < 1:
            raise LorakitError(f"--max_samples {self.max_samples} must be at least 1")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise LorakitError(f"--preprocessing_num_workers {self.preprocessing_num_workers} must be at least 1")
        self._check_mixing()

    def _check_mixing(self) -> None:
        if self.mix_strategy not in MIX_STRATEGIES:
            raise LorakitError(f"--mix_strategy {self.mix_strategy} is unknown; use one of {', '.join(MIX_STRATEGIES)}")
        probs = self.interleave_probs
        if not probs:
            return
        given = ",".join(f"{p:g}" for p in probs)
        if self.mix_strategy == "concat":
            raise LorakitError(f"--interleave_probs {given} applies to --mix_strategy interleave_under or "
                               "interleave_over; set one of them or drop --interleave_probs")  # fmt: skip
        if len(probs) != len(self.dataset):
            raise LorakitError(f"--interleave_probs {given} gives {len(probs)} probabilities for {len(self.dataset)} "
                               "--dataset; give one per dataset, in --dataset order")  # fmt: skip
        # 0 would never draw the dataset (and interleave_over would never see it run out): drop it instead
        if not all(math.isfinite(p) and p > 0 for p in probs):
            raise LorakitError(f"--interleave_probs {given}: every probability must be above 0")
        if abs(sum(probs) - 1) > 1e-6:
            raise LorakitError(f"--interleave_probs {given} sums to {sum(probs):g}; the probabilities must sum to 1")

    def for_eval(self) -> DataConfig:
        """These flags for --eval_dataset: its datasets are concatenated, never mixed (every record is evaluated)."""
        return dataclasses.replace(self, dataset=self.eval_dataset, mix_strategy="concat", interleave_probs=())


SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # Hugging Face's --report_to names
REPORT_TO = ("none", *TRACKERS)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = field(default="", metadata=_doc("Where the adapter, tokenizer, logs and checkpoints go."))
    stage: str = field(default="sft", metadata=_doc("Only `sft` (supervised fine-tuning) is supported."))
    do_train: bool = field(default=True, metadata=_doc("Accepted for compatibility; lorakit always trains."))
    deepspeed: str | None = field(
        default=None,
        metadata=_doc('DeepSpeed JSON file; "auto" values are filled in. Default: a ZeRO-3 config built by lorakit.'),
    )
    learning_rate: float = field(default=5e-5, metadata=_doc("Peak learning rate."))
    num_train_epochs: int = field(default=3, metadata=_doc("Whole passes over the data (an integer)."))
    max_steps: int = field(
        default=-1,
        metadata=_doc(
            "Stop after this many optimizer steps (-1: run every epoch); a cap, not HF's override: past the "
            "epochs' end the run ends with them, and the log says so."
        ),
    )
    per_device_train_batch_size: int = field(default=8, metadata=_doc("Examples per micro-batch on each rank."))
    gradient_accumulation_steps: int = field(default=1, metadata=_doc("Micro-batches per optimizer step."))
    lr_scheduler_type: str = field(
        default="cosine", metadata=_doc("`cosine`, `linear` (both decay to 0) or `constant`.")
    )
    warmup_steps: int = field(default=0, metadata=_doc("Linear warmup steps; overrides --warmup_ratio when > 0."))
    warmup_ratio: float = field(default=0.0, metadata=_doc("Warmup as a fraction of all optimizer steps."))
    max_grad_norm: float = field(default=1.0, metadata=_doc("Clip the global gradient norm to this (0: no clipping)."))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_doc("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_doc("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_doc("AdamW epsilon."))
    neftune_noise_alpha: float = field(default=0.0, metadata=_doc("NEFTune embedding noise alpha (0: off)."))
    eval_steps: int = field(
        default=0, metadata=_doc("Evaluate every N optimizer steps (0: only at the end) when there is eval data.")
    )
    logging_steps: int = field(default=10, metadata=_doc("Log every this many optimizer steps."))
    save_steps: int = field(
        default=0, metadata=_doc("Write output_dir/checkpoint-N every N optimizer steps (0: only at the end).")
    )
    save_total_limit: int = field(default=0, metadata=_doc("Keep only the newest K checkpoints (0: keep all)."))
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_doc(
            "A checkpoint folder to continue from, or `auto` for the newest complete one in output_dir whose files "
            "verify."
        ),
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_doc(
            "Start afresh in an output_dir that holds checkpoints (they are deleted) or a finished run's adapter "
            "(replaced at the end)."
        ),
    )
    unpickle_legacy_checkpoint: bool = field(
        default=False,
        metadata=_doc(
            "Resume a checkpoint of lorakit's earlier layout, whose RNG files are pickles: unpickling can run code "
            "hidden in a file (torch's restricted loader is used), and its files cannot be verified. Only for "
            "checkpoints you wrote yourself."
        ),
    )
    packing: bool = field(
        default=True,
        metadata=_doc("Pack examples into long rows (attention never crosses examples); false: padded micro-batches."),
    )
    pack_tokens: int = field(
        default=0,
        metadata=_doc(
            "Tokens per packed row, i.e. per forward pass (0: the longest row free GPU memory allows, see "
            "lorakit.engine.memory; max(--cutoff_len, 4096) on the CPU)."
        ),
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata=_doc(
            "Recompute activations in backward, every layer (default: planned, on the fewest layers "
            "the memory estimate needs, none if it fits without)."
        ),
    )
    zero_stage: int | None = field(
        default=None, metadata=_doc("ZeRO stage 0-3, overriding the DeepSpeed file's (default: the file's, else 3).")
    )
    seed: int = field(default=42, metadata=_doc("Seed for LoRA initialisation, data order and dropout."))
    plot_loss: bool = field(default=False, metadata=_doc("Write training_loss.png (needs matplotlib: lorakit[plot])."))
    report_to: tuple[str, ...] = field(
        default=("none",),
        metadata=_doc(
            "Comma-separated experiment trackers that receive trainer_log.jsonl's scalars and the resolved config: "
            "tensorboard (output_dir/runs/<run_name>), wandb (offline unless WANDB_MODE is set), mlflow (a file "
            "store in output_dir/mlruns unless MLFLOW_TRACKING_URI is set), or none. Each is an extra: "
            "lorakit[tensorboard], lorakit[wandb], lorakit[mlflow]."
        ),
    )
    run_name: str = field(
        default="", metadata=_doc("The run's name in the trackers (default: the name of output_dir's folder).")
    )

    def __post_init__(self) -> None:
        if self.stage != "sft":
            raise LorakitError(f"--stage {self.stage} is not supported; lorakit does supervised fine-tuning (`sft`)")
        if not self.do_train:
            raise LorakitError("--do_train False asks for nothing to do; lorakit only trains (drop the flag)")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise LorakitError(f"--lr_scheduler_type {self.lr_scheduler_type} is unknown; use one of {SCHEDULERS}")
        positive = ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise LorakitError(f"--{name} {getattr(self, name)} must be at least 1")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise LorakitError(f"--learning_rate {self.learning_rate} must be a positive number")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise LorakitError(f"--warmup_ratio {self.warmup_ratio} must be in [0, 1)")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise LorakitError("--resume_from_checkpoint and --overwrite_output_dir contradict each other; choose one")
        if self.unpickle_legacy_checkpoint and not self.resume_from_checkpoint:
            raise LorakitError(
                "--unpickle_legacy_checkpoint applies only to a resume; add --resume_from_checkpoint or drop it"
            )
        if self.pack_tokens and self.pack_tokens < 8:
            raise LorakitError(f"--pack_tokens {self.pack_tokens} is too small")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise LorakitError(f"--zero_stage {self.zero_stage} must be 0, 1, 2 or 3")
        counts = ("pack_tokens", "warmup_steps", "save_steps", "save_total_limit", "max_grad_norm",
                  "neftune_noise_alpha")  # fmt: skip
        for name in (*counts, "weight_decay", "eval_steps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise LorakitError(f"--{name} {value} must be >= 0")
        self._check_optimizer_and_steps()
        self._check_tracking()

    def _check_optimizer_and_steps(self) -> None:
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:  # AdamW's moment averages: 1 or more never forgets or diverges
                raise LorakitError(f"--{name} {getattr(self, name)} must be in [0, 1) (AdamW's default is 0.9/0.999)")
        if not math.isfinite(self.adam_epsilon) or self.adam_epsilon <= 0:
            raise LorakitError(f"--adam_epsilon {self.adam_epsilon} must be a positive number (e.g. 1e-8)")
        # 0 used to mean "no limit" (a whole epoch ran): -1 is the only "no limit", so a typo never trains silently
        if self.max_steps == 0 or self.max_steps < -1:
            raise LorakitError(f"--max_steps {self.max_steps} must be at least 1, or -1 to run every epoch")
        if not 0 <= self.seed < 2**63:  # torch's generators reject negative seeds, at step 0 (after writing)
            raise LorakitError(f"--seed {self.seed} must be a whole number from 0 to {2**63 - 1}")

    def _check_tracking(self) -> None:
        unknown = [name for name in self.report_to if name not in REPORT_TO]
        if unknown:
            raise LorakitError(f"--report_to {','.join(unknown)} is unknown; use none or any of {', '.join(TRACKERS)} "
                               "(comma-separated)")  # fmt: skip
        if "none" in self.report_to and len(self.report_to) > 1:
            raise LorakitError(f"--report_to {','.join(self.report_to)} names trackers and none; drop none")
        if "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
            # tensorboard writes to output_dir/runs/<run_name>: a path here would write outside that folder
            raise LorakitError(f"--run_name {self.run_name} must be a name, not a path (no / or \\, not . or ..)")

    @property
    def trackers(self) -> tuple[str, ...]:
        """--report_to without `none`, each once, in the order given."""
        return tuple(name for name in dict.fromkeys(self.report_to) if name != "none")


GROUPS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    """A whole run. `Config.from_flat({...})` builds one from flag names, as the CLI and config files do."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> Config:
        """Each value read as its flag's would be ("false", "5e-4", "a,b" and typed values alike): research code
        passing {"packing": "false"} gets what `--packing false` gets, not a truthy string."""
        from lorakit.cli import coerce  # the CLI's parsers; it imports this module

        unknown = set(values) - set(flat_fields())
        if unknown:
            raise LorakitError(f"unknown option(s) {sorted(unknown)}; run with --help to list every flag")
        values = {name: coerce(name, value) for name, value in values.items()}
        groups = {}
        for group_name, group_class in GROUPS.items():
            names = {f.name for f in dataclasses.fields(group_class)}
            groups[group_name] = group_class(**{k: v for k, v in values.items() if k in names})
        return cls(**groups)

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for group in dataclasses.fields(self):
            flat.update(dataclasses.asdict(getattr(self, group.name)))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def flat_fields() -> dict[str, dataclasses.Field]:
    """Every configurable field by its flag name, in declaration order."""
    return {f.name: f for group in GROUPS.values() for f in dataclasses.fields(group)}


def pack_tokens_for(config: Config) -> int:
    """Row length for packing (0: packing off): --pack_tokens, else max(--cutoff_len, 4096)."""
    if not config.train.packing:
        return 0
    return config.train.pack_tokens or max(config.data.cutoff_len, 4096)
