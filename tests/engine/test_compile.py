"""--torch_compile computes what the eager layers compute: the same loss and the same LoRA gradients.

On the CPU the capture is checked with dynamo's "aot_eager" backend (the graphs and their autograd, without
inductor's code generation, which needs a C++ toolchain and minutes on 2 cores); on a CUDA machine (skipped in CI)
inductor itself runs, in fp32 and bf16. Two packed rows of different lengths exercise the dynamic-shape recompile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from launch import REPO, start, stop_unread, yield_to_pytest
from lora_rows import lora_model, loss_and_grads

from lorakit.config import LoraSettings, ModelConfig
from lorakit.engine.kernels import (
    compile_cache_misses,
    compile_decoder_layers,
    compile_seconds,
    inductor_cache_beside_data,
    use_torch_compile,
)
from lorakit.errors import LorakitError
from lorakit.loss import model_loss_sum

CUDA = torch.cuda.is_available()


# Plain LoRA, the layers recomputed in backward (the memory plan's gradient checkpointing), rsLoRA's scale, DoRA's
# magnitude and weight norm. The default (lorakit.engine.kernels.use_torch_compile) compiles a variant once its
# CUDA cases have passed on a GPU: plain LoRA (benchmarks/RESULTS.md, session 6), rsLoRA with it (the same graph
# with another scale constant), gradient checkpointing since session 9 (DoRA passes too; eager by default for its
# broken graph, lorakit.engine.kernels.compile_unavailable).
# bf16 (tolerance None): eager and compiled layers both round, in different orders, so each is held to an fp32
# eager reference computed from the same bf16-rounded weights: the compiled error over all gradients may not exceed
# 1.5 x eager's own (+1e-3), nor any one matrix's 3 x eager's (+1e-2). rsLoRA's larger scale (alpha / sqrt(r): 5.7
# here, LoRA's 2) puts eager bf16 itself up to 3.4 % off that reference in its worst gradient (inductor on the CPU:
# the compiled path up to 3.9 %, every case within both bounds); a direct compiled-to-eager tolerance of 3e-2 failed
# it on a GPU in session 9 while LoRA, DoRA and checkpointing passed.
VARIANTS = ("lora", "checkpointed", "rslora", "dora")
CASES = [("cpu", "aot_eager", torch.float32, 1e-5, variant) for variant in VARIANTS if variant != "rslora"]  # a scale
if CUDA:
    CASES += [("cuda", "inductor", torch.float32, 1e-4, variant) for variant in VARIANTS]
    CASES += [("cuda", "inductor", torch.bfloat16, None, variant) for variant in VARIANTS]


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def _assert_compiled_matches(eager: tuple, compiled: tuple, reference: tuple | None, tolerance: float | None,
                             label: str) -> None:  # fmt: skip
    """(loss, grads) of the eager and compiled layers; `reference`: fp32 eager's, for bf16 (tolerance None)."""
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = eager, compiled
    assert eager_grads.keys() == compiled_grads.keys()
    if reference is None:
        assert compiled_loss == pytest.approx(eager_loss, rel=tolerance), label
        for name, expected in eager_grads.items():
            error = _relative_error(compiled_grads[name], expected)
            assert error < tolerance, f"{label} {name}: relative gradient error {error:.2e}"
        return
    reference_loss, reference_grads = reference
    eager_off, compiled_off = abs(eager_loss - reference_loss), abs(compiled_loss - reference_loss)
    assert compiled_off <= 1.5 * eager_off + 1e-3 * abs(reference_loss), f"{label}: loss {compiled_off} vs {eager_off}"
    names = list(reference_grads)

    def flat(grads: dict) -> torch.Tensor:
        return torch.cat([grads[name].flatten() for name in names])

    eager_error = _relative_error(flat(eager_grads), flat(reference_grads))
    compiled_error = _relative_error(flat(compiled_grads), flat(reference_grads))
    assert compiled_error <= 1.5 * eager_error + 1e-3, f"{label}: all grads {compiled_error:.2e} vs {eager_error:.2e}"
    for name in names:  # one matrix's rounding varies more (compiled up to 1.7 x eager's seen): a looser bound
        eager_error = _relative_error(eager_grads[name], reference_grads[name])
        compiled_error = _relative_error(compiled_grads[name], reference_grads[name])
        assert compiled_error <= 3 * eager_error + 1e-2, f"{label} {name}: {compiled_error:.2e} vs {eager_error:.2e}"


@pytest.mark.parametrize(
    ("device", "backend", "dtype", "tolerance", "variant"), CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_compiled_layers_match_the_eager_layers(tiny_model: Path, device, backend, dtype, tolerance, variant):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = lora_model(tiny_model, dtype, device, variant), lora_model(tiny_model, dtype, device, variant)
    # the reference computes in fp32 from the very weights the bf16 models hold (rounded to bf16, then upcast)
    reference = lora_model(tiny_model, dtype, device, variant).float() if tolerance is None else None
    (line,) = compile_decoder_layers(compiled, backend=backend)
    assert line.startswith("torch.compile: the forward of each of 2 Qwen2DecoderLayers compiled")
    # Three row lengths; one for DoRA on the CPU: its graph breaks leave the row length constant after each break,
    # so every new length captures ~20 pieces again (30 s of the CPU suite for what the first length already checks).
    rows = ([37, 90, 1], [12, 64, 33, 5], [200])
    for lengths in rows[:1] if variant == "dora" and device == "cpu" else rows:
        eager_result = loss_and_grads(eager, lengths, device)
        assert len(eager_result[1]) == 2 * 7 * (3 if variant == "dora" else 2)  # A, B (DoRA: and magnitude) a linear
        expected = loss_and_grads(reference, lengths, device) if reference is not None else None
        _assert_compiled_matches(eager_result, loss_and_grads(compiled, lengths, device), expected, tolerance,
                                 str(lengths))  # fmt: skip
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] >= 1, dict(stats)  # dynamo did capture the layers


def test_every_layer_runs_one_graph(tiny_model: Path):
    """The first layer's input (the frozen embedding's output) requires grad like every later layer's
    (lorakit.engine.model.make_layer_inputs_require_grad): one compile for the whole stack, not a second for layer 0."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = lora_model(tiny_model, torch.float32, "cpu")
    compile_decoder_layers(model, backend="aot_eager")
    before = compile_seconds()
    loss_and_grads(model, [30, 50], "cpu")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert compile_seconds() > before + 0.1  # the final summary's compile_seconds: the capture was timed


def test_the_first_layers_input_keeps_no_gradient(tiny_model: Path):
    """The embedding output made to require grad is a leaf: autograd accumulates its (unread) gradient, the size of
    the hidden states, into it, and the loss's graph keeps that leaf while the loss lives (in lorakit.train.run_step,
    through the next micro-batch's forward). Nothing but the parameters may hold a gradient after backward."""
    torch._dynamo.reset()
    model = lora_model(tiny_model, torch.float32, "cpu")
    compile_decoder_layers(model, backend="aot_eager")
    input_ids = torch.randint(3, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    loss = model_loss_sum(model, {"input_ids": input_ids, "position_ids": torch.arange(64)[None]}, input_ids.clone())
    loss.backward()
    parameters, held, nodes, seen = {id(p) for p in model.parameters()}, [], [loss.grad_fn], set()
    while nodes:  # every leaf the graph still holds (AccumulateGrad's variable)
        node = nodes.pop()
        if node is not None and node not in seen:
            seen.add(node)
            leaf = getattr(node, "variable", None)
            if leaf is not None and id(leaf) not in parameters and leaf.grad is not None:
                held.append(tuple(leaf.grad.shape))
            nodes.extend(next_node for next_node, _ in node.next_functions)
    assert held == []


def test_compile_seconds_counts_a_backward_compiled_inside_the_capture_once(monkeypatch):
    """torch's timers as inductor leaves them (measured on the CPU, torch 2.13): a layer with the row length symbolic
    has its backward compiled inside dynamo's capture (bw_compiler nested in compile_inner); a static one at its
    first backward (bw_compiler nested in backward._backward_impl)."""
    timers = {"_compile.compile_inner": [40.0, 3.0], "compile_fx.<locals>.fw_compiler_base": [20.0, 1.0],
              "compile_fx.<locals>.bw_compiler": [12.0, 2.0], "backward._backward_impl": [2.5]}  # fmt: skip
    monkeypatch.setattr(torch._dynamo.utils, "compilation_time_metrics", timers)
    assert compile_seconds() == pytest.approx(45.5)


def test_a_new_row_length_compiles_nothing_more(tiny_model: Path):
    """The row length is symbolic from the first call (lorakit.engine.kernels.row_length_dynamic): rows of other
    lengths, packed alike, reuse the first compile; dynamo's automatic mode would compile everything again."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = lora_model(tiny_model, torch.float32, "cpu")
    compile_decoder_layers(model, backend="aot_eager")
    graphs = []
    for lengths in ([30, 50], [41, 77], [9, 20]):
        loss_and_grads(model, lengths, "cpu")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 2, graphs


def test_a_row_as_long_as_the_hidden_size_or_the_head_dim_compiles_nothing_more(tiny_model: Path):
    """A row whose length happens to equal a feature size of the layer's inputs (the hidden states' 64, the rotary
    cos/sin's head dim 16 of the tiny model) is still just another length: marking those feature dimensions dynamic
    as well made dynamo compile every layer again (its guard: the inputs' dynamic dimensions must be a subset of the
    compiled graph's)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = lora_model(tiny_model, torch.float32, "cpu")
    assert model.config.hidden_size == 64 and model.config.hidden_size // model.config.num_attention_heads == 16
    compile_decoder_layers(model, backend="aot_eager")
    graphs = []
    for lengths in ([30, 50], [30, 34], [10, 6], [41, 77]):  # 80, then 64 (the hidden size), 16 (the head dim)
        loss_and_grads(model, lengths, "cpu")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 3, graphs


def test_torch_compile_is_refused_with_quantisation():
    with pytest.raises(LorakitError, match="--torch_compile with --quantization_bit is not supported"):
        ModelConfig(torch_compile=True, quantization_bit=4)


@pytest.mark.parametrize(
    ("flag", "on_gpu", "model", "lora", "run", "compiled", "line"),
    [
        (None, True, {}, {}, {}, True, None),  # the default on a GPU: compiled, compile_decoder_layers says so
        (None, True, {}, {"use_rslora": True}, {}, True, None),  # a scale constant: the same graph
        (None, False, {}, {}, {}, False, None),  # the CPU: eager, nothing to say
        (None, True, {"quantization_bit": 4}, {}, {}, False, "--quantization_bit"),
        (None, True, {"enable_liger_kernel": True}, {}, {}, False, "--enable_liger_kernel true"),
        (None, True, {}, {"additional_target": ("embed_tokens",)}, {}, False, "--additional_target"),
        (None, True, {}, {"use_dora": True}, {}, False, "--use_dora"),  # correct on a GPU, but a broken graph
        (None, True, {}, {}, {"per_module_units": True}, False, "gathers per module"),  # hooks inside the layer
        (False, True, {}, {}, {}, False, None),  # explicit: obeyed, silently
        (True, False, {}, {}, {}, True, None),
        (True, True, {}, {"use_dora": True}, {"per_module_units": True}, True, None),
    ],
)
def test_the_default_compiles_on_a_gpu_where_tested(monkeypatch, flag, on_gpu, model, lora, run, compiled, line):
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    per_module_units = run.get("per_module_units", False)
    decided, lines = use_torch_compile(ModelConfig(torch_compile=flag, **model), LoraSettings(**lora), per_module_units,
                                       on_gpu)  # fmt: skip
    assert decided is compiled
    if line is None:
        assert lines == []
    else:
        (only,) = lines
        assert only.startswith("torch.compile: off (") and line in only and "--torch_compile true" in only


def test_the_default_stays_eager_without_triton(monkeypatch):
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    decided, (line,) = use_torch_compile(ModelConfig(), LoraSettings(), False, on_gpu=True)
    assert not decided and "triton" in line


def test_dynamos_limits_hold_every_layer_of_a_deep_model(monkeypatch):
    """All layers share one code object: 80 layers x (static, dynamic) x (training, evaluation) entries must not
    reach dynamo's per-object or accumulated limits, where it would silently fall back to eager."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings = torch._dynamo.config
    for limit in ("cache_size_limit", "accumulated_recompile_limit"):
        monkeypatch.setattr(settings, limit, getattr(settings, limit))  # restored after the test
    config = Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=80,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    (line,) = compile_decoder_layers(Qwen2ForCausalLM(config), backend="aot_eager")
    assert "each of 80 Qwen2DecoderLayers" in line
    assert settings.cache_size_limit >= 4 * 80 and settings.accumulated_recompile_limit >= 4 * 80


def test_inductors_cache_goes_beside_the_data_cache_unless_named(monkeypatch, tmp_path):
    """Compiled kernels outlive /tmp and reach other nodes of a shared home (lorakit.engine.kernels)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (line,) = inductor_cache_beside_data()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") and str(tmp_path) in line
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    assert cache_dir() == str(tmp_path / "inductor")  # where inductor itself now writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert inductor_cache_beside_data() == [] and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as importing torch._dynamo sets it
    assert inductor_cache_beside_data() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def _start_a_compiled_run(tiny_model: Path, folder: Path) -> subprocess.Popen:
    """The process of test_a_compiled_run_caches_its_kernels_beside_the_data, its output in `folder`: LORAKIT_CACHE
    is folder/home (its output_dir inside), and no TORCHINDUCTOR_CACHE_DIR."""
    home = folder / "home"
    flags = {"model_name_or_path": str(tiny_model), "template": "qwen", "output_dir": str(home / "out"),
             "lora_rank": 4, "torch_compile": True}  # fmt: skip
    code = ("import lorakit; from lorakit.distributed import init_distributed; "
            "from torch._inductor.runtime.cache_dir_utils import cache_dir; "
            f"built = lorakit.build_engine(lorakit.Config.from_flat({flags!r}), init_distributed()); "
            "print('CACHE', cache_dir())")  # fmt: skip
    env = {"LORAKIT_CACHE": str(home), "TORCHINDUCTOR_CACHE_DIR": None}
    return start([sys.executable, "-c", code], folder / "stdout", folder / "stderr", env=env)


_KEY_OF_A_GRAPH_INPUT = """
import torch.fx
from torch._inductor.codecache import FxGraphCachePickler
from torch._subclasses.fake_tensor import FakeTensorMode

from lorakit.engine.kernels import cache_keys_independent_of_imports

cache_keys_independent_of_imports()
with FakeTensorMode():
    hidden = torch.empty(2, 64)
print(FxGraphCachePickler(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())).get_hash(hidden))
"""
IMPORT_ORDERS = {"torch first": "import torch\nimport lorakit.engine.kernels\n",
                 "lorakit first": "import lorakit.engine.kernels\nimport torch\n"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def processes(request: pytest.FixtureRequest, tiny_model: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # fmt: skip
    """The processes of the two tests below (those selected), started before the module's first test. Each spends
    ~10 s importing lorakit on one core, which its test only waits for: started here, they run beside the module's
    compile tests (pytest's one busy core of a 2-core machine), where waited for in their tests they ran after them."""
    selected = {getattr(item, "function", None) for item in request.session.items}
    started: dict = {}
    if test_a_compiled_run_caches_its_kernels_beside_the_data in selected:
        folder = tmp_path_factory.mktemp("compiled_run")
        started["compiled run"] = (_start_a_compiled_run(tiny_model, folder), folder)
    if test_a_graph_inputs_cache_key_is_the_same_whatever_the_process_imported_first in selected:
        folder = tmp_path_factory.mktemp("keys")
        started["keys"] = {}
        for order, first in IMPORT_ORDERS.items():
            with open(folder / f"{order}.stderr", "w") as errors:
                process = subprocess.Popen([sys.executable, "-c", first + _KEY_OF_A_GRAPH_INPUT], cwd=REPO, text=True,
                                           stdout=subprocess.PIPE, stderr=errors)  # fmt: skip
            started["keys"][order] = (process, folder / f"{order}.stderr")
    pairs = [started["compiled run"]] if "compiled run" in started else []
    pairs += list(started.get("keys", {}).values())
    for process, _ in pairs:
        yield_to_pytest(process.pid)
    yield started
    stop_unread([process for process, _ in pairs])


def test_a_compiled_run_caches_its_kernels_beside_the_data(processes: dict):
    """A fresh process with no TORCHINDUCTOR_CACHE_DIR, as a job starts: importing lorakit (transformers, which imports
    torch._dynamo) writes torch's /tmp default into it long before the compile; lorakit's folder wins all the same."""
    process, folder = processes["compiled run"]  # _start_a_compiled_run's, started with the module's first test
    assert process.wait(timeout=300) == 0, (folder / "stderr").read_text()[-3000:]
    stdout = (folder / "stdout").read_text()
    (cache,) = [line.removeprefix("CACHE ") for line in stdout.splitlines() if line.startswith("CACHE ")]
    assert cache == str(folder / "home" / "inductor"), stdout[-2000:]


def test_a_graph_inputs_cache_key_is_the_same_whatever_the_process_imported_first(processes: dict):
    """Pickle names a memory format after the first module in sys.modules with a `torch` attribute: torch._utils
    where torch is imported first, the main module (as `__mp_main__`) where lorakit (multiprocessing) came first
    and the main module then imported torch, as `python -m lorakit.engine.warmup` did. The warm-up process and the
    run must key the same layer alike (lorakit.engine.kernels.cache_keys_independent_of_imports)."""
    keys = {}
    for order, (process, errors) in processes["keys"].items():  # one of each IMPORT_ORDERS, started early (above)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 0, (order, errors.read_text()[-3000:])
        keys[order] = output.split()[-1]
    assert len(set(keys.values())) == 1, keys


def test_compile_cache_misses_counts_inductors_and_aotautograds_by_torchs_counter_names(monkeypatch):
    """The final summary's compile_cache_misses (tests/engine/test_warmup.py reads 0 after a warm-up)."""
    import collections

    counters: dict = collections.defaultdict(collections.Counter)
    counters["inductor"].update(fxgraph_cache_miss=2, fxgraph_cache_hit=5)
    counters["aot_autograd"].update(autograd_cache_miss=1, autograd_cache_hit=4)
    monkeypatch.setattr(torch._dynamo.utils, "counters", counters)
    assert compile_cache_misses() == 3
