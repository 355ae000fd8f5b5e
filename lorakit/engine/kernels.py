"""Fused Triton kernels from liger-kernel (the optional extra `lorakit[kernels]`): --enable_liger_kernel.

Liger replaces a decoder's RMSNorm (about eight elementwise kernels each way), rotary embedding and SwiGLU
(silu x up) with one fused kernel each, forward and backward. lorakit asks for exactly those three and never for
Liger's cross-entropy or fused linear cross-entropy: lorakit already computes logits only where a target
follows, in checkpointed fp32 chunks (lorakit.loss), and Liger's fused head would need the whole output-head
weight outside ZeRO-3's gather. Same flag name as LLaMA-Factory's; lorakit's default (unset) turns the kernels
on wherever they can run, because they pay everywhere measured (benchmarks/RESULTS.md: +9 to +37 % tokens/s on
H200s) and the tests hold them to the plain path's numbers; `--enable_liger_kernel false` turns them off.

What the patching touches: the RMSNorm and MLP modules of this model instance (their `forward`), and, for the
rotary embedding, the module-level `apply_rotary_pos_emb` of the model's transformers module, which models of
the same family in this process then share. Liger also swaps that module's RMSNorm and MLP classes, so models
built later would be Liger's; lorakit puts the classes back once this instance is patched. The kernels are
Triton, so CUDA only. tests/engine/test_kernels.py checks on a GPU that the loss and every LoRA gradient match
the plain path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.config import ModelConfig
from lorakit.engine.graph_trees import faster_graph_tree_lookups
from lorakit.engine.model import model_and_inner_model
from lorakit.errors import LorakitError
from lorakit.lora_settings import LoraSettings

INSTALL = "pip install 'lorakit[kernels]' (liger-kernel)"


def quiet_backend_discovery() -> None:
    """liger-kernel tries every backend it ships for each op (CUDA, ROCm, Ascend, ...) and logs a warning per
    backend that does not import: six lines per rank on a CUDA host, about kernels lorakit never uses. The line
    that matters is lorakit's own (which kernels are on); real failures are raised, not logged."""
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)


def liger_unavailable(model_type: str) -> str | None:
    """Why Liger's kernels cannot run here, or None when they can."""
    quiet_backend_discovery()
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (its kernels are Triton)"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"needs the liger-kernel package: {INSTALL}"
    try:  # liger imports transformers' model modules: a version mismatch shows up here, not mid-run
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        return f"needs a liger-kernel that imports with this transformers ({err})"
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type {model_type!r}"
    return None


def check_liger_kernel(model_type: str) -> None:
    """Before anything loads, for an explicit --enable_liger_kernel true: fail now if it cannot run."""
    reason = liger_unavailable(model_type)
    if reason:
        raise LorakitError(f"--enable_liger_kernel {reason}; drop the flag (or set it to false)")


def use_liger_kernel(requested: bool | None, model_type: str) -> tuple[bool, list[str]]:
    """The decision and its log line: an explicit flag is obeyed; by default the kernels run wherever they can."""
    if requested is not None:
        return requested, []
    reason = liger_unavailable(model_type)
    if reason and torch.cuda.is_available():  # on a GPU, say what is being left on the table
        return False, [f"kernels: plain PyTorch (liger-kernel {reason.removeprefix('needs ')}; "
                       "benchmarks/RESULTS.md shows what its fused kernels gain)"]  # fmt: skip
    return reason is None, []


def apply_liger_kernel(model: Any) -> list[str]:
    """Patch `model` (the base causal LM, before LoRA is attached) in place; returns the log line."""
    quiet_backend_discovery()
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    family = sys.modules[type(model).__module__]  # e.g. transformers.models.qwen2.modeling_qwen2
    classes = {name: value for name, value in vars(family).items() if isinstance(value, type)}
    # The only entry point that patches an existing instance; HF Trainer's use_liger_kernel calls it the same way.
    _apply_liger_kernel_to_instance(
        model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    for name, value in classes.items():
        setattr(family, name, value)
    return [f"liger-kernel: fused RMSNorm, rotary embedding and SwiGLU for {model.config.model_type}"]


def compile_unavailable(model: ModelConfig, lora: LoraSettings, per_module_units: bool, on_gpu: bool) -> str | None:
    """Why the default leaves the decoder layers eager here, or None when it compiles them. The default compiles
    where it is measured to pay (a GPU: +40 % tokens/s under ZeRO-3 on 2 H100s, benchmarks/RESULTS.md session 6)
    and whose GPU test has passed (tests/engine/test_compile.py with inductor, fp32 and bf16: plain LoRA since
    session 6, gradient checkpointing since session 9, one graph a layer recomputed in backward; rsLoRA changes only
    LoRA's scale, a constant of the same graph). DoRA passes the same GPU test, but PEFT's DoRA layer breaks dynamo's
    graph into ~23 pieces a layer (tests/engine/test_warmup.py), whose speed is not measured: eager by default.
    `per_module_units`: ZeRO-3 gathers per module, not per decoder layer (a stage3_module_granularity_threshold in
    the DeepSpeed file), so its hooks would sit inside each compiled layer."""
    if not on_gpu:
        return "the CPU"  # inductor's C++ code generation takes minutes there, for no measured gain
    if model.quantization_bit is not None:
        return "--quantization_bit: bitsandbytes' kernels break dynamo's graphs"
    if model.enable_liger_kernel:
        return "--enable_liger_kernel true: Liger's kernels instead"
    if lora.additional_target:
        return "--additional_target: modules trained in full are not tested compiled"
    if lora.use_dora:
        return "--use_dora: PEFT's DoRA layer breaks the compiled graph into ~23 pieces a layer; not measured to pay"
    if per_module_units:
        return "ZeRO-3 gathers per module here, so its hooks would run inside each compiled layer"
    from torch.utils._triton import has_triton

    if not has_triton():
        return "triton, which inductor's GPU kernels need, does not import"
    return None


def use_torch_compile(
    model: ModelConfig, lora: LoraSettings, per_module_units: bool, on_gpu: bool
) -> tuple[bool, list[str]]:
    """The decision and its log line: an explicit --torch_compile is obeyed; unset, the layers are compiled where
    compile_unavailable finds nothing against it, and a GPU run that stays eager says why. `per_module_units`:
    ZeRO-3 without lorakit's whole-layer units."""
    if model.torch_compile is not None or model.torch_compile_mode is not None:  # a mode asks for compiled layers
        return model.torch_compile is not False, []
    reason = compile_unavailable(model, lora, per_module_units, on_gpu)
    if reason and on_gpu:
        return False, [f"torch.compile: off ({reason}); --torch_compile true compiles the decoder layers anyway"]
    return reason is None, []


# The modes whose layers replay as CUDA graphs (inductor's cudagraph trees), and the same mode without them
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def settle_compile_mode(
    requested: str | None,
    zero3_partitioned: str | None,
    checkpointing: bool,
    packing: bool,
    on_gpu: bool,
    graphs_by_default: bool = False,
    peak_share: float = 0.0,
    pass_tokens: int = 0,
) -> tuple[str, list[str]]:
    """torch.compile's mode for the compiled layers and its log line.

    Unset (the default): CUDA graphs (reduce-overhead) with packed rows on a GPU, without gradient checkpointing, where
    `graphs_by_default` (lorakit.engine.graphs_by_default: ZeRO-2 or ZeRO-3 keeping every weight whole, bf16,
    nothing offloaded, no DoRA or fully trained module, the runs tests/engine/test_cuda_graphs.py trains on GPUs), a
    rank's forward pass holds on average at most GRAPHS_MAX_PASS_TOKENS (`pass_tokens`; 0: unknown) and the memory
    plan's `peak_share` (its estimated peak over the free memory) is at most GRAPHS_PEAK_SHARE; else the mode without
    graphs, silently but for the tokens' and the memory's cases. That test holds the graphs, on 2 H100s, to the same
    layers without them, under ZeRO-2 and under ZeRO-3 keeping every weight whole: every step's loss and gradient
    norm and every evaluation within 1e-3, every LoRA gradient of two steps tensor by tensor within 2e-2 of its norm,
    each step from the same weights; and each replay draws its own LoRA dropout masks (session 17: ZeRO-2's
    comparison passed three runs, the dropout test one; sessions 18 and 19: both stages and the dropout test, once
    each). What they gain at the reference per-GPU batch on 2 H100s: 0.188 -> 0.118 s a step on one host
    (overlap_comm off), 0.113 -> 0.105 on a faster one (on) (benchmarks/RESULTS.md, session 17): a compiled layer
    without graphs still launches its ~30 kernels from Python, and a step of ~1,200 tokens a GPU waits on those
    launches. `--torch_compile_mode default` keeps the layers compiled
    without graphs.

    Asked for, CUDA graphs (reduce-overhead, max-autotune) also run where `graphs_by_default` is false (ZeRO-0/1, any
    precision, offloading, DoRA), the passes are long, or the memory is short (saying so), and fall back to the mode
    without graphs elsewhere, with a log line. `zero3_partitioned`: why ZeRO-3 keeps some
    weight partitioned (lorakit.engine.deepspeed_config.zero3_partitions; None: it keeps them whole), each gathered
    into new memory at every call, so a graph would be recorded again each time (with every weight whole, the
    weights hold still: lorakit.engine.zero3's gather_released keeps the adapter's addresses, and build_engine turns
    stage 3's reduction stream off, deepspeed_config.reduce_gradients_on_compute_stream says why). Gradient
    checkpointing recomputes a layer inside backward, not tested under graphs. Without packing a batch is padded to
    its longest example, so nearly every batch would record graphs of its own (packed rows are multiples of 128
    tokens: a few lengths). A CPU has no CUDA graphs."""
    reason = None
    if not on_gpu:
        reason = "CUDA graphs need a CUDA GPU"
    elif not packing:
        reason = "--packing false pads each batch to its own longest example: a graph for nearly every batch"
    elif zero3_partitioned:
        reason = f"{zero3_partitioned}: a partitioned weight is gathered into new memory at every use"
    elif checkpointing:
        reason = "gradient checkpointing recomputes the layers inside backward; not tested under CUDA graphs"
    if requested is None:
        if reason is not None or not graphs_by_default:
            return "default", []
        if pass_tokens > GRAPHS_MAX_PASS_TOKENS:
            return "default", [
                f"torch.compile: mode default, without CUDA graphs: a rank's forward pass holds ~{pass_tokens:,} "
                f"tokens on average, over the {GRAPHS_MAX_PASS_TOKENS:,} below which they gain (a pass that long keeps "
                "the GPU busy while the next kernels are launched); --torch_compile_mode reduce-overhead asks for them "
                "anyway"
            ]
        if peak_share > GRAPHS_PEAK_SHARE:
            return "default", [
                f"torch.compile: mode default, without CUDA graphs: the memory plan's peak is {peak_share:.0%} of the "
                f"free memory, over the {GRAPHS_PEAK_SHARE:.0%} that leaves room for the graphs' own pool of "
                "activations; --torch_compile_mode reduce-overhead asks for them anyway"
            ]
        return "reduce-overhead", [GRAPHS_BY_DEFAULT]
    if requested not in CUDA_GRAPH_MODES:
        return requested, []
    if reason is not None:
        fallback = CUDA_GRAPH_MODES[requested]
        return fallback, [f"torch.compile: mode {fallback}, not {requested} ({reason})"]
    if peak_share > GRAPHS_PEAK_SHARE:
        return requested, [
            f"torch.compile: CUDA graphs as asked, though the memory plan's peak is {peak_share:.0%} "
            f"of the free memory (over {GRAPHS_PEAK_SHARE:.0%}: the graphs' own pool may not fit)"
        ]
    return requested, []


# CUDA graphs by default only where the memory plan's peak is at most this share of the free memory: the graphs keep
# the layers' activations in a memory pool of their own, apart from the caching allocator's, and each new row length
# is recorded into it. Measured on 2 H100s (session 18): planned at 56 of 78 GiB (0.72), ZeRO-2 and ZeRO-3 ran out
# of memory at step 3 with 33 GiB in the graphs' pool; planned at 38 of 78 (0.49), ZeRO-3 peaked at 37 GiB.
GRAPHS_PEAK_SHARE = 0.5
# CUDA graphs by default only where a rank's forward pass holds on average at most this many tokens: they replace a
# layer's ~30 kernel launches by one, which gains while the GPU waits on the launches. Measured on H100s (Qwen2.5-7B,
# benchmarks/RESULTS.md sessions 18-19): ~1,180 tokens a pass (the reference per-GPU batch), 0.176 -> 0.116 s a step
# under ZeRO-3 and the 1,170-step job 219 -> 183 s; ~2,300 tokens (128 examples a step on 4 GPUs), 0.223 -> 0.220 s
# a step and the 300-step job 84.9 -> 91.4 s (each new row length recorded, ~1.5 s, outweighs the 1.5 %).
GRAPHS_MAX_PASS_TOKENS = 2048


GRAPHS_BY_DEFAULT = ("torch.compile: mode reduce-overhead, the default here (each layer replayed as CUDA graphs, "
                     "tested to train as without them); --torch_compile_mode default compiles the layers without "
                     "graphs")  # fmt: skip


def start_a_round_of_graphs(*_: Any) -> None:
    torch.compiler.cudagraph_mark_step_begin()


def compile_decoder_layers(model: Any, backend: str = "inductor", mode: str = "default") -> list[str]:
    """--torch_compile: each decoder layer's `forward` through torch.compile; returns the log line. Only the layer's
    own computation is compiled: ZeRO-3's gather and release hooks run around the module call, outside the graph.
    Every layer runs one graph: the first layer's input (the frozen embedding's output) is made to require grad like
    the others' (lorakit.engine.model.make_layer_inputs_require_grad). A packed row's length changes every step, so
    it is symbolic from the first call (`row_length_dynamic`): one compile serves every length (dynamo's automatic
    mode compiled the first length as a constant, then everything again symbolically at the second: twice the
    compile time in a run's first steps). `backend`: the tests' "aot_eager" on the CPU checks the capture without
    inductor's code generation. `mode` (inductor's): with CUDA graphs (reduce-overhead), each row length seen is
    recorded once, forward and backward, in one memory pool that the layers of a step share, then replayed: one
    launch a layer for the ~30 kernels it runs. Each forward of the whole model starts a new round of the graphs
    (torch.compiler.cudagraph_mark_step_begin, before the model and before the HF model inside PEFT's, which
    generation calls directly): without it the graphs cannot tell one micro-batch from the next, run their slow path
    ("pending, uninvoked backwards") and, in an evaluation, read a layer's output after the next layer's replay
    overwrote it. A new round frees the previous one's outputs: by then DeepSpeed has copied each LoRA gradient of
    the previous micro-batch into its own buckets (the GPU test trains with two micro-batches a step against the
    same layers without graphs)."""
    from lorakit.engine.model import decoder_layers, make_layer_inputs_require_grad

    layers = decoder_layers(model)
    if not layers:
        return ["--torch_compile: the model names no decoder layer class; nothing compiled"]
    # Every layer shares one code object (the class's forward), so dynamo counts each layer's entries (static and
    # dynamic shapes, training and evaluation) against that object's limits: the per-object one (8 by default)
    # would fall back to eager past the 8th layer, the accumulated one (256) past ~64 layers of a 72B's 80.
    settings = torch._dynamo.config
    for limit in ("cache_size_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if isinstance(getattr(settings, limit, None), int):
            setattr(settings, limit, max(getattr(settings, limit), 8 * len(layers)))
    graphs = mode in CUDA_GRAPH_MODES and backend == "inductor"
    lookups = None
    if graphs:  # one graph per row length is the design here (rows are multiples of 128), not a warning's matter
        torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None
        lookups = faster_graph_tree_lookups()  # a new row length recorded without torch's quadratic scans
        for top in model_and_inner_model(model):
            top.register_forward_pre_hook(start_a_round_of_graphs)
    options = {"mode": mode} if backend == "inductor" else {}
    cache_keys_independent_of_imports()
    make_layer_inputs_require_grad(model)  # one graph for every layer, the first included
    for layer in layers:
        compiled = torch.compile(layer.forward, backend=backend, dynamic=None, **options)
        layer.forward = row_length_dynamic(compiled)
    shown = f"{backend}, {mode}" if backend == "inductor" else backend
    slower = [f"torch.compile: CUDA graphs record each new row length at torch's pace ({lookups})"] if lookups else []
    return [
        f"torch.compile: the forward of each of {len(layers)} {type(layers[0]).__name__}s compiled ({shown}"
        f"{': CUDA graphs, one per row length' if graphs else ''}); the first steps include the compilation"
    ] + slower


def _memory_format_by_name(memory_format: torch.memory_format) -> tuple[Any, tuple[str]]:
    return str, (str(memory_format),)


def cache_keys_independent_of_imports() -> None:
    """Inductor's and AOTAutograd's on-disk cache keys pickle the metadata of each graph input, its memory format
    included. A memory format (torch.contiguous_format) has no __module__, so pickle names it after the first module
    in sys.modules with a `torch` attribute: which module that is depends on the process's imports (torch._utils
    where torch came first; the main script, as `__mp_main__`, where multiprocessing came first and the script
    imported torch, as `python -m lorakit.engine.warmup` did). The same layer then had two keys, and the run's first
    compile missed what the warm-up process had compiled (lorakit.engine.warmup; tests/engine/test_warmup.py).
    Here the keys' pickler writes a memory format as its name, as it writes a symbolic size. Torch's other objects
    in a key name their module themselves."""
    from torch._inductor import codecache

    pickler = getattr(codecache, "FxGraphCachePickler", None)
    if pickler is None or getattr(pickler, "lorakit_memory_format_by_name", False):
        return
    init = pickler.__init__

    def init_naming_memory_formats(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if isinstance(getattr(self, "dispatch_table", None), dict):
            self.dispatch_table[torch.memory_format] = _memory_format_by_name

    pickler.__init__ = init_naming_memory_formats
    pickler.lorakit_memory_format_by_name = True


def inductor_cache_beside_data() -> list[str]:
    """Inductor's on-disk cache in lorakit's cache folder ($LORAKIT_CACHE or ~/.cache/lorakit, beside the tokenised
    data), unless TORCHINDUCTOR_CACHE_DIR names one (or an earlier compile in this process settled it); the log line.
    Torch's default, /tmp/torchinductor_$USER, is one machine's and goes at a reboot: on a cluster with a shared
    home folder the next job, on another node, compiled the layers from nothing again (Qwen2.5-7B on 4 H100s: ~19 s
    of compiling at the start against 2.5 s from a warm cache, benchmarks/RESULTS.md session 9). An entry's key holds
    torch's version, the GPU and the graph, so one folder serves mixed nodes; inductor writes each entry whole
    through a rename, so ranks and jobs may share it. Torch's default counts as unnamed: importing torch._dynamo
    (transformers does, long before a compile) writes it into TORCHINDUCTOR_CACHE_DIR."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    named = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if named and os.path.abspath(named) != os.path.abspath(default_cache_dir()):
        return []
    folder = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return [f"torch.compile: compiled kernels cached in {folder}, for later runs (TORCHINDUCTOR_CACHE_DIR moves it)"]


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile, by torch's own timers: dynamo's captures with
    their forward compiles, and the backward compiles AOTAutograd leaves to the first backward; 0.0 if nothing
    compiled. Not inductor's bw_compiler timer: a graph with a symbolic size (the row length) has its backward
    compiled inside the capture, so that timer counted it twice (the tiny model on the CPU: 52 s for 40)."""
    timers = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    return sum(sum(timers.get(key, ())) for key in ("_compile.compile_inner", "backward._backward_impl"))


def compile_cache_misses() -> int:
    """Graphs this process has compiled afresh rather than read from the on-disk cache: inductor's graph misses
    plus AOTAutograd's, by torch's own counters (0 where the compile warm-up or an earlier run cached the layers)."""
    counters = torch._dynamo.utils.counters
    return int(counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"])


def row_length_dynamic(compiled: Any) -> Any:
    """`compiled`, called with every dimension of its tensor inputs (after the batch dimension) that has the row's
    length marked dynamic: the hidden states, position ids, rotary cos/sin and any mask. `maybe_mark_dynamic`: a
    model whose code needs the length as a constant gets it specialised, not an error. The last dimension of a 3-D
    floating tensor is a feature size (the hidden states' hidden size, cos/sin's head dim), never the row's, even
    where the two are equal: marked, it made dynamo compile the layer again for such a row (dynamo recompiles where
    an input has a dynamic dimension its graph was not compiled with)."""

    def mark(value: Any, length: int) -> None:
        if isinstance(value, torch.Tensor):
            features = value.dim() == 3 and value.is_floating_point()
            for dim in range(1, value.dim() - 1 if features else value.dim()):
                if value.shape[dim] == length:
                    torch._dynamo.maybe_mark_dynamic(value, dim)
        elif isinstance(value, (tuple, list)):
            for item in value:
                mark(item, length)

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() > 1 and hidden.shape[1] > 1:
            for value in (*args, *kwargs.values()):
                mark(value, hidden.shape[1])
        return compiled(*args, **kwargs)

    return forward
