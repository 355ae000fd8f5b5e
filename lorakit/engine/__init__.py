"""The engine: base model (partitioned under ZeRO-3) + PEFT LoRA, wrapped by DeepSpeed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.config import Config
from lorakit.distributed import DistInfo
from lorakit.engine.deepspeed_config import (
    deepspeed_linear_runs,
    default_deepspeed_config,
    fetch_layers_by_all_reduce,
    gather_next_layer_ahead,
    keep_frozen_weights_resident,
    lorakit_chooses_units,
    offloaded,
    reduce_gradients_on_compute_stream,
    resolve_deepspeed_config,
    zero3_partitions,
)
from lorakit.engine.frozen_linear import save_frozen_weights_by_reference
from lorakit.engine.jit import clear_stale_build_locks, settle_cuda_arch_list, watch_build_locks
from lorakit.engine.kernels import (
    CUDA_GRAPH_MODES,
    apply_liger_kernel,
    compile_decoder_layers,
    inductor_cache_beside_data,
    settle_compile_mode,
    use_liger_kernel,
    use_torch_compile,
)
from lorakit.engine.memory import plan_memory
from lorakit.engine.model import (
    add_neftune_noise,
    attach_lora,
    decoder_layers,
    linear_module_names,
    load_base_model,
    load_tokenizer,
    model_config,
    parameter_counts,
    recompute_first_layers_only,
)
from lorakit.engine.plan import EnginePlan, compute_dtype, plan_engine
from lorakit.engine.quantization import describe
from lorakit.engine.streams import answer_current_stream_directly
from lorakit.engine.variants import initial_adapter
from lorakit.engine.warmup import WarmupSpec
from lorakit.engine.zero3 import (
    gather_released_residents_before_forward,
    gather_updated_adapter_at_once,
    gather_whole_layers,
    keep_first_layers_whole,
    keep_resident_weights,
    quiet_deepspeed_bookkeeping,
    remember_module_parameters,
    skip_unit_hooks_when_all_resident,
    walk_only_parameter_owners,
)
from lorakit.pissa import PissaStart


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine; engine.module is the PeftModel
    ds_config: dict[str, Any]
    notes: list[str]  # what lorakit changed in the DeepSpeed config, for the log
    trainable_parameters: int
    total_parameters: int
    pissa: PissaStart | None = None  # PiSSA's initial adapter and --pissa_convert, for every save
    # every weight stays where it is between steps (ZeRO-1/2, or ZeRO-3 keeping every frozen weight whole): the
    # layers may run eager while the compile warm-up finishes (lorakit.engine.warmup.CompileSwitch)
    weights_stay_gathered: bool = True


def plan_run_memory(
    config: Config, dist: DistInfo, engine: EnginePlan, step_tokens: int = 0, mean_share: int = 0
) -> tuple[Config, EnginePlan, list[str]]:
    """The config with --pack_tokens 0 and --gradient_checkpointing unset settled from the smallest free GPU
    memory of any rank (lorakit.engine.memory), the engine plan (under ZeRO-3 with frozen weights that fit, a
    persistence threshold that keeps them whole), and the plan's log lines. The only fact it adds to the engine
    plan is the free memory, which needs the ranks. `step_tokens`: the most tokens a rank gets in one step
    (0: unknown); `mean_share`: its mean, kept in the plan (CUDA graphs' default reads it)."""
    free = None
    if dist.device.type == "cuda":  # every rank is on a GPU, so every rank joins this collective
        free = int(-dist.max([-float(torch.cuda.mem_get_info(dist.device)[0])])[0])
    train = config.train
    batch_tokens = 0 if train.packing else train.per_device_train_batch_size * config.data.cutoff_len
    plan = plan_memory(engine.shape, free, engine.zero3, dist.world_size, config.data.cutoff_len, train.pack_tokens,
                       train.gradient_checkpointing, batch_tokens, step_tokens, engine.automatic_persistence,
                       deepspeed_linear_runs(engine.ds_config))  # fmt: skip
    train = dataclasses.replace(train, pack_tokens=plan.pack_tokens, gradient_checkpointing=plan.gradient_checkpointing)
    engine = dataclasses.replace(engine, checkpointed_layers=plan.checkpointed_layers,
                                 resident_layers=plan.resident_layers, peak_share=plan.peak_share,
                                 mean_step_share=mean_share)  # fmt: skip
    lines = plan.lines
    if plan.keep_frozen:
        ds_config = keep_frozen_weights_resident(engine.ds_config, engine.shape.parameters)
        engine = dataclasses.replace(engine, ds_config=ds_config, automatic_persistence=False)
    elif engine.zero3:
        ds_config, said = gather_next_layer_ahead(engine.ds_config, engine.shape.largest_layer,
                                                  engine.automatic_prefetch)  # fmt: skip
        ds_config, by_all_reduce = fetch_layers_by_all_reduce(ds_config, engine.shape.quantized > 0, dist.on_one_host,
                                                              not engine.fp32_modules)  # fmt: skip
        said += by_all_reduce
        engine, lines = dataclasses.replace(engine, ds_config=ds_config), [*lines, *said]
    return dataclasses.replace(config, train=train), engine, lines


def stage2_hint(frozen_bytes: int, device: torch.device, kept_whole: bool) -> list[str]:
    """One line when the frozen model (`frozen_bytes` as stored: lorakit.engine.memory.ModelShape.weight_bytes)
    would fit whole on each GPU: stage 3 stays (the user asked for it), but stage 2 would skip ZeRO-3's hooks, and
    its gathers where the weights are partitioned (RESULTS.md)."""
    model_gib, free_gib = frozen_bytes / 2**30, torch.cuda.mem_get_info(device)[0] / 2**30
    if model_gib > 0.5 * free_gib:
        return []
    skipped, gain = (("ZeRO-3's per-step bookkeeping", "its tokens/s against ZeRO-3's")
                     if kept_whole else ("ZeRO-3's gathers and hooks", "2.7x the tokens/s on 4 H200s"))  # fmt: skip
    return [f"ZeRO-3 as asked; the frozen model ({model_gib:.1f} GiB as stored) fits on each GPU ({free_gib:.0f} GiB "
            f"free): --zero_stage 2 would skip {skipped} ({gain}: benchmarks/RESULTS.md)"]  # fmt: skip


def parameter_groups(model: Any, loraplus_lr_ratio: float | None) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one, or with LoRA+ two, the lora_B matrices' group carrying
    `lr_multiplier` (the ratio), which lorakit's schedule (train.set_learning_rate) applies at every step."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        return [{"params": [p for _, p in named], "lr_multiplier": 1.0}]
    b = [p for name, p in named if ".lora_B." in name]
    rest = [p for name, p in named if ".lora_B." not in name]
    return [{"params": rest, "lr_multiplier": 1.0}, {"params": b, "lr_multiplier": float(loraplus_lr_ratio)}]


def build_engine(config: Config, dist: DistInfo, plan: EnginePlan | None = None) -> BuiltEngine:
    """Load the model, attach LoRA and hand both to DeepSpeed, as `plan` (from lorakit.validate) says; on its
    own (no plan) it reads the model's config and resolves the DeepSpeed config first."""
    import deepspeed

    on_gpu, trust = dist.device.type == "cuda", config.model.trust_remote_code
    if plan is None:
        plan = plan_engine(config, model_config(config.model.model_name_or_path, trust), dist.world_size, on_gpu)
    hf_config, ds_config, zero3, notes = plan.hf_config, plan.ds_config, plan.zero3, list(plan.ds_notes)
    notes += settle_cuda_arch_list() + clear_stale_build_locks()  # before deepspeed.initialize, which may build an op
    whole_layers = zero3 and lorakit_chooses_units(ds_config)
    quantized = config.model.quantization_bit is not None
    model = load_base_model(config.model.model_name_or_path, hf_config, compute_dtype(config), ds_config, zero3,
                            dist.rank, trust, (config.model, dist.device) if quantized else None)  # fmt: skip
    if quantized:
        notes.append(f"QLoRA: the base model's linear layers quantised to {describe(config.model)} by "
                     f"bitsandbytes while loading{', then partitioned by ZeRO-3' if zero3 else ''}")  # fmt: skip
    if config.train.gradient_checkpointing:  # settled by plan_run_memory, or asked for
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recompute_first_layers_only(model, plan.checkpointed_layers)
    compiled, mode, compile_lines = compile_choice(config, plan, on_gpu)
    ds_config, said = reduce_gradients_on_compute_stream(ds_config, graphs=compiled and mode in CUDA_GRAPH_MODES)
    notes += said
    liger_flag = config.model.enable_liger_kernel  # unset: off under torch.compile, whose inductor fuses the same ops
    liger, lines = use_liger_kernel(False if liger_flag is None and compiled else liger_flag, hf_config.model_type)
    notes += (apply_liger_kernel(model) if liger else lines) + compile_lines
    model = attach_lora(model, config.lora, config.train.seed, dist.device)
    pissa = None
    if config.lora.pissa_init:  # the starting point, before DeepSpeed partitions the adapter
        pissa = PissaStart(initial_adapter(model), config.lora.pissa_convert is not False)
    if config.train.neftune_noise_alpha > 0:
        add_neftune_noise(model, config.train.neftune_noise_alpha)
    if whole_layers:
        notes += gather_whole_layers(model)
    trainable, total = parameter_counts(model)
    if zero3 and on_gpu:  # counted from the loaded model: no second skeleton
        kept_whole = ds_config["zero_optimization"].get("stage3_param_persistence_threshold", 0) > total - trainable
        notes += stage2_hint(plan.shape.weight_bytes, dist.device, kept_whole)
    trainable_params = parameter_groups(model, config.lora.loraplus_lr_ratio)
    if zero3:
        remember_module_parameters()
        quiet_deepspeed_bookkeeping()
    if on_gpu:
        answer_current_stream_directly()
    with watch_build_locks():  # a line after a minute, should another process's build lock keep this one waiting
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable_params, config=ds_config)
    stay = True
    if zero3:
        notes_zero3, stay = settle_zero3_engine(engine, plan.resident_layers)
        notes += notes_zero3
    if zero3 and not (stay or quantized or deepspeed_linear_runs(ds_config)):  # let the forward free released weights
        notes += save_frozen_weights_by_reference(engine.module, decoder_layers(engine.module) if compiled else [])
    if compiled:  # on the engine's module: the model as DeepSpeed runs it (its hooks outside each compiled layer)
        mode, said = graphs_only_if_weights_stay(mode, stay)
        notes += said + inductor_cache_beside_data() + compile_decoder_layers(engine.module, mode=mode)
    return BuiltEngine(engine, ds_config, notes, trainable, total, pissa, stay)


def settle_zero3_engine(engine: Any, resident_layers: int) -> tuple[list[str], bool]:
    """lorakit's ZeRO-3 changes to a built engine (lorakit.engine.zero3), in the order they need, their log lines
    and whether every weight stays gathered: the plan's resident layers, the adapter kept gathered across steps,
    parameter walks cut to their owners, and either the unit hooks off (every weight resident) or released
    residents gathered before each forward."""
    notes = keep_first_layers_whole(engine, resident_layers)
    if keep_resident_weights(engine, refreshed := gather_updated_adapter_at_once(engine)) and refreshed:
        notes.append(
            f"ZeRO-3: the {len(refreshed)} adapter weights stay gathered; each step refreshes them in "
            "place from DeepSpeed's updated partitions (one all-gather)"
        )
    walk_only_parameter_owners(engine)
    if skip_unit_hooks_when_all_resident(engine):
        notes.append(
            "ZeRO-3: every weight stays gathered between steps, so the per-layer fetch and release "
            "hooks are off (DeepSpeed's gradient reduction and the adapter's re-gather stay)"
        )
        return notes, True
    gather_released_residents_before_forward(engine)
    return notes, False


def graphs_only_if_weights_stay(mode: str, stay: bool) -> tuple[str, list[str]]:
    """The compile mode once the engine is built, and a log line where it changed: a CUDA graphs mode becomes the same
    mode without graphs where ZeRO-3 left some weights partitioned after all (`stay` false: compile_choice's forecast,
    deepspeed_config.zero3_partitions, missed), since each such weight is gathered into new memory at every use and a
    graph replays the addresses it recorded. `overlap_comm`, turned off for the graphs before the engine was built,
    stays off."""
    if mode not in CUDA_GRAPH_MODES or stay:
        return mode, []
    fallback = CUDA_GRAPH_MODES[mode]
    return fallback, [
        f"torch.compile: mode {fallback}, not {mode} (ZeRO-3 left some weights partitioned after all, "
        "each gathered into new memory at every use: a CUDA graph replays the addresses it recorded; overlap_comm "
        "stays off, and the compile warm-up's graphs-mode kernels do not serve this mode: the layers compile at the "
        "switch)"
    ]


def compile_choice(config: Config, plan: EnginePlan, on_gpu: bool) -> tuple[bool, str, list[str]]:
    """Whether the decoder layers are compiled, in which torch.compile mode, and the log lines saying so
    (lorakit.engine.kernels.use_torch_compile and settle_compile_mode), from the settled config and engine plan."""
    zero3 = plan.zero3
    per_module_units = zero3 and not lorakit_chooses_units(plan.ds_config)
    compiled, lines = use_torch_compile(config.model, config.lora, per_module_units, on_gpu)
    if not compiled:
        return False, "default", lines
    shape = plan.shape
    partitioned = zero3_partitions(plan.ds_config, shape.largest_weight, shape.parameters + shape.trained_full)
    mode, mode_lines = settle_compile_mode(config.model.torch_compile_mode, partitioned,
                                           bool(config.train.gradient_checkpointing), config.train.packing, on_gpu,
                                           graphs_by_default=graphs_by_default(config, plan),
                                           peak_share=plan.peak_share,
                                           pass_tokens=mean_pass_tokens(plan.mean_step_share,
                                                                        config.train.pack_tokens))  # fmt: skip
    return True, mode, lines + mode_lines


def graphs_by_default(config: Config, plan: EnginePlan) -> bool:
    """Whether CUDA graphs may be the run's default: a run tests/engine/test_cuda_graphs.py trains under graphs on
    GPUs, under ZeRO stage 2 or 3 (stages 0 and 1 run DeepSpeed's other bf16 optimizer; under stage 3 only where every
    weight stays whole, which settle_compile_mode checks), in bf16, nothing offloaded, plain LoRA (a DoRA magnitude
    or a module trained in full, compiled because --torch_compile true asked, is not in it). Under ZeRO-3 since
    session 19: the 1,170-step job at the reference per-GPU batch on 2 H100s took 183 s with graphs against 219 s
    without, before each new row length was recorded ~3x faster (lorakit.engine.graph_trees) and the warm-up process
    compiled their kernels; where a pass is long they gain nothing (kernels.GRAPHS_MAX_PASS_TOKENS)."""
    zero = plan.ds_config.get("zero_optimization", {})
    lora = config.lora
    return (zero.get("stage", 0) in (2, 3) and compute_dtype(config) == torch.bfloat16 and not offloaded(zero)
            and not lora.use_dora and not lora.additional_target)  # fmt: skip


def mean_pass_tokens(mean_step_share: int, pack_tokens: int) -> int:
    """A rank's mean tokens in one forward pass: its mean share of a step, in as many rows of at most `pack_tokens`
    as it takes (0: unknown)."""
    if not mean_step_share or not pack_tokens:
        return mean_step_share
    return mean_step_share // -(-mean_step_share // pack_tokens)


def compile_warmup(config: Config, plan: EnginePlan, device: torch.device, step_tokens: int,
                   evaluates: bool = False) -> WarmupSpec | None:  # fmt: skip
    """The warm-up process's settings (lorakit.engine.warmup), or None where none runs: the layers not compiled, no
    GPU, packing off (padded batches call the layers with another mask), or Liger's kernels asked for beside
    --torch_compile (the warm-up's layer has none). It compiles the run's settled mode, CUDA graphs' included (they
    are recorded in the run). `step_tokens`: a rank's largest share of a step, the row's length hint; `evaluates`:
    the run holds out data to evaluate on (an evaluation pass compiles its own graph)."""
    compiled, mode, _ = compile_choice(config, plan, device.type == "cuda")
    liger = config.model.enable_liger_kernel is True  # asked for beside --torch_compile: another layer
    if not (compiled and device.type == "cuda" and config.train.packing) or liger:
        return None
    recomputed = (plan.checkpointed_layers or plan.shape.layers) if config.train.gradient_checkpointing else None
    row_tokens = max(128, min(config.train.pack_tokens, step_tokens or config.train.pack_tokens) // 128 * 128)
    dtype = str(compute_dtype(config)).removeprefix("torch.")
    return WarmupSpec(config.model.model_name_or_path, config.model.trust_remote_code, dtype,
                      dataclasses.asdict(config.lora), config.train.seed, recomputed, row_tokens,
                      str(device), zero3=plan.zero3, evaluates=evaluates, mode=mode)  # fmt: skip


__all__ = [
    "BuiltEngine",
    "EnginePlan",
    "add_neftune_noise",
    "attach_lora",
    "build_engine",
    "compute_dtype",
    "default_deepspeed_config",
    "linear_module_names",
    "load_base_model",
    "load_tokenizer",
    "model_config",
    "parameter_counts",
    "plan_engine",
    "parameter_groups",
    "plan_run_memory",
    "resolve_deepspeed_config",
]
