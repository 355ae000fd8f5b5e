"""The base model and its LoRA adapter.

Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, so every weight is partitioned across ranks as
soon as its module exists and a 7B model never sits whole on one rank; rank 0 then streams the safetensors
shards in, one module at a time. lorakit does this itself rather than through transformers' DeepSpeed
integration, which needs accelerate and a process-global config object.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorakit.config import LoraSettings, ModelConfig
from lorakit.engine.deepspeed_config import deepspeed_linear_runs
from lorakit.engine.quantization import load_quantized_model, true_numel
from lorakit.engine.variants import additional_targets, check_pissa_rank, pissa_gathered, ties_embeddings
from lorakit.errors import LorakitError


def remote_code_note(path: str) -> str:
    """The one line a run with --trust_remote_code starts with."""
    return f"--trust_remote_code: Python code shipped in {path} (auto_map in its config) may run, in every process"


@contextlib.contextmanager
def refusing_remote_code(path: str) -> Iterator[None]:
    """transformers' refusal of a folder's own code (trust_remote_code=False) as one line saying what to do."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise LorakitError(
            f"the model folder {path} ships its own Python code (auto_map in its config), which lorakit runs only "
            "when asked: read that code, then pass --trust_remote_code, or use a model transformers supports itself"
        ) from None


def model_config(path: str, trust_remote_code: bool = False) -> Any:
    """The config.json of the local model folder `path`; a LorakitError when `path` is not one, or when it ships
    its own code (auto_map) and `trust_remote_code` (--trust_remote_code) is off."""
    if not path:
        raise LorakitError("--model_name_or_path is required: a local folder with config.json and safetensors weights")
    if not (Path(path) / "config.json").is_file():
        raise LorakitError(
            f"--model_name_or_path {path}: no such model folder (config.json not found); lorakit loads local "
            "folders only and never downloads"
        )
    check_config_file(path)
    with refusing_remote_code(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_config_file(path: str) -> None:
    """config.json parses and names a model_type transformers knows (or ships its own code, auto_map), so neither
    becomes a traceback from inside transformers."""
    from transformers import CONFIG_MAPPING, __version__

    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise LorakitError(f"{file} is not valid JSON{where}; copy the model folder again") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"{file} must hold a JSON object (the model's configuration); copy the model folder again")
    model_type = raw.get("model_type")
    if "auto_map" not in raw and model_type not in CONFIG_MAPPING:
        raise LorakitError(
            f"{file}: model_type {model_type!r} is unknown to transformers {__version__}; upgrade transformers, or fix "
            "model_type in config.json"
        )


def load_tokenizer(path: str, hf_config: Any = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the model folder `path`; `hf_config`, its config.json when already read, spares
    transformers reading it again to find the tokenizer's class."""
    with refusing_remote_code(path):
        tokenizer = AutoTokenizer.from_pretrained(path, config=hf_config, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss
    return tokenizer


def weight_index(path: str) -> dict[str, Path]:
    """Every tensor name in the model folder's safetensors files, mapped to its file."""
    folder = Path(path)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorakitError(f"{path} has no *.safetensors weights; save the model with save_pretrained() first")
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            index.update({name: file for name in handle.keys()})
    return index


def load_base_model(path: str, hf_config: Any, dtype: torch.dtype, ds_config: dict[str, Any], zero3: bool,
                    rank: int, trust_remote_code: bool = False,
                    quantization: tuple[ModelConfig, torch.device] | None = None) -> Any:  # fmt: skip
    """The causal LM from `path` (whose config.json `hf_config` is: not read again); partitioned from birth under
    ZeRO-3 (with torch's own F.linear where the DeepSpeed config turns DeepSpeed's memory-efficient linear off:
    lorakit.engine.deepspeed_config). `trust_remote_code`: --trust_remote_code, for a folder with its own code.
    `quantization`: the model flags and the rank's GPU, for --quantization_bit (lorakit.engine.quantization:
    quantised whole on that GPU, partitioned later by deepspeed.initialize under ZeRO-3)."""
    if zero3 and not deepspeed_linear_runs(ds_config):
        _restore_torch_linear()
    if quantization is not None:
        settings, device = quantization
        return load_quantized_model(path, hf_config, dtype, settings, device, trust_remote_code)
    if not zero3:
        return AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)  # fmt: skip
    import deepspeed

    # Skip random initialisation (every weight is loaded next; and transformers' init code indexes into weights
    # that zero.Init has already partitioned to empty tensors), and keep RoPE's fp32 buffers fp32. zero.Init takes
    # its dtype from the config's bf16/fp16 sections: an explicit `dtype=` is ignored on accelerators without fp16
    # (DeepSpeed 0.19 `_set_dtype` precedence), which silently made a CPU run bf16.
    with _no_init_weights(), _keep_arange_dtype(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=dtype,  # the model's own, as read
                                                 trust_remote_code=trust_remote_code)  # fmt: skip
    model.tie_weights()  # skipped with the initialisation; tied heads (SmolLM2) must share the embedding
    _load_partitioned_weights(model, path, rank)
    model.name_or_path = model.config._name_or_path = path
    return model


def _restore_torch_linear() -> None:
    """Undo an earlier zero.Init's process-wide `F.linear` replacement (a previous run in this process)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patcher

    original = getattr(Patcher, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _keep_arange_dtype() -> Any:
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # older transformers build RoPE buffers without torch.arange dtype casts
        return contextlib.nullcontext()
    return prevent_arange_dtype_change()


def _load_partitioned_weights(model: Any, path: str, rank: int) -> None:
    import deepspeed

    index = weight_index(path)
    params = dict(model.named_parameters())  # shared (tied) weights appear once, under their first name
    missing = sorted(set(params) - set(index))
    if missing:
        raise LorakitError(f"{path} lacks weights the model needs, e.g. {missing[:5]}; is it a complete checkpoint?")
    name_of = {id(p): name for name, p in params.items()}
    handles: dict[Path, Any] = {}
    loaded: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in loaded]
        if not own:
            continue
        loaded.update(id(p) for p in own)
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
            if rank == 0:
                for param in own:
                    file = index[name_of[id(param)]]
                    handle = handles.setdefault(file, safe_open(file, framework="pt"))
                    param.data.copy_(handle.get_tensor(name_of[id(param)]).to(param.dtype))


def decoder_layer_classes(model: Any) -> list[type]:
    """The model's repeated block classes, as transformers names them in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers, in order (instances of `decoder_layer_classes`)."""
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)] if classes else []


def make_layer_inputs_require_grad(model: Any) -> None:
    """The embedding output requires a gradient while autograd records, so the first decoder layer's input does as
    every later layer's. Two users: ZeRO-3's whole-layer units (DeepSpeed's release hook fires on the layer's input
    gradient: lorakit.engine.zero3's module docstring) and compiled layers (AOTAutograd compiles a graph per pattern
    of inputs requiring grad: without it layer 0 was a second whole compile). Once per embedding. The output is a
    leaf, so autograd would keep its unread gradient, the size of the hidden states, for as long as the loss's graph
    lives (lorakit.train.run_step keeps a micro-batch's loss through the next one's forward): it is dropped once
    accumulated. The price: that layer's input gradient through q/k/v and its norm (~0.1 % of a 7B step's matmuls)."""
    embedding = model.get_input_embeddings()
    if getattr(embedding, "_lorakit_output_requires_grad", False):
        return

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not output.requires_grad:
            output.requires_grad_(True).register_post_accumulate_grad_hook(_drop_gradient)
        return output

    embedding.register_forward_hook(hook)
    embedding._lorakit_output_requires_grad = True


def _drop_gradient(leaf: torch.Tensor) -> None:
    leaf.grad = None


def recompute_first_layers_only(model: Any, layers: int | None) -> None:
    """Gradient checkpointing on the first `layers` decoder layers only (the memory plan's fewest that fit,
    lorakit.engine.memory; None: every layer, as transformers turned it on). transformers keeps the choice per layer
    (a GradientCheckpointingLayer's `gradient_checkpointing`), so the other layers keep their activations for
    backward and are not run twice. A model whose layers carry no such flag stays checkpointed throughout."""
    if layers is None:
        return
    for index, block in enumerate(decoder_layers(model)):
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = index < layers


def linear_module_names(model: Any) -> list[str]:
    """Names (last component) of the model's linear layers, the output head excluded."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    return sorted(names)


def lora_targets(model: Any, settings: LoraSettings) -> list[str]:
    """The module names LoRA adapts; `all` means every linear layer but the output head (reference pitfall 2)."""
    available = linear_module_names(model)
    targets = available if settings.lora_target == ("all",) else list(settings.lora_target)
    missing = sorted(set(targets) - set(available))
    if missing:
        raise LorakitError(
            f"LoRA target module(s) {missing} not found in the model; its linear modules are {available} (or use `all`)"
        )
    return targets


def attach_lora(model: Any, settings: LoraSettings, seed: int, device: torch.device | None = None) -> PeftModel:
    """The PeftModel of `model` with LoRA as `settings` say. Under ZeRO-3 (weights partitioned at birth) DoRA's
    magnitudes and PiSSA's decomposition are taken from whole weights (lorakit.engine.variants). `device`: where
    PiSSA decomposes weights that are not partitioned (the accelerator; default the CPU)."""
    targets = lora_targets(model, settings)
    full = additional_targets(model, settings, targets)
    if settings.pissa_init:
        check_pissa_rank(model, settings.lora_rank, targets)
    torch.manual_seed(seed)  # the same initial adapter on every rank
    lora = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        init_lora_weights=settings.pissa_method or True,
        modules_to_save=full or None,
        # a tied embedding and output head stay one matrix: trained once, saved and merged as one
        ensure_weight_tying=bool(full) and ties_embeddings(model),
    )
    # PEFT's default upcasts the adapter to fp32 when the base is bf16/fp16. DeepSpeed casts it back to bf16 under
    # ZeRO-2 (its optimizer keeps the fp32 master), but not under ZeRO-3, where every LoRA call then cast its
    # input to fp32 and its output back (1,400 casts a step on Qwen2.5-7B, 41 ms of GPU time: RESULTS.md). The
    # adapter in the base's precision, with DeepSpeed's fp32 master, is what ZeRO-2 trains in both stages.
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    pissa = pissa_gathered(seed, device or torch.device("cpu"), zero3) if settings.pissa_init else None
    with _gathered_for_dora(model, settings.use_dora), pissa or contextlib.nullcontext():
        return get_peft_model(model, lora, autocast_adapter_dtype=False)


def _gathered_for_dora(model: Any, needed: bool) -> Any:
    """Each adapted layer's weight whole on every rank while PEFT builds that layer's DoRA magnitude, from the base
    weight's row norms: under ZeRO-3 each rank holds only a partition (an empty tensor). One layer's weight at a
    time, not the whole model: gathering every target at once would put the whole 7B/32B model on each rank.
    Read-only: nothing is written back."""
    if not needed or not any(hasattr(p, "ds_id") for p in model.parameters()):
        return contextlib.nullcontext()
    return _dora_init_gathered()


@contextlib.contextmanager
def _dora_init_gathered() -> Iterator[None]:
    import deepspeed
    from peft.tuners.lora.variants import DoraLinearVariant

    original = DoraLinearVariant.__dict__["init"]  # PEFT's staticmethod, restored below

    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        with deepspeed.zero.GatheredParameters([module.get_base_layer().weight]):
            original.__func__(module, adapter_name, **kwargs)

    DoraLinearVariant.init = staticmethod(init)
    try:
        yield
    finally:
        DoraLinearVariant.init = original


def add_neftune_noise(model: Any, alpha: float) -> None:
    """NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on the input embeddings while training."""

    def hook(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / (output.size(1) * output.size(2)) ** 0.5
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    model.get_input_embeddings().register_forward_hook(hook)


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters, counting ZeRO-3 partitioned and 4-bit packed weights at their full size."""
    trainable = total = 0
    for param in model.parameters():
        count = true_numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def model_and_inner_model(model: Any) -> list[torch.nn.Module]:
    """The model and, for a PEFT model, the HF model inside it: a forward pre-hook that must run before every forward
    goes on both, since PEFT's `generate` and research code's `get_base_model()(...)` call the inner one directly
    (PEFT's own forward calls its `forward`, not the module, so a training step runs such a hook once)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    return [model, *([base] if isinstance(base, torch.nn.Module) and base is not model else [])]
