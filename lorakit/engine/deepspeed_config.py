"""The DeepSpeed config: a user's file (e.g. the reference's ds_config_zero3.json) with every "auto" resolved.

Rules, so nothing is silently decided against the user:
- "auto" takes its value from the flags or the model: precision, optimizer lr/betas/eps/weight_decay, the three
  batch sizes, gradient_clipping, and ZeRO bucket/persistence sizes (from the hidden size, as HF does).
- An explicit number in the file that contradicts a flag (batch sizes, lr, clipping, precision) is an error that
  names both; lorakit will not guess which one the user meant.
- A `scheduler` section is removed and the log says so: lorakit owns warmup + decay (see lorakit.schedule).
- Any "auto" lorakit does not know how to fill is an error naming its key, not a value passed through.
- Under stage 3, `stage3_module_granularity_threshold` absent or "auto" means lorakit's rule: every decoder layer
  is one ZeRO-3 unit (see lorakit.engine.gather_whole_layers); a number in the file hands the choice to DeepSpeed
  (0: DeepSpeed's per-module gathering). With lorakit's rule, `memory_efficient_linear` defaults to false (why:
  `_resolve_zero`); a value in the file is kept.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lorakit.config import Config
from lorakit.errors import LorakitError


def default_deepspeed_config() -> dict[str, Any]:
    """What lorakit uses without --deepspeed: ZeRO-3 with every size left to lorakit."""
    return {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


def read_deepspeed_file(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise LorakitError(f"--deepspeed {path}: file not found")
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LorakitError(
            f"--deepspeed {path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from None
    if not isinstance(loaded, dict):
        raise LorakitError(f"--deepspeed {path} must hold a JSON object")
    return loaded


def _settle(section: dict[str, Any], key: str, wanted: Any, flag: str, source: str) -> None:
    """Fill an "auto" (or missing) value; reject an explicit one that contradicts the flag."""
    value = section.get(key, "auto")
    if value == "auto":
        section[key] = wanted
    elif value != wanted:
        raise LorakitError(
            f'{source} sets {key}={value} but {flag} gives {wanted}; make them equal or set it to "auto" in the file'
        )


def resolve_deepspeed_config(
    config: Config, world_size: int, hidden_size: int, on_gpu: bool, largest_lora: int = 0
) -> tuple[dict[str, Any], list[str], frozenset[str]]:
    """The resolved config, the log lines that explain what lorakit changed, and the `zero_optimization` keys the
    file left to lorakit ("auto" or absent under stage 3): the memory plan may raise only those."""
    source = f"DeepSpeed file {config.train.deepspeed}" if config.train.deepspeed else "lorakit's default config"
    ds = copy.deepcopy(
        read_deepspeed_file(config.train.deepspeed) if config.train.deepspeed else default_deepspeed_config()
    )
    train, notes = config.train, []
    for key, flag_value in (("bf16", config.model.bf16), ("fp16", config.model.fp16)):
        _settle(ds.setdefault(key, {}), "enabled", flag_value, f"--{key} {flag_value}", source)
    micro, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
    _settle(ds, "train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size", source)
    _settle(ds, "gradient_accumulation_steps", accumulation, "--gradient_accumulation_steps", source)
    _settle(ds, "train_batch_size", micro * accumulation * world_size, "micro x accumulation x world size", source)
    _settle(ds, "gradient_clipping", train.max_grad_norm, "--max_grad_norm", source)
    _resolve_optimizer(ds, config, source)
    scheduler = ds.pop("scheduler", None)
    if scheduler is not None:
        notes.append(
            f"{source}: its scheduler ({scheduler.get('type', '?')}) is replaced by lorakit's schedule "
            f"({train.lr_scheduler_type}, warmup, peak lr {train.learning_rate})"
        )
    zero = ds.setdefault("zero_optimization", {"stage": 3})
    if train.zero_stage is not None and zero.get("stage", 0) != train.zero_stage:
        notes.append(f"{source}: ZeRO stage {zero.get('stage', 0)} replaced by --zero_stage {train.zero_stage}")
        zero["stage"] = train.zero_stage
    filled = _resolve_zero(zero, hidden_size, largest_lora)
    ds.setdefault("steps_per_print", 10**9)  # lorakit prints its own progress
    _reject_leftover_auto(ds, source)
    check_with_deepspeed(ds, source)
    return ds, notes, filled


SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization.", "DeepSpeedBF16Config": "bf16.", "DeepSpeedFP16Config": "fp16."}


def check_with_deepspeed(ds: dict[str, Any], source: str) -> None:
    """The resolved config through DeepSpeed's own pydantic models (DeepSpeedConfig, which validates each section,
    ZeRO's included), so a value DeepSpeed rejects (`"stage": 4`) is one line now rather than a traceback after
    the model is loaded. train_batch_size is left out: DeepSpeed checks it against the world size, which has no
    process group yet; lorakit set it from the flags above."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig({k: v for k, v in ds.items() if k != "train_batch_size"})
    except ValidationError as err:
        first = err.errors()[0]
        where = SECTIONS.get(err.title, f"{err.title}: ") + ".".join(str(part) for part in first["loc"])
        raise LorakitError(
            f"{source}: {where}={first.get('input')!r} is rejected by DeepSpeed's config schema: {first['msg']}; "
            "fix that value in the file"
        ) from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:  # DeepSpeed's checks beyond the schema
        raise LorakitError(f"{source} is rejected by DeepSpeed: {' '.join(str(err).split()) or type(err).__name__}; "
                           "fix the file") from None  # fmt: skip


def _resolve_optimizer(ds: dict[str, Any], config: Config, source: str) -> None:
    train = config.train
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if optimizer.get("type", "").lower() not in ("adam", "adamw"):
        raise LorakitError(f"{source}: optimizer type {optimizer.get('type')} is unsupported; use AdamW")
    params = optimizer.setdefault("params", {})
    _settle(params, "lr", train.learning_rate, "--learning_rate", source)
    _settle(params, "betas", [train.adam_beta1, train.adam_beta2], "--adam_beta1/--adam_beta2", source)
    _settle(params, "eps", train.adam_epsilon, "--adam_epsilon", source)
    _settle(params, "weight_decay", train.weight_decay, "--weight_decay", source)
    # torch's AdamW everywhere: LoRA's optimizer state is tiny, and DeepSpeed's fused Adam is a CUDA extension
    # compiled on first use (one to two minutes on every fresh machine) that does not exist on the CPU at all.
    params.setdefault("torch_adam", True)


GRANULARITY = "stage3_module_granularity_threshold"


LAYERS_LIVE = 4  # the layer computing, the next one gathered ahead, two kept across the forward/backward turn


def gather_next_layer_ahead(ds_config: dict[str, Any], layer_weights: int,
                            prefetch_is_lorakits: bool) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Under ZeRO-3 with whole-layer units and partitioned frozen weights: DeepSpeed prefetches the next layer's
    gather while this layer computes only up to `stage3_prefetch_bucket_size` weights and within
    `stage3_max_live_parameters`. HF's bucket (0.9 x hidden^2: a twentieth of a Qwen2.5-32B layer) and the reference
    file's live budget (1e9: two 32B layers) left 87 % of the forward's weights (81 % of the backward's) fetched on
    demand, the GPU waiting for each gather; with a bucket of one layer and a budget of LAYERS_LIVE layers none were
    (counted on 2 gloo ranks, benchmarks/RESULTS.md session 11). So the bucket, where the file leaves it to lorakit,
    is one layer, and a live budget below LAYERS_LIVE layers is raised to it, with a line (lorakit.engine.memory
    budgets those four layers anyway). Nothing changes where a stage3_module_granularity_threshold hands the units
    to DeepSpeed, or where the persistence threshold keeps every decoder weight whole."""
    zero = ds_config.get("zero_optimization", {})
    threshold = zero.get("stage3_param_persistence_threshold", 0)
    prefetch_off = not prefetch_is_lorakits and not zero.get("stage3_prefetch_bucket_size")  # the file's 0: its call
    if not lorakit_chooses_units(ds_config) or layer_weights <= 0 or threshold >= layer_weights or prefetch_off:
        return ds_config, []
    changed = copy.deepcopy(ds_config)
    settings = changed["zero_optimization"]
    said = []
    if prefetch_is_lorakits:
        settings["stage3_prefetch_bucket_size"] = layer_weights
        said.append(f"stage3_prefetch_bucket_size one layer ({layer_weights:,} weights)")
    live, needed = settings.get("stage3_max_live_parameters", 10**9), LAYERS_LIVE * layer_weights
    if live < needed:
        settings["stage3_max_live_parameters"] = needed
        said.append(f"stage3_max_live_parameters {live:.3g} -> {needed:,} ({LAYERS_LIVE} layers: below that DeepSpeed "
                    "prefetches only part of the next one)")  # fmt: skip
    if not said:
        return ds_config, []
    return changed, [f"ZeRO-3: the next decoder layer is gathered while one computes: {'; '.join(said)}"]


def offloaded(zero: dict[str, Any]) -> bool:
    """Whether the ZeRO section offloads the optimizer or the parameters (to the CPU or NVMe)."""
    offloads = [zero.get(key) for key in ("offload_optimizer", "offload_param", "cpu_offload")]
    return any(o.get("device", "none") not in ("none", None) if isinstance(o, dict) else bool(o) for o in offloads)


ALL_REDUCE_FETCH = "stage3_use_all_reduce_for_fetch_params"


def fetch_layers_by_all_reduce(ds_config: dict[str, Any], quantized: bool, one_host: bool,
                               one_dtype: bool) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Under ZeRO-3 with whole-layer units and partitioned frozen weights, where the file does not say: each layer's
    gather as DeepSpeed's all-reduce fetch (`stage3_use_all_reduce_for_fetch_params`). Its coalesced all-gather
    receives a layer rank by rank into one buffer and then copies every weight's slices out of it (1,021 copies, 0.135
    s of a Qwen2.5-32B step on 4 H100s: RESULTS.md session 13); the all-reduce has each rank write its partitions at
    every weight's own offset of a zeroed buffer and sums the buffers, so each weight is a view, for twice the traffic.
    Exact: each element is one rank's value plus zeros. Measured on the 32B, 4 H100s, the same lease: 1.398 against
    1.532 s a step (RESULTS.md session 14). Not under QLoRA (its GPU tests ran with the all-gather), across hosts
    (measured over NVLink only; twice the traffic over a network may cost more than the copies), with offloaded
    parameters (not measured), or where a layer keeps weights of another dtype (`one_dtype` false: a model's
    `_keep_in_fp32_modules`), which DeepSpeed's all-reduce fetch, one buffer of one dtype, refuses."""
    zero = ds_config.get("zero_optimization", {})
    if (quantized or not one_host or not one_dtype or offloaded(zero) or not lorakit_chooses_units(ds_config)
            or ALL_REDUCE_FETCH in zero):  # fmt: skip
        return ds_config, []
    changed = copy.deepcopy(ds_config)
    changed["zero_optimization"][ALL_REDUCE_FETCH] = True
    line = (f"ZeRO-3: each layer is fetched by an all-reduce into place, not an all-gather and a copy "
            f"({ALL_REDUCE_FETCH} false in the DeepSpeed file keeps the all-gather)")  # fmt: skip
    return changed, [line]


def reduce_adapter_gradients_in_place(ds_config: dict[str, Any], trained_full: int,
                                      quantized: bool) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Under ZeRO-3 with only the adapter trained: `contiguous_gradients` off, whatever the file says. With
    `reduce_scatter` on (the default), stage 3 copies each gradient into its reduce bucket as it is produced (a
    stream switch, a copy and a record_stream from Python, per LoRA matrix: 392 a Qwen2.5-7B step) and then
    reduce-scatters the gradients one by one all the same (DeepSpeed 0.19's `__reduce_and_partition_ipg_grads`
    reads the bucket only with reduce_scatter off), so the copies change no number; they guard against
    fragmentation by large gradients, and an adapter's are 40 MB. Measured: 0.2255 -> 0.164 / 0.187 s a step at
    the reference per-GPU batch on 2 H100s (RESULTS.md session 14). Left as the file says with modules trained in
    full (--additional_target: large gradients), an offloaded optimizer or parameters, or QLoRA (its GPU tests ran
    with the copies)."""
    zero = ds_config.get("zero_optimization", {})
    if (zero.get("stage") != 3 or not zero.get("contiguous_gradients", True) or not zero.get("reduce_scatter", True)
            or trained_full or quantized or offloaded(zero)):  # fmt: skip
        return ds_config, []
    changed = copy.deepcopy(ds_config)
    changed["zero_optimization"]["contiguous_gradients"] = False
    return changed, ["ZeRO-3: contiguous_gradients off (the DeepSpeed file's true): with reduce_scatter on, stage 3 "
                     "copies each adapter gradient into its bucket and then reduce-scatters them one by one anyway; "
                     "the same numbers without the copies (lorakit.engine.deepspeed_config)"]  # fmt: skip


OVERFLOW_CHECK = "check_grad_overflow"


def deepspeed_has_overflow_switch() -> bool:
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return OVERFLOW_CHECK in DeepSpeedBF16Config.model_fields


def leave_overflow_check_to_lorakit(ds_config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Under ZeRO stage 1 or 2 in bf16, where the file's `bf16` section does not say: DeepSpeed's
    `bf16.check_grad_overflow` off. With it on, stage 1/2's every step tests each gradient partition for inf/NaN
    (about seven small kernels a tensor, launched from Python: a rank's share of 392 LoRA matrices on a Qwen2.5-7B,
    167 ms of the CPU in 5 steps under cProfile on 2 H100s, RESULTS.md session 16), all-reduces the result and
    reads it on the host, a wait for the GPU every step; under stage 3 or in fp32 DeepSpeed does not check.
    lorakit checks the loss and the gradient norm of every step on the device (lorakit.agreement) and stops the run
    without saving at the first non-finite one, so what changes is only what that step does before the stop:
    DeepSpeed applies it instead of skipping it (an `on_step` hook of that step, and research code that catches the
    error, see the weights it left). Kept: under fp16 (its loss scaling needs the skip); with `check_grad_overflow`
    in the file; with `compute_grad_norm: false` (no norm for lorakit to check: the step's non-finite gradient would
    reach a checkpoint a step before its loss showed it); under stage 1 with fp32 gradient accumulation (DeepSpeed's
    BF16_Optimizer runs it, which has no such switch); with a DeepSpeed whose bf16 section lacks the key (older than
    lorakit's tested 0.19: it forbids unknown keys)."""
    bf16, zero = ds_config.get("bf16", {}), ds_config.get("zero_optimization", {})
    accumulation = ds_config.get("data_types", {}).get("grad_accum_dtype")
    if (zero.get("stage", 0) not in (1, 2) or bf16.get("enabled") is not True or OVERFLOW_CHECK in bf16
            or zero.get("compute_grad_norm", True) is False
            or (zero["stage"] == 1 and accumulation not in (None, "bf16", "bfloat16"))
            or not deepspeed_has_overflow_switch()):  # fmt: skip
        return ds_config, []
    changed = copy.deepcopy(ds_config)
    changed["bf16"][OVERFLOW_CHECK] = False
    line = (f"ZeRO-{zero['stage']}: DeepSpeed's per-gradient overflow check off (bf16.{OVERFLOW_CHECK}); lorakit "
            "stops the run at a non-finite loss or gradient norm without saving (lorakit.agreement)")  # fmt: skip
    return changed, [line]


def deepspeed_linear_runs(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed's memory-efficient linear replaces torch's (its default; lorakit's whole-layer units turn it
    off, see _resolve_zero): it decides the model's F.linear and the activations the memory plan counts."""
    return ds_config["zero_optimization"].get("memory_efficient_linear", True) is not False


def lorakit_chooses_units(ds_config: dict[str, Any]) -> bool:
    """Whether ZeRO-3 gathers whole decoder layers by lorakit's rule (the file left the granularity to lorakit)."""
    zero = ds_config.get("zero_optimization", {})
    return zero.get("stage") == 3 and GRANULARITY not in zero


def automatic_persistence_threshold(hidden_size: int, largest_lora: int) -> int:
    """lorakit's "auto" persistence threshold: norms, biases and the whole adapter stay resident (see below).
    The memory plan may raise it to keep every frozen weight resident (lorakit.engine.memory)."""
    return max(10 * hidden_size, largest_lora + 1)


def zero3_partitions(ds_config: dict[str, Any], largest_weight: int, weights: int) -> str | None:
    """Why ZeRO-3 will keep some weight partitioned, forecast from the DeepSpeed config before the engine exists, or
    None where it keeps every weight gathered on every GPU (or the config is not stage 3). DeepSpeed marks a weight
    persistent (whole) where it has at most `stage3_param_persistence_threshold` elements and the persistent ones
    so far stay within `stage3_model_persistence_threshold` (parameter_offload.mark_persistent_parameters), so:
    `largest_weight` within the threshold (the memory plan's keep_frozen_weights_resident raises it above the model
    where the frozen weights fit), `weights` (the model's, with any trained in full) within the cap, and no parameter
    offloading. The LoRA matrices also count against the cap; build_engine checks the forecast on the built engine
    (skip_unit_hooks_when_all_resident)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return None
    if offloaded({"offload_param": zero.get("offload_param")}):
        return "ZeRO-3 offloads the parameters (offload_param)"
    threshold, cap = zero.get("stage3_param_persistence_threshold", 0), zero.get("stage3_model_persistence_threshold")
    if not isinstance(threshold, (int, float)) or threshold < largest_weight:
        return (
            f"ZeRO-3 partitions the weights above stage3_param_persistence_threshold ({threshold}; the largest "
            f"has {largest_weight:,} elements), as the memory plan does where they do not fit whole"
        )
    if cap is not None and (not isinstance(cap, (int, float)) or cap < weights):
        return f"ZeRO-3 partitions what exceeds stage3_model_persistence_threshold ({cap}; the model has {weights:,})"
    return None


def reduce_gradients_on_compute_stream(ds_config: dict[str, Any], graphs: bool) -> tuple[dict[str, Any], list[str]]:
    """Under ZeRO-3 with CUDA graphs (`graphs`: the layers replay them): `overlap_comm` off, and the log line
    (nothing where it is off already, or without graphs). Stage 3 copies each gradient into its reduce bucket on a
    reduction stream of its own (`overlap_comm`), then drops the gradient the backward produced. A replayed graph's
    gradient lives in the graphs' memory pool, which the next layer's backward replay may write at once on the
    compute stream, not waiting for that copy (the caching allocator's record_stream does not cover the pool). With
    `overlap_comm` off, stage 3's reduction stream is the compute stream, so the copy comes before the next replay;
    ZeRO-2 copies on the compute stream either way. What it costs is the overlap of a LoRA gradient reduction (~2
    bytes a LoRA weight a step) with the backward."""
    zero = ds_config.get("zero_optimization", {})
    if not graphs or zero.get("stage") != 3 or not zero.get("overlap_comm", True):  # absent: stage 3's default, on
        return ds_config, []
    changed = copy.deepcopy(ds_config)
    changed["zero_optimization"]["overlap_comm"] = False
    return changed, ["ZeRO-3 with CUDA graphs: overlap_comm -> false (each gradient is copied into the reduce "
                     "bucket on the compute stream, before the next graph replay may reuse its memory)"]  # fmt: skip


def keep_frozen_weights_resident(ds_config: dict[str, Any], parameters: int) -> dict[str, Any]:
    """The config with a persistence threshold above every parameter: ZeRO-3 gathers each weight once and keeps it,
    while the adapter's optimizer state and gradients stay partitioned."""
    resident = copy.deepcopy(ds_config)
    resident["zero_optimization"]["stage3_param_persistence_threshold"] = parameters + 1
    return resident


def _resolve_zero(zero: dict[str, Any], hidden_size: int, largest_lora: int) -> frozenset[str]:
    # HF's choices for the buckets (one hidden x hidden matrix); where lorakit gathers whole decoder layers and the
    # frozen weights stay partitioned, the prefetch bucket becomes one layer (gather_next_layer_ahead).
    # Parameters below the persistence threshold are
    # never partitioned: HF's ten hidden vectors cover norms and biases; lorakit raises it past the largest LoRA
    # matrix (r x intermediate for the MLP projections, 151,552 for Qwen2.5-7B at r=8), so the adapter stays
    # resident instead of being gathered for every use. No frozen weight matrix is that small.
    automatic = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": automatic_persistence_threshold(hidden_size, largest_lora),
    }
    # left to lorakit: "auto", or absent under stage 3 (HF's rule for these sizes)
    filled = frozenset(k for k in automatic if zero.get(k) == "auto" or (k not in zero and zero.get("stage") == 3))
    zero.update({key: automatic[key] for key in filled})
    if zero.get(GRANULARITY) == "auto":  # lorakit's rule (whole decoder layers) is the absence of the key
        zero.pop(GRANULARITY)
    if zero.get("stage") == 3 and GRANULARITY not in zero:
        # DeepSpeed's memory-efficient linear replaces torch's F.linear, process-wide, with a Python autograd
        # function that saves every linear's input and re-fetches its weight in backward, so a partitioned weight
        # may be released between a module's forward and backward. lorakit gathers a whole layer before its
        # backward begins, so torch's own linear is correct, and it saves ~600 Python autograd calls a step
        # (LoRA's linears included) and the saved inputs (benchmarks/RESULTS.md, session 3). But torch's linear
        # saves a view of its weight, which keeps a released gathered weight alive until backward: the frozen
        # linears outside compiled layers run lorakit.engine.frozen_linear instead (the weight itself saved).
        zero.setdefault("memory_efficient_linear", False)
    if zero.get("stage") != 3:  # stage-3-only keys would make DeepSpeed warn about settings it ignores
        for key in [k for k in zero if k.startswith("stage3_")]:
            zero.pop(key)
    return filled


def _reject_leftover_auto(node: Any, source: str, path: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_leftover_auto(value, source, f"{path}.{key}" if path else key)
    elif node == "auto":
        raise LorakitError(f'{source}: lorakit does not know how to fill "{path}": "auto"; give it a value')
