"""The compile warm-up process builds the graph the run compiles (lorakit.engine.warmup): same code, same inputs.

Graphs are read through a recording dynamo backend: the warm-up's one-layer model (random weights, a small
vocabulary) against the real model loaded from its folder, as lorakit.engine.build_engine prepares it. Equal
graphs with equal inputs are what inductor's cache keys on, so the run's first compile reads the warm-up's."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from launch import free_port, yield_to_pytest
from transformers import AutoModelForCausalLM

from lorakit.config import LoraSettings
from lorakit.engine.kernels import compile_cache_misses, compile_decoder_layers
from lorakit.engine.model import attach_lora, recompute_first_layers_only
from lorakit.engine.warmup import (
    CompileSwitch,
    Warmup,
    WarmupSpec,
    start_warmup,
    stop_warmup,
    wait_for_warmup,
    warm_up,
)
from lorakit.loss import model_loss_sum


def _recorder(graphs: list, row_tokens: int) -> object:
    """A dynamo backend that records each graph's code and its inputs (the row's length, symbolic in the code,
    written as L: the two paths train rows of different lengths)."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        inputs = [(["L" if n == row_tokens else n for n in t.shape], t.dtype, t.requires_grad)
                  for t in example_inputs if isinstance(t, torch.Tensor)]  # fmt: skip
        graphs.append((gm.code, inputs))
        return gm.forward

    return backend


def _spec(tiny_model: Path, settings: LoraSettings, checkpointed_layers: int | None = None) -> WarmupSpec:
    return WarmupSpec(str(tiny_model), False, "float32", dataclasses.asdict(settings), 3, checkpointed_layers, 96,
                      "cpu", "aot_eager")  # fmt: skip


def _real_graphs(tiny_model: Path, settings: LoraSettings, checkpointed_layers: int | None,
                 evaluates: bool = False) -> list:  # fmt: skip
    graphs: list = []
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if checkpointed_layers is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recompute_first_layers_only(model, checkpointed_layers)
    model = attach_lora(model, settings, 3)
    model.train()
    compile_decoder_layers(model, backend=_recorder(graphs, 130))
    input_ids = torch.randint(3, model.config.vocab_size, (1, 130))
    position_ids = torch.cat([torch.arange(40), torch.arange(70), torch.arange(20)])[None]  # another length, 3 rows
    model_loss_sum(model, {"input_ids": input_ids, "position_ids": position_ids}, input_ids.clone()).backward()
    if evaluates:  # as lorakit.evaluate: the engine in eval mode, no gradients, rows packed alike
        model.eval()
        with torch.no_grad():
            model_loss_sum(model, {"input_ids": input_ids, "position_ids": position_ids}, input_ids.clone())
    return graphs


LORA = LoraSettings(lora_rank=8, lora_alpha=16, lora_dropout=0.1, lora_target=("all",))
# Not DoRA: PEFT's DoRA layer breaks dynamo's graph into ~23 pieces a layer, and the pieces after a break see the
# row's length as a constant, so only the first length's run could reuse them (DoRA stays eager by default).


@pytest.mark.parametrize(
    "settings, checkpointed_layers, evaluates, graphs",
    [
        (LORA, None, False, 1),
        (dataclasses.replace(LORA, lora_target=("q_proj", "v_proj"), use_rslora=True), None, False, 1),
        (LORA, 1, False, 2),  # the memory plan's partial recomputation: a checkpointed layer and a plain one
        (LORA, 2, False, 1),  # every layer recomputed
        (LORA, None, True, 2),  # the run evaluates: the layers' inference graph as well
    ],
    ids=["lora", "rslora-qv", "first-layer-recomputed", "all-recomputed", "evaluated"],
)
def test_the_warmup_compiles_the_graphs_the_run_compiles(tiny_model: Path, settings, checkpointed_layers, evaluates,
                                                         graphs):  # fmt: skip
    torch._dynamo.reset()
    real = _real_graphs(tiny_model, settings, checkpointed_layers, evaluates)
    torch._dynamo.reset()
    warmed: list = []
    spec = dataclasses.replace(_spec(tiny_model, settings, checkpointed_layers), evaluates=evaluates)
    warm_up(dataclasses.replace(spec, backend=_recorder(warmed, 96)))
    assert len(real) == graphs
    assert sorted(map(str, warmed)) == sorted(map(str, real))


def test_the_warmup_builds_models_whose_padding_token_lies_past_its_small_vocabulary(tmp_path: Path):
    """Phi-3/4 and OLMo2 name a pad token near the end of their vocabulary; the warm-up's embedding of
    VOCABULARY rows must still build (the padding index touches no decoder layer's graph)."""
    from transformers import Qwen2Config

    from lorakit.engine.warmup import VOCABULARY

    Qwen2Config(
        vocab_size=4 * VOCABULARY,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=4 * VOCABULARY - 1,
    ).save_pretrained(tmp_path)
    torch._dynamo.reset()
    spec = WarmupSpec(str(tmp_path), False, "float32", dataclasses.asdict(LORA), 3, None, 96, "cpu", "aot_eager")
    model = warm_up(spec)
    assert len(model.base_model.model.model.layers) == 1


def test_a_failed_warmup_process_is_named(tiny_model: Path, tmp_path: Path):
    broken = dataclasses.replace(_spec(tiny_model, LORA), model_name_or_path=str(tmp_path / "missing"))
    (line,) = wait_for_warmup(start_warmup(broken))
    assert "the warm-up process failed (exit 1, log: " in line and "the run compiles the layers itself" in line
    log = Path(line.split("log: ")[1].split(")")[0])
    assert "missing" in log.read_text()
    assert wait_for_warmup(None) == []


def test_a_warmup_process_ends_itself_at_its_specs_limit(tiny_model: Path):
    """The spec's limit_seconds, not a fixed one, bounds the process (a CPU test's compile may need longer)."""
    spec = dataclasses.replace(_spec(tiny_model, LORA), limit_seconds=0.5)
    (line,) = wait_for_warmup(start_warmup(spec))
    assert "the warm-up process failed (exit 3, log: " in line


def _stand_in(code: str = "import sys; sys.stdin.read()") -> Warmup:
    """A process in the warm-up's place, for CompileSwitch's timing: by default it runs until its stdin closes (the
    warm-up's own work is the other tests' subject)."""
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, start_new_session=True)
    return Warmup(process, Path(tempfile.mkstemp(suffix=".log")[1]), time.perf_counter())


def _counted(compiles: list) -> object:
    """A function under torch.compile whose backend counts its compiles."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiles.append(gm)
        return gm.forward

    return torch.compile(lambda x: x * 2 + 1, backend=backend)


def _stance() -> str:
    return torch._dynamo.eval_frame._stance.stance  # torch keeps no public getter


def test_steps_run_eager_while_the_warmup_compiles_then_compiled():
    """The run does not wait for a late warm-up: its layers run eager (no compile) until the process has ended,
    read one step late, then compile; and leaving the loop leaves the compiler's stance as the caller had it."""
    torch._dynamo.reset()
    compiles: list = []
    layer, x = _counted(compiles), torch.ones(3)
    warmup = _stand_in()
    with torch.compiler.set_stance("eager_on_recompile"), CompileSwitch(warmup, torch.device("cpu")) as switch:
        (line,) = switch.begin()
        assert "the steps run the layers eager while any rank's warm-up" in line, line
        for _ in range(2):
            assert torch.equal(layer(x), x * 3) and switch.after_step() == []
        warmup.process.communicate(b"")  # the warm-up ends between steps 2 and 3
        assert switch.after_step() == []  # step 3 reads step 2's flag: still compiling then
        assert not compiles
        lines = switch.after_step()  # step 4 reads step 3's: every process had ended
        assert "4 steps ran the layers eager" in lines[0], lines
        assert "compiled by a warm-up process" in lines[1] and not warmup.log.exists(), lines
        assert _stance() == "eager_on_recompile"  # the caller's, not the default
        torch._dynamo.reset()
        with torch.compiler.set_stance("default"):
            assert torch.equal(layer(x), x * 3) and len(compiles) == 1
        assert switch.after_step() == [] and switch.eager_steps == 4
    assert _stance() == "default"


def test_a_warmup_past_its_time_is_stopped_at_the_switch():
    warmup = _stand_in()
    with CompileSwitch(warmup, torch.device("cpu"), timeout=0.0) as switch:
        assert switch.begin()
        assert switch.after_step() == []  # posts "not running": past the timeout
        lines = switch.after_step()
        assert "ran past 0 s and was stopped" in lines[1] and warmup.process.poll() is not None, lines
    assert warmup.log.exists()  # named in the log line: kept


def test_a_failed_warmup_keeps_its_named_log_after_the_loop():
    warmup = _stand_in("raise SystemExit(4)")
    warmup.process.wait()
    with CompileSwitch(warmup, torch.device("cpu")) as switch:
        switch.begin()
        switch.after_step()
        lines = switch.after_step()
        assert "failed (exit 4, log: " in lines[1], lines
    assert warmup.log.exists()
    warmup.log.unlink()


def test_leaving_the_loop_while_eager_restores_the_stance_and_stops_the_warmup():
    """An error or a short run ends the loop while a warm-up still compiles: nothing is left behind."""
    torch._dynamo.reset()
    compiles: list = []
    layer, x = _counted(compiles), torch.ones(3)
    warmup = _stand_in()
    with pytest.raises(KeyError), CompileSwitch(warmup, torch.device("cpu")) as switch:
        switch.begin()
        layer(x)
        raise KeyError("a step failed")
    assert warmup.process.poll() is not None and not compiles and not warmup.log.exists()
    layer(x)
    assert len(compiles) == 1


def test_a_warmup_done_before_the_first_step_still_starts_eager_then_switches():
    """Every rank with a warm-up starts eager, done or not: a rank compiling at once would skip the flag's
    all-reduce that the others wait in (the two-rank case below)."""
    warmup = _stand_in("pass")
    warmup.process.wait()
    with CompileSwitch(warmup, torch.device("cpu")) as switch:
        assert switch.begin() and switch.eager
        assert switch.after_step() == []
        lines = switch.after_step()
        assert "2 steps ran the layers eager" in lines[0] and "compiled by a warm-up process" in lines[1], lines
    with CompileSwitch(None, torch.device("cpu")) as switch:
        assert switch.begin() == [] and switch.after_step() == [] and not switch.eager


def test_without_eager_steps_the_run_gives_its_warmup_a_grace_then_compiles_itself():
    """Where eager steps could exceed the memory plan (lorakit.train.eager_while_compiling): a warm-up done within
    READY_GRACE_SECONDS is read; one still compiling is stopped (session 12: waiting cost more than compiling)."""
    warmup = _stand_in("import time; time.sleep(0.5)")
    with CompileSwitch(warmup, torch.device("cpu"), eager_first=False) as switch:
        (line,) = switch.begin()
        assert "compiled by a warm-up process" in line and not switch.eager
    warmup = _stand_in()
    asked = time.perf_counter()
    with CompileSwitch(warmup, torch.device("cpu"), eager_first=False) as switch:
        (line,) = switch.begin()
        assert time.perf_counter() - asked < 10 and warmup.process.poll() is not None
        assert "the model was ready before the warm-up process had compiled the layer" in line, line
        assert "stopped it: the first step compiles" in line and not warmup.log.exists()
        assert switch.after_step() == []


RANK = """
import pathlib, subprocess, sys, tempfile, time, torch, torch.distributed as dist
from lorakit.engine.warmup import CompileSwitch, Warmup
rank, port, cases = int(sys.argv[1]), sys.argv[2], [int(ends) for ends in sys.argv[3:]]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
for case, ends_after in enumerate(cases):
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    if ends_after == 0:  # ended before the first step
        process.communicate(b"")
    warmup = Warmup(process, pathlib.Path(tempfile.mkstemp()[1]), time.perf_counter())  # removed as a real log is
    with CompileSwitch(warmup, torch.device("cpu")) as switch:
        switch.begin()
        for step in range(1, 10):
            if step == ends_after + 1 and process.poll() is None:
                process.communicate(b"")
            if switch.after_step():
                print("case", case, "switched after step", step, flush=True)
                break
dist.destroy_process_group()
"""
SWITCH_CASES = [((1, 3), 5), ((0, 2), 4)]


@pytest.fixture(scope="module")
def switching_ranks() -> list[str]:
    """Both cases below in one launch of two ranks, one after the other in one process group: each rank process
    spends ~10 s importing lorakit, and a launch for each case cost both cores that twice."""
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(port),
                               *(str(ends[rank]) for ends, _ in SWITCH_CASES)], stdout=subprocess.PIPE, text=True)
             for rank in range(2)]  # fmt: skip
    return [rank.communicate(timeout=120)[0] for rank in ranks]


@pytest.mark.parametrize("case, ends_after, switched", [(case, *c) for case, c in enumerate(SWITCH_CASES)])
def test_every_rank_switches_at_the_same_step(switching_ranks: list[str], case, ends_after, switched):
    """Two gloo ranks whose warm-ups end at different steps (one, in the second case, before the first step)
    switch together, once the later has ended (its flag, posted the step after, read the step after that)."""
    lines = [[line for line in output.splitlines() if line.startswith(f"case {case} ")] for output in switching_ranks]
    assert lines == [[f"case {case} switched after step {switched}"]] * 2, (ends_after, switching_ranks)


@pytest.mark.parametrize(
    "flags, device, checkpointed_layers, expected",
    [
        (
            {},
            "cuda:1",
            None,
            {"device": "cuda:1", "checkpointed_layers": None, "row_tokens": 2304, "zero3": True, "mode": "default"},
        ),
        # CUDA graphs by default (bf16): the process compiles their mode, the run records them
        ({"zero_stage": 2}, "cuda:0", None, {"zero3": False, "mode": "reduce-overhead"}),
        ({"zero_stage": 2, "bf16": False}, "cuda:0", None, {"zero3": False, "mode": "default"}),  # fp32: no graphs
        ({"zero_stage": 2, "torch_compile_mode": "default"}, "cuda:0", None, {"zero3": False, "mode": "default"}),
        ({}, "cpu", None, None),  # the CPU: the layers stay eager
        ({"packing": False}, "cuda:0", None, None),  # padded batches call the layers with another mask
        ({"use_dora": True}, "cuda:0", None, None),  # eager by default
        ({"torch_compile": False}, "cuda:0", None, None),
        ({"gradient_checkpointing": True}, "cuda:0", None, {"checkpointed_layers": 2}),  # every layer
        ({"gradient_checkpointing": True}, "cuda:0", 1, {"checkpointed_layers": 1}),  # the memory plan's first k
        ({"zero_stage": 2, "torch_compile_mode": "reduce-overhead"}, "cuda:0", None, {"mode": "reduce-overhead"}),
        ({"zero_stage": 2, "torch_compile_mode": "max-autotune"}, "cuda:0", None, {"mode": "max-autotune"}),
        # ZeRO-3 partitioning the weights (no memory plan here keeps them whole): graphs fall back to the default mode
        ({"torch_compile_mode": "reduce-overhead"}, "cuda:0", None, {"device": "cuda:0", "mode": "default"}),
        ({"torch_compile": True, "enable_liger_kernel": True}, "cuda:0", None, None),  # Liger's layer: not warmed
    ],
)
def test_a_warmup_runs_where_the_run_compiles_its_layers(monkeypatch, tiny_model, flags, device, checkpointed_layers,
                                                         expected):  # fmt: skip
    from transformers import AutoConfig

    from lorakit.config import Config
    from lorakit.engine import compile_warmup, plan_engine

    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    on_gpu = device != "cpu"
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("d",), "output_dir": "o",
                               "pack_tokens": 4096, "bf16": True, **flags})  # fmt: skip
    plan = plan_engine(config, AutoConfig.from_pretrained(tiny_model), world_size=2, on_gpu=on_gpu)
    plan = dataclasses.replace(plan, checkpointed_layers=checkpointed_layers)
    spec = compile_warmup(config, plan, torch.device(device), step_tokens=2400)
    if expected is None:
        assert spec is None
        return
    assert spec is not None and spec.backend == "inductor"
    assert spec.dtype == ("float32" if flags.get("bf16") is False else "bfloat16")
    assert spec.model_name_or_path == str(tiny_model) and spec.lora == dataclasses.asdict(config.lora)
    assert {key: getattr(spec, key) for key in expected} == expected


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_warmup_compiles_the_mode_the_run_settled(monkeypatch, tiny_model: Path, mode):
    """Inductor's cache keys on the mode (CUDA graphs' sets options of its own): the process compiles the run's."""
    seen = []

    class Compiled(Exception):
        pass

    def compile_decoder_layers(model, backend: str = "inductor", mode: str = "default"):  # noqa: ANN001, ANN202
        seen.append((backend, mode))
        raise Compiled

    monkeypatch.setattr("lorakit.engine.kernels.compile_decoder_layers", compile_decoder_layers)
    with pytest.raises(Compiled):
        warm_up(dataclasses.replace(_spec(tiny_model, LORA), mode=mode))
    assert seen == [("aot_eager", mode)]


def test_zero3_keeping_every_weight_whole_warms_up_asked_for_graphs(monkeypatch, tmp_path, tiny_model):
    """Under ZeRO-3 with every weight whole, CUDA graphs asked for run (lorakit.engine.kernels.settle_compile_mode),
    so the warm-up process compiles their mode, not the default mode's layers the run would not read."""
    from transformers import AutoConfig

    from lorakit.config import Config
    from lorakit.engine import compile_warmup, plan_engine

    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    ds_file = tmp_path / "ds.json"
    zero = {"stage": 3, "stage3_param_persistence_threshold": 10**12}
    ds_file.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": zero}))
    for mode in ("reduce-overhead", "default"):
        config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("d",), "output_dir": "o",
                                   "bf16": True, "deepspeed": str(ds_file), "torch_compile_mode": mode})  # fmt: skip
        plan = plan_engine(config, AutoConfig.from_pretrained(tiny_model), world_size=2, on_gpu=True)
        spec = compile_warmup(config, plan, torch.device("cuda:0"), step_tokens=2400)
        assert spec is not None and spec.mode == mode and spec.zero3


def test_a_set_up_that_fails_after_the_build_stops_the_warmup(monkeypatch, tiny_model: Path, tiny_data: Path,
                                                               tmp_path: Path):  # fmt: skip
    """Resuming, writing the run's files or starting a tracker can fail after the model is built: the warm-up
    process must not be left compiling on the rank's GPU (nor its log in the temporary folder)."""
    import subprocess
    import sys
    import time

    import lorakit.train  # noqa: F401 (the module, for sys.modules)
    from lorakit.config import Config
    from lorakit.distributed import DistInfo
    from lorakit.engine.warmup import Warmup
    from lorakit.validate import validate

    training = sys.modules["lorakit.train"]  # the module: the package's `lorakit.train` is its function
    started: list[Warmup] = []

    def start(_spec: WarmupSpec) -> Warmup:
        log = tmp_path / "warmup.log"
        log.touch()
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(Warmup(process, log, time.perf_counter()))
        return started[-1]

    def refuse(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(training, "init_distributed", lambda: DistInfo(0, 0, 1, torch.device("cpu")))
    monkeypatch.setattr(training, "compile_warmup", lambda *_: _spec(tiny_model, LORA))
    monkeypatch.setattr(training, "start_warmup", start)
    monkeypatch.setattr(training, "build_engine", lambda *_: training.BuiltEngine(None, {}, [], 1, 2))
    monkeypatch.setattr(training, "save_run_files", refuse)
    config = Config.from_flat({"model_name_or_path": str(tiny_model), "dataset": ("tiny",), "template": "qwen",
                               "dataset_dir": str(tiny_data), "output_dir": str(tmp_path / "out"),
                               "cutoff_len": 128})  # fmt: skip
    with pytest.raises(OSError, match="disk full"):
        training.set_up(validate(config))
    (warmup,) = started
    try:
        assert warmup.process.poll() is not None, "the warm-up process still runs"
        assert not warmup.log.exists()
    finally:
        warmup.process.kill()
        warmup.process.wait()


@pytest.mark.parametrize(("parent", "limit"), [("os.getppid()", 1), ("os.getppid() + 999999", 60)],
                         ids=["past-its-limit", "its-run-gone"])  # fmt: skip
def test_a_warmup_process_never_outlives_its_run(parent, limit):
    """lorakit.engine.warmup.leave_with_the_run: a process whose run is gone (or that ran past its limit) exits."""
    import subprocess
    import sys
    import time

    code = (f"import os, time; from lorakit.engine.warmup import leave_with_the_run; "
            f"leave_with_the_run({parent}, {limit}); time.sleep(60)")  # fmt: skip
    started = time.monotonic()
    finished = subprocess.run([sys.executable, "-c", code], timeout=50)
    assert finished.returncode == 3 and time.monotonic() - started < 40


def test_under_zero3_the_warmup_reaches_each_weight_as_the_run_does(tiny_model: Path):
    """AOTAutograd's cache key names where dynamo found each graph input; ZeRO-3 holds a module's weights in its
    ZeROOrderedDict, a dict subclass dynamo reaches another way. The warm-up holds them alike for a ZeRO-3 run
    (lorakit.engine.warmup.hold_weights_as_zero3_does): else a ZeRO-3 run (tiny model, 1 CPU rank) loaded the
    warm-up's inductor graphs but missed its AOTAutograd entry, and traced and partitioned the layer again."""
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict, _inject_parameters

    sources: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        sources.append([repr(node.meta["grapharg"].source) for node in gm.graph.find_nodes(op="placeholder")])
        return gm.forward

    torch._dynamo.reset()
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LORA, 3)
    _inject_parameters(model, ZeROOrderedDict)  # as DeepSpeed's ZeRO-3 engine does at its start
    model.train()
    compile_decoder_layers(model, backend=backend)
    input_ids = torch.randint(3, model.config.vocab_size, (1, 96))
    position_ids = torch.cat([torch.arange(40), torch.arange(56)])[None]  # packed, as the warm-up's row
    model_loss_sum(model, {"input_ids": input_ids, "position_ids": position_ids}, input_ids.clone())
    real, sources[:] = list(sources), []
    torch._dynamo.reset()
    warm_up(dataclasses.replace(_spec(tiny_model, LORA), zero3=True, backend=backend))
    assert len(real) == 1 and "DictSubclassGetItemSource" in str(real)
    assert sources == real


def _cache_spec(tiny_model: Path, device: str, dtype: torch.dtype, warmup_row: int) -> WarmupSpec:
    return dataclasses.replace(_spec(tiny_model, LORA), dtype=str(dtype).removeprefix("torch."), device=device,
                               backend="inductor", limit_seconds=300, row_tokens=warmup_row)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def cache_warmups(request: pytest.FixtureRequest, tiny_model: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # fmt: skip
    """The warm-up processes of the test below (its selected cases, by id: (warm-up, its inductor cache folder)),
    started before the module's first test. A CPU warm-up spends ~50 s importing and compiling inductor's C++, which
    the test only waits for: started here, below pytest's priority, it runs beside the module's other tests (the test
    below is last), which keep one core of a 2-core machine busy, not both; started in the test, it added its ~50 s to
    theirs. What the test checks is unchanged: a fresh cache that only this process has written, read by the run."""
    started: dict = {}
    for item in request.session.items:
        if getattr(item, "function", None) is not test_the_runs_first_compile_reads_what_the_warmup_process_compiled:
            continue
        params = item.callspec.params
        if params["device"].startswith("cuda") and not torch.cuda.is_available():
            continue  # the case is skipped
        folder = tmp_path_factory.mktemp("inductor")
        with pytest.MonkeyPatch.context() as patch:  # the process's environment, not this one's
            patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
            warmup = start_warmup(_cache_spec(tiny_model, params["device"], params["dtype"], params["warmup_row"]))
        yield_to_pytest(warmup.process.pid)
        started[item.callspec.id] = (warmup, folder)
    yield started
    for warmup, _ in started.values():  # never read: its test failed before, or the session stopped
        stop_warmup(warmup)


@pytest.mark.parametrize(
    "device, dtype, warmup_row, run_segments",
    [
        ("cpu", torch.float32, 96, (40, 70, 20)),
        # rows as a GPU run has them, padded to 128 tokens (lorakit.train.row_multiple): on an H100 a 130-token row
        # failed a guard of the 96-token warm-up's AOTAutograd entry (session 12; the expression was cut off in the
        # report, likely SDPA's mask alignment to 8 tokens), a case a GPU run never meets
        pytest.param("cuda:0", torch.bfloat16, 128, (100, 120, 36),
                     marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA machine (skipped in CI)")),
    ],
)  # fmt: skip
def test_the_runs_first_compile_reads_what_the_warmup_process_compiled(
    tiny_model: Path, request, cache_warmups: dict, monkeypatch, device, dtype, warmup_row, run_segments
):
    """The warm-up process (inductor: C++ on the CPU, Triton on a GPU) fills inductor's on-disk cache; the run's own
    compile of the same layers, in this process (whose main module, pytest's, holds no `torch`, as examples/sft.py's
    does not), then loads the AOTAutograd entry and both inductor graphs instead of compiling them. Cache keys and
    entries named modules after what a process had imported, and the run compiled everything again
    (lorakit.engine.kernels.cache_keys_independent_of_imports, lorakit.engine.warmup.ENTRY)."""
    warmup, folder = cache_warmups.pop(request.node.callspec.id)  # _cache_spec(...) of this case, started early
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))  # the run's compile reads the process's folder
    (line,) = wait_for_warmup(warmup, timeout=300)  # ~55 s from its start on a 2-core CPU
    assert "compiled by a warm-up process" in line, line
    # where the process's time went, phase by phase (a late warm-up makes the run's first steps eager)
    assert re.search(r"from its start: start and imports \d+ s, the layer built \d+ s, compiled and trained a row "
                     r"\d+ s\); the compile reads", line), line  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCache

    lookups: list = []  # a guard miss's expression and hints, for the failure message
    find = AOTAutogradCache.find_guarded_entry

    def find_and_record(key, local, remote, evaluate, hints):  # noqa: ANN001, ANN202 (torch's own signature)
        found = find(key, local, remote, evaluate, hints)
        lookups.append((found[2], hints))
        return found

    monkeypatch.setattr(AOTAutogradCache, "find_guarded_entry", staticmethod(find_and_record))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    model = attach_lora(model, LORA, 3).to(device)
    model.train()
    compile_decoder_layers(model)
    input_ids = torch.randint(3, model.config.vocab_size, (1, sum(run_segments)))
    position_ids = torch.cat([torch.arange(length) for length in run_segments])[None]
    inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}
    model_loss_sum(model, inputs, input_ids.clone()).backward()
    counters = torch._dynamo.utils.counters
    print("AOTAutograd cache lookups (guard info, hints):", lookups)  # whole in the failure's captured stdout
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1 and counters["inductor"]["fxgraph_cache_miss"] == 0, (
        dict(counters["aot_autograd"]), dict(counters["inductor"]), lookups)  # fmt: skip
    assert compile_cache_misses() == 0  # what the run's final summary says (compile_cache_misses)
