"""The decoder layer compiled while the model loads: one warm-up process a rank.

Inductor's cold compile of a Qwen2.5-7B decoder layer (forward and backward, LoRA included) takes ~19 s on an
H100 host, and it ran at the first step while every GPU waited; from inductor's on-disk cache
(lorakit.engine.kernels.inductor_cache_beside_data) the same compile takes ~2.5 s (benchmarks/RESULTS.md, session
9). So `set_up` starts, on each rank and before it loads the model, a process that builds the same layer (the
model's own class and config with one decoder layer, two where only the first layers recompute, and a small
vocabulary; random weights; lorakit's LoRA, checkpointing and compile), trains one packed row on the rank's GPU
(and evaluates it, where the run evaluates: the inference graph is another compile) and exits. The cache then
holds the rank's compiled layer (its key names the device) while the model loads and DeepSpeed starts, and the
first step reads it. The layer's graph does not depend on the vocabulary, the weights' values or ZeRO-3's
partitioning (its hooks run outside the compiled layer; tests/engine/test_warmup.py compares the graphs, and
checks on the CPU that the run's compile loads what the process compiled).

Best effort, and never slower than no warm-up: a run ready for its first step before its warm-up has finished
does not wait for it. Its first steps run the layers eager (torch.compiler.set_stance("force_eager"): the same
modules without dynamo) while the process compiles, and every rank switches to the compiled layers at the same step,
once every rank's process has ended (CompileSwitch: a flag all-reduced each eager step, read one step late). The
compile then reads inductor's cache (~2.5 s), so the GPUs train throughout instead of idling through a ~19 s
compile at the first step. Waiting for a late warm-up cost more than it saved (4 x H100, the reference 7B job with the
model in the page cache: the set-up took 9 s and the warm-up 35 s, its own imports and its compile beside four
loading ranks, so the run waited 26 s for a compile it does itself in ~18 s); stopping it and compiling at the first
step (sessions 12-14) still left the GPUs idle through that compile (benchmarks/RESULTS.md). If the process fails or
runs past WAIT_SECONDS, its log is named and the run compiles the layers itself at the switch. Where eager steps
could exceed the memory plan (ZeRO-3 releasing gathered weights between layers, or a plan near the memory's end:
lorakit.train.eager_while_compiling), none are taken: the run gives its warm-up READY_GRACE_SECONDS more, then stops
it and compiles at the first step (a 32B's warm-up has usually finished by then: it loads for longer than a layer
compiles). Off where the layers are not compiled. With CUDA graphs the process compiles the same mode (its one pass
runs cudagraph trees' unrecorded first call, nothing is recorded): graphs are recorded in the run, one per row
length, after the switch; before session 19 such runs compiled at their first step (~19 s on an H100 host).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from lorakit.distributed import HostCopy

WAIT_SECONDS = 90  # from the process's start; past it the run stops it and compiles itself (~20 s on H100s)
READY_GRACE_SECONDS = 2.0  # a run that does not step eager waits this long more for its warm-up, then compiles
VOCABULARY = 512  # the layer's graph does not depend on it; the embedding and head stay small on the GPU
# The process's main module holds no `torch`: pickle names a memory format (torch.contiguous_format, in every
# cache entry) after the first module in sys.modules with a `torch` attribute, and multiprocessing aliases the main
# module as `__mp_main__`, early in that order. Run as `python -m lorakit.engine.warmup`, this file was that module:
# its entries named `__mp_main__.torch.contiguous_format`, which the run (examples/sft.py, no `torch` of its own)
# could not load, so its first compile missed the warm-up's AOTAutograd entry.
ENTRY = "from lorakit.engine.warmup import main; main()"
# The process marks the end of each phase in its log (`PHASE name wall-clock`), and the run's line says where the
# time went: a warm-up that outlasts the model's loading makes the run's first steps eager, so its phases matter.
PHASE = "lorakit-warmup-phase"
PHASES = {"imported": "start and imports", "built": "the layer built", "trained": "compiled and trained a row",
          "evaluated": "the inference graph"}  # fmt: skip


@dataclass(frozen=True)
class WarmupSpec:
    model_name_or_path: str
    trust_remote_code: bool
    dtype: str  # torch's name of the precision trained: "bfloat16", "float16", "float32"
    lora: dict[str, Any]  # lorakit.config.LoraSettings's fields
    seed: int
    checkpointed_layers: int | None  # None: no checkpointing; else the layers that recompute (all: the layer count)
    row_tokens: int  # the packed row's length: a typical pass, so inductor's size hints match the run's
    device: str  # the rank's device, e.g. "cuda:1"
    backend: str = "inductor"  # the tests' "aot_eager" checks the process without inductor's code generation
    # torch.compile's mode, the run's: inductor's cache keys on it (CUDA graphs' mode sets its own options), so a
    # warm-up compiling another mode's layers would leave the run to compile its own at the switch
    mode: str = "default"
    zero3: bool = False  # the run is ZeRO-3: its modules hold their weights in DeepSpeed's ZeROOrderedDict
    evaluates: bool = False  # the run evaluates (--val_size, --eval_dataset): its layers' inference graph too
    # the process ends itself this long after its start (the run stops waiting at WAIT_SECONDS); a CPU test's
    # inductor compile, C++ on 2 cores, may need longer
    limit_seconds: float = WAIT_SECONDS + 30


@dataclass
class Warmup:
    process: subprocess.Popen
    log: Path
    started: float  # time.perf_counter() at its start
    wall_started: float = 0.0  # time.time() then: the process's phase marks are wall-clock times (0: not kept)


def start_warmup(spec: WarmupSpec) -> Warmup:
    """The warm-up process, started; its output goes to a temporary log named only if it fails."""
    log = Path(tempfile.mkstemp(prefix="lorakit-compile-warmup-", suffix=".log")[1])
    source = str(Path(__file__).resolve().parents[2])  # lorakit's own folder: importable as the run found it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as handle:
        isolated = ["-P"] if sys.version_info >= (3, 11) else []  # not the working folder's modules first
        command = [sys.executable, *isolated, "-c", ENTRY, json.dumps(dataclasses.asdict(spec))]
        # its own process group: stopping it also stops inductor's compile workers, not only the process
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)  # fmt: skip
    return Warmup(process, log, time.perf_counter(), time.time())


def mark_phase(name: str) -> None:
    print(f"{PHASE} {name} {time.time():.3f}", flush=True)


def phases(warmup: Warmup) -> str:
    """Where the process's time went, from its log's phase marks: ": start and imports 8 s, ..." ("" if none)."""
    if not warmup.wall_started:  # a Warmup made elsewhere, whose start the marks cannot be measured from
        return ""
    try:
        text = warmup.log.read_text(errors="replace")
    except OSError:
        return ""
    previous, parts = warmup.wall_started, []
    for name, at in re.findall(rf"^{PHASE} (\w+) ([\d.]+)$", text, re.MULTILINE):
        parts.append(f"{PHASES.get(name, name)} {float(at) - previous:.0f} s")
        previous = float(at)
    return ": " + ", ".join(parts) if parts else ""


def kill_warmup(process: subprocess.Popen) -> None:
    """The process and what it started (inductor's compile workers), ended and reaped."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()


def stop_warmup(warmup: Warmup | None) -> None:
    """End the process now (the set-up failed): nothing is left running behind the error."""
    if warmup is not None and warmup.process.poll() is None:
        kill_warmup(warmup.process)
    if warmup is not None:
        warmup.log.unlink(missing_ok=True)


def wait_for_warmup(warmup: Warmup | None, timeout: float = WAIT_SECONDS, grace: float | None = None) -> list[str]:
    """Wait for the warm-up to end, at most until `timeout` after its start and (where given) `grace` from now; a
    process still running then is stopped. The log line."""
    if warmup is None:
        return []
    left = timeout - (time.perf_counter() - warmup.started)
    late = grace is not None and grace < left  # stopped at the grace's end: the run is ready, not the warm-up
    try:
        code = warmup.process.wait(timeout=max(min(left, grace) if late else left, 0.01))
    except subprocess.TimeoutExpired:
        kill_warmup(warmup.process)
        seconds = time.perf_counter() - warmup.started
        if late:
            reached = phases(warmup)
            warmup.log.unlink(missing_ok=True)
            return [f"torch.compile: the model was ready before the warm-up process had compiled the layer "
                    f"({seconds:.0f} s from its start{reached}); stopped it: the first step compiles (waiting would "
                    "cost more than compiling)"]  # fmt: skip
        return [f"torch.compile: the warm-up process ran past {timeout:.0f} s and was stopped; the run compiles the "
                f"layers itself (its log: {warmup.log})"]  # fmt: skip
    seconds = time.perf_counter() - warmup.started
    if code != 0:
        return [f"torch.compile: the warm-up process failed (exit {code}, log: {warmup.log}); the run compiles the "
                "layers itself"]  # fmt: skip
    took = phases(warmup)
    warmup.log.unlink(missing_ok=True)
    return [f"torch.compile: the layer was compiled by a warm-up process beside the model's loading ({seconds:.0f} s "
            f"from its start{took}); the compile reads inductor's cache"]  # fmt: skip


@dataclass
class CompileSwitch:
    """The layers eager while any rank's warm-up process still compiles, then compiled, switched on every rank at
    the same step (the module's docstring says why). Used as a context manager around the loop: `begin` before the
    first step, `after_step` after each step's work is queued. Every rank with a warm-up starts eager, even one
    whose process has already ended: the ranks reach their first step at different times, and a rank that compiled
    at once would skip the flag's all-reduce the others wait in. Each eager step posts whether this rank's process
    still runs and all-reduces it (maximum over ranks); the next step reads it from the host, where its copy landed
    long ago, so no step makes the CPU wait for the GPU."""

    warmup: Warmup | None
    device: torch.device
    # False where eager steps could exceed the memory plan: ZeRO-3 releasing gathered weights between layers (eager
    # steps there ran out of memory: 4 x H200, the 32B, 128 GiB allocated against the plan's 104, benchmarks/
    # RESULTS.md session 15), or a plan near the memory's end; such a run gives its warm-up READY_GRACE_SECONDS, then
    # stops it and compiles at the first step (session 12's rule)
    eager_first: bool = True
    timeout: float = WAIT_SECONDS  # from the process's start; past it the process is stopped and the run compiles
    eager_steps: int = 0  # steps taken with the layers eager
    started: float = 0.0  # when the eager steps began
    forced: Any = None  # torch.compiler.set_stance's object while eager: leaving it restores the caller's stance
    reported: bool = False  # wait_for_warmup has said how the process ended (and kept a failed one's log)
    posted: HostCopy | None = None  # the last step's flag, on its way to the host

    @property
    def eager(self) -> bool:
        return self.forced is not None

    def begin(self) -> list[str]:
        if self.warmup is None or not self.eager_first:
            self.reported = True
            return wait_for_warmup(self.warmup, self.timeout, READY_GRACE_SECONDS)  # none, or no eager step here
        self.forced = torch.compiler.set_stance("force_eager")
        self.started = time.perf_counter()
        return [f"torch.compile: the steps run the layers eager while any rank's warm-up process compiles "
                f"({self.started - self.warmup.started:.0f} s from its start here), then every rank compiles them "
                "(from its cache) at the same step"]  # fmt: skip

    def after_step(self) -> list[str]:
        if not self.eager:
            return []
        self.eager_steps += 1
        if self.posted is not None and not any(self.posted.tolist()):  # no rank's process was running a step ago
            return self.switch()
        running = self.warmup.process.poll() is None
        if running and time.perf_counter() - self.warmup.started > self.timeout:
            running = False  # stopped at the switch (wait_for_warmup); the run compiles itself
        flag = torch.full((1,), float(running), device=self.device)  # filled on the device: no wait for the GPU
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        self.posted = HostCopy.queue(flag)  # read by the next step, which waits for this copy only
        return []

    def switch(self) -> list[str]:
        self.leave_eager()
        seconds = time.perf_counter() - self.started
        line = (f"torch.compile: {self.eager_steps} steps ran the layers eager ({seconds:.0f} s) while the warm-up "
                "compiled; the layers are compiled from the next step")  # fmt: skip
        self.reported = True
        return [line, *wait_for_warmup(self.warmup, self.timeout)]

    def leave_eager(self) -> None:
        """The compiler's stance back to what it was before `begin` (nothing where the layers are not eager)."""
        if self.forced is not None:
            self.forced.__exit__(None, None, None)
            self.forced = None

    def __enter__(self) -> CompileSwitch:
        return self

    def __exit__(self, *exc: object) -> None:
        """However the loop ends: the compiler's stance as the caller had it (research code goes on in the process)
        and no warm-up process left running; a failed process's log, once named, stays."""
        self.leave_eager()
        if self.warmup is not None and not self.reported:
            stop_warmup(self.warmup)  # still compiling when the loop ended: its log was never named


def warm_up(spec: WarmupSpec, mark: Callable[[str], None] = lambda phase: None) -> torch.nn.Module:
    """Build the one-layer model as lorakit.engine.build_engine prepares the real one, compile its layers and train
    one packed row; returns the model (the tests read its graphs). `mark` is told each phase's end (PHASES)."""
    from transformers import AutoModelForCausalLM

    from lorakit.config import LoraSettings
    from lorakit.engine.kernels import compile_decoder_layers
    from lorakit.engine.model import attach_lora, model_config, recompute_first_layers_only
    from lorakit.loss import model_loss_sum

    hf_config = model_config(spec.model_name_or_path, spec.trust_remote_code)
    checkpointing = spec.checkpointed_layers is not None
    partial = checkpointing and spec.checkpointed_layers < hf_config.num_hidden_layers
    hf_config.num_hidden_layers, hf_config.vocab_size = (2 if partial else 1), VOCABULARY
    # Phi-3/4 and OLMo2 pad with an id past the small vocabulary: nn.Embedding refuses it. The padding index
    # touches only the frozen embedding, never a layer's graph.
    if (getattr(hf_config, "pad_token_id", None) or 0) >= VOCABULARY:
        hf_config.pad_token_id = None
    if getattr(hf_config, "layer_types", None):
        hf_config.layer_types = hf_config.layer_types[: hf_config.num_hidden_layers]
    device = torch.device(spec.device)
    torch.manual_seed(spec.seed)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, spec.dtype),
                                                 trust_remote_code=spec.trust_remote_code)  # fmt: skip
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recompute_first_layers_only(model, 1 if partial else None)
    lora = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.lora.items()}
    for pissa in ("pissa_init", "pissa_iter", "pissa_convert"):  # PiSSA sets starting values (an SVD), not the graph
        lora.pop(pissa, None)
    model = attach_lora(model, LoraSettings(**lora), spec.seed, device)
    if spec.zero3:
        hold_weights_as_zero3_does(model)
    model.train()
    mark("built")
    compile_decoder_layers(model, backend=spec.backend, mode=spec.mode)
    input_ids = torch.randint(3, VOCABULARY, (1, spec.row_tokens))
    half = spec.row_tokens // 2  # two packed examples, as a packed row holds
    position_ids = torch.cat([torch.arange(half), torch.arange(spec.row_tokens - half)])[None]
    inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}
    model_loss_sum(model, inputs, input_ids.clone()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the phase ends when its kernels have run, not when they were queued
    mark("trained")
    if spec.evaluates:  # the first evaluation would compile it mid-run, inside the timed training
        model.eval()
        with torch.no_grad():
            model_loss_sum(model, inputs, input_ids.clone())
        model.train()
        mark("evaluated")
    return model


def hold_weights_as_zero3_does(model: torch.nn.Module) -> None:
    """Each module's weights in DeepSpeed's ZeROOrderedDict, as ZeRO-3 holds the run's (DeepSpeed's own wrapping,
    `ensure_zero_ordered_dict`). AOTAutograd's cache key names where dynamo found each weight (a dict subclass is
    reached another way than a plain dict): without this the run's compile loaded the warm-up's inductor graphs but
    traced and partitioned the layer again (~4-5 s of a ~19 s compile on an H100, benchmarks/compile_cost.py). The
    dict hands a weight without DeepSpeed's state through unchanged; where DeepSpeed lacks the function, nothing is
    done (only that part of the cache is missed)."""
    try:
        from deepspeed.runtime.zero.parameter_offload import ensure_zero_ordered_dict
    except ImportError:
        return
    for module in model.modules():
        ensure_zero_ordered_dict(module)


def leave_with_the_run(parent: int, limit: float) -> None:
    """End this process if the run that started it is gone (killed, or failed where nothing stopped the warm-up)
    or past `limit` seconds: never an orphan compiling on a GPU."""
    import threading

    def watch() -> None:
        started = time.monotonic()
        while os.getppid() == parent and time.monotonic() - started < limit:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    mark_phase("imported")
    spec = WarmupSpec(**json.loads(sys.argv[1]))
    leave_with_the_run(os.getppid(), spec.limit_seconds)
    warm_up(spec, mark_phase)
