"""The reference job (Qwen2.5-7B architecture, huanhuan, the reference's flags) under lorakit and under the
HF Trainer baseline, on the GPUs of one host; one JSON line per run and a markdown table at the end.

    python benchmarks/bench.py --runs zero3,zero2,zero3@1,baseline --steps 40 --out results.json
    python benchmarks/bench.py --runs zero3@1,zero3@2,zero3@4 --global_batch 128 --steps 20   # scaling
    python benchmarks/bench.py --runs qlora@1,qlora-zero3@2 --steps 20                        # QLoRA, the 7B
    python benchmarks/bench.py --arch 32b --runs qlora-zero3@2 --steps 20                     # QLoRA, the 32B

Model FLOPs (for TFLOP/s and MFU): LoRA trains no base weight, so a token costs 4 x N_matmul (forward 2N, and
2N for the input gradients of backward) over the decoder's linear layers, plus 4 x vocab x hidden for the output
head at each target token (lorakit computes logits only there), plus attention: 6 x layers x hidden x L^2 per
example of L tokens (QK^T and AV, causal, forward and backward). MFU = that / (989 TFLOP/s dense bf16 x GPUs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16
from benchmarks.runs import ENVIRONMENTS, REFERENCE_FLAGS, RUNS, SCRIPTS, SECTIONS, VARIANTS  # noqa: E402


def parse_run(run: str) -> tuple[str, int]:
    name, _, gpus = run.partition("@")
    base = name.removeprefix("profile-").removesuffix("-compiled").removesuffix("-cudagraphs")
    if name not in RUNS and base not in RUNS and name != "baseline":
        raise SystemExit(f"unknown run {name}; known: {', '.join(RUNS)}, baseline, profile-NAME")
    return name, int(gpus or 2)


def accumulation_for(global_batch: int, gpus: int) -> int:
    """Accumulation that keeps `global_batch` examples a step at micro-batch 4 (the reference: 4 x 4 x 8 = 128)."""
    if global_batch % (4 * gpus):
        raise SystemExit(f"--global_batch {global_batch} is not a multiple of 4 x {gpus} GPUs")
    return global_batch // (4 * gpus)


def model_flops(data, config: dict) -> tuple[float, float]:
    """(FLOPs of one pass over the data set, tokens in it)."""
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    n_matmul = layers * (hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * inter)
    lengths = data.lengths.astype(np.float64)
    tokens, targets = lengths.sum(), float(data.target_counts.sum())
    flops = (
        4 * n_matmul * tokens + 4 * config["vocab_size"] * hidden * targets + 6 * layers * hidden * (lengths**2).sum()
    )
    return flops, tokens


def launch(gpus: int, script: list[str], log: Path, timeout: int, env_extra: dict[str, str] | None = None) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), *script]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", **(env_extra or {})}
    with open(log, "w") as handle:
        return subprocess.run(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode


def run_flags(name: str, gpus: int, args: argparse.Namespace, work: Path, output_dir: Path) -> list[str]:
    """examples/sft.py's flags for a run: the reference's, then the run's own, then the global batch's."""
    extra = [e.format(**{k: work / f"ds_{k}.json" for k in VARIANTS}) for e in RUNS[name]]
    flags = ["--deepspeed", str(REPO / "examples/ds_config_zero3.json"), *REFERENCE_FLAGS,
             "--model_name_or_path", str(args.model_dir), "--dataset_dir", str(args.data_dir),
             "--output_dir", str(output_dir), "--max_steps", str(args.steps), *extra]  # fmt: skip
    if args.global_batch:
        flags += ["--gradient_accumulation_steps", str(accumulation_for(args.global_batch, gpus))]
    return flags


def lorakit_run(run: str, args: argparse.Namespace, flops_per_token: float, work: Path) -> dict:
    name, gpus = parse_run(run)
    out = Path("/tmp") / f"bench-out-{run}"
    log = work / f"{run}.log"
    started = time.perf_counter()
    script = SCRIPTS.get(name, "examples/sft.py")
    # a whole job is timed as a fresh machine's first: its own inductor cache, cold (a shared one would hold the
    # layers' kernels of an earlier run in the lease), except a "-warm" one: the job again, as a second run on the
    # same machine finds it (the cache of the run without "-warm"); steady-state runs share the default cache
    cache = work / f"inductor-{run.replace('-warm', '')}"
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(cache)} if name.startswith("full-") else {}
    code = launch(gpus, [script, *run_flags(name, gpus, args, work, out)], log, args.timeout,
                  cold | ENVIRONMENTS.get(name, {}))  # fmt: skip
    result = {"run": run, "gpus": gpus, "exit": code, "wall_seconds": round(time.perf_counter() - started, 1)}
    if code != 0:
        return result | {"log_tail": log.read_text()[-3000:]}
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    summary = json.loads((out / "train_results.json").read_text())
    eager = eager_steps_of(log.read_text(), records[-1]["step"])
    steady = steady_windows(records, eager)
    tokens_per_second = statistics.median(r["tokens_per_second"] for r in steady)
    step_seconds = statistics.median(r["seconds_per_step"] for r in steady)
    global_batch = args.global_batch or 4 * 4 * gpus
    tflops = tokens_per_second * flops_per_token / 1e12
    return result | {
        "global_batch": global_batch,
        "seconds_per_step": round(step_seconds, 4),
        "examples_per_second": round(global_batch / step_seconds, 1),
        "train_runtime": summary.get("train_runtime"),
        "total_steps": records[-1]["step"],
        "tokens_per_second_per_gpu": round(tokens_per_second / gpus, 1),
        "model_tflops_per_gpu": round(tflops / gpus, 1),
        "mfu": round(tflops / gpus / PEAK_TFLOPS, 3),
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
        "compile_seconds": summary.get("compile_seconds"),  # rank max, within the first window
        "compile_cache_misses": summary.get("compile_cache_misses"),  # graphs compiled afresh, not from the cache
        "first_window_seconds_per_step": records[0]["seconds_per_step"],
        "eager_steps": eager,  # steps run eager beside the compile warm-up; the medians are of the windows after
        "steady_windows": len(steady),
        "final_loss": records[-1]["loss"],
        "final_epoch_loss": round(
            statistics.mean(r["loss"] for r in records if r["epoch"] > records[-1]["epoch"] - 1), 4
        ),
        "log": records,
    }


def eager_steps_of(log_text: str, total_steps: int) -> int:
    """The steps a run took with its layers eager while its compile warm-up ran (lorakit.engine.warmup's log lines):
    0 where it took none, every step where it never switched."""
    switched = re.search(r"torch\.compile: (\d+) steps ran the layers eager", log_text)
    if switched:
        return int(switched.group(1))
    return total_steps if "the steps run the layers eager while" in log_text else 0


def steady_windows(records: list[dict], eager_steps: int) -> list[dict]:
    """The log windows that measure the steady state: after the first (allocations, cuDNN plans) and after the
    first compiled step (the switch's compile, ~3-4 s, when the run began eager beside its warm-up). Where none is
    left (a run shorter than its eager phase) the windows after the first, eager ones: `eager_steps` says so."""
    starts = [0] + [r["step"] for r in records[:-1]]  # a window covers steps start+1 .. its record's step
    compiled = [r for r, start in zip(records, starts, strict=True) if start >= eager_steps + 1]
    return compiled or records[1:] or records[-1:]


def write_variants(work: Path) -> None:
    """The reference DeepSpeed file with the VARIANTS' settings changed; and the baseline's copy."""
    for name, change in VARIANTS.items():
        config = json.loads((REPO / "examples/ds_config_zero3.json").read_text())
        config["zero_optimization"].update(change)
        config.update(SECTIONS.get(name, {}))
        (work / f"ds_{name}.json").write_text(json.dumps(config))
    baseline = json.loads((REPO / "examples/ds_config_zero3.json").read_text())
    # DeepSpeed's fused Adam fails to JIT-build for the 9.0a arch on this host; torch's AdamW instead (LoRA: tiny)
    baseline["optimizer"]["params"]["torch_adam"] = True
    # HF fills WarmupLR's warmup_num_steps "auto" with --warmup_steps 0, which DeepSpeed 0.19 rejects; without the
    # section HF builds the cosine schedule the flags ask for (what the reference meant, and did not get)
    del baseline["scheduler"]
    (work / "ds_baseline.json").write_text(json.dumps(baseline))


PROFILED_STEPS = 28  # profile_steps.py's 8 + 5 + 10 + 5 steps: a plan of fewer ends in StopIteration


def profile_run(run: str, args: argparse.Namespace, work: Path) -> None:
    """e.g. profile-zero2@2: the per-step profile of zero2's settings (profile_steps.py writes WORK/RUN.txt)."""
    name, gpus = parse_run(run)
    compiled = {"-compiled": "default", "-cudagraphs": "reduce-overhead"}  # decoder layers in torch.compile
    suffix = next((s for s in compiled if name.endswith(s)), "")
    os.environ["LORAKIT_BENCH_COMPILE"] = compiled.get(suffix, "")
    base = name.removeprefix("profile-").removesuffix(suffix) if suffix else name.removeprefix("profile-")
    flags = run_flags(base, gpus, args, work, Path(f"/tmp/bench-out-{run}"))
    flags += ["--max_steps", str(max(args.steps, PROFILED_STEPS))]  # the last --max_steps counts
    code = launch(gpus, ["benchmarks/profile_steps.py", str(work / f"{run}.txt"), *flags], work / f"{run}.log",
                  args.timeout)  # fmt: skip
    print(json.dumps({"run": run, "exit": code}), flush=True)


def baseline_run(gpus: int, args: argparse.Namespace, work: Path, tokens: float) -> dict:
    """HF Trainer + PEFT + DeepSpeed ZeRO-3 at the reference's settings (hf_baseline.py)."""
    code = launch(gpus, ["benchmarks/hf_baseline.py", str(args.model_dir), str(args.data_dir),
                         str(work / "ds_baseline.json"), str(args.baseline_steps), str(work / "baseline.json")],
                  work / "baseline.log", args.timeout)  # fmt: skip
    result = {"run": f"baseline@{gpus}", "gpus": gpus, "exit": code}
    if code != 0:
        return result | {"log_tail": (work / "baseline.log").read_text()[-3000:]}
    result |= json.loads((work / "baseline.json").read_text())
    result["projected_10_epoch_seconds"] = round(10 * tokens / (result["tokens_per_second_per_gpu"] * gpus))
    return result


RESULT_FIELDS = ("run", "stage", "gpus", "card", "date", "commit", "global_batch", "tokens_per_second_per_gpu",
                 "seconds_per_step", "train_runtime", "total_steps", "mfu", "peak_gpu_memory_gib",
                 "same_lease", "arch", "compile_seconds", "compile_cache_misses", "first_window_seconds_per_step",
                 "eager_steps", "steady_windows", "final_loss")  # fmt: skip


def results_line(result: dict, args: argparse.Namespace) -> dict:
    """One line of benchmarks/results.jsonl: the fields a program reads, for every measured run."""
    import torch

    name = result["run"].partition("@")[0]
    flags = [] if name == "baseline" else RUNS.get(name.removeprefix("profile-"), [])
    stage = int(flags[flags.index("--zero_stage") + 1]) if "--zero_stage" in flags else 3
    line = {**result, "stage": stage, "card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
            "commit": args.commit, "same_lease": args.same_lease, "arch": f"Qwen2.5-{args.arch.upper()}"}  # fmt: skip
    line.setdefault("global_batch", args.global_batch or 4 * 4 * result["gpus"])
    if not name.startswith("full-"):  # train_runtime and total_steps describe whole jobs only
        line["train_runtime"] = line["total_steps"] = None
    return {key: line.get(key) for key in RESULT_FIELDS} | {"exit": result.get("exit")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=("7b", "32b", "72b"), default="7b", help="Qwen2.5-7B's, -32B's or -72B's")
    parser.add_argument("--model_dir", type=Path, help="default: /tmp/qwen25-ARCH-random (made if absent)")
    parser.add_argument("--data_dir", type=Path, default=Path("/tmp/huanhuan"))
    parser.add_argument("--huanhuan", type=Path, default=REPO.parent / "shared/data/huanhuan.json")
    parser.add_argument("--runs", default="zero3,zero2,baseline")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--global_batch",
        type=int,
        default=0,
        help="examples a step on every GPU count (128: the reference's 4 x 4 x 8); 0: 4 x 4 x GPUs",
    )
    parser.add_argument("--baseline_steps", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"))
    parser.add_argument("--jsonl", type=Path, help="also append each run's results.jsonl line here")
    parser.add_argument("--commit", default="", help="the lorakit commit measured, for results.jsonl")
    parser.add_argument("--same_lease", default="", help="an id shared by the runs of one lease")
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(f"/tmp/qwen25-{args.arch}-random")
    from benchmarks.qwen7b import ARCHITECTURES, make_data, make_model
    from lorakit.data import encode_dataset, load_conversations, resolve_datasets
    from lorakit.engine import load_tokenizer
    from lorakit.templates import get_template

    started = time.perf_counter()
    make_model(args.model_dir, "cuda", ARCHITECTURES[args.arch])
    make_data(args.data_dir, args.huanhuan)
    print(f"model and data ready in {time.perf_counter() - started:.0f} s", flush=True)
    tokenizer = load_tokenizer(str(args.model_dir))
    conversations = load_conversations(resolve_datasets(str(args.data_dir), ("huanhuan",)), None)
    data = encode_dataset(conversations, get_template("qwen", tokenizer), tokenizer, 1024)
    flops, tokens = model_flops(data, ARCHITECTURES[args.arch])
    work = args.out.parent
    write_variants(work)
    results = []
    for run in args.runs.split(","):
        name, gpus = parse_run(run)
        if name.startswith("profile-"):
            profile_run(run, args, work)
            continue
        if name == "baseline":
            result = baseline_run(gpus, args, work, tokens)
        else:
            result = lorakit_run(run, args, flops / tokens, work)
            if "seconds_per_step" in result:  # 10 epochs of whole steps, at the measured step time
                steps = 10 * math.ceil(len(data) / result["global_batch"])
                result["projected_10_epoch_seconds"] = round(steps * result["seconds_per_step"], 1)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(results_line(result, args)) + "\n")
    print(f"data: {len(data)} examples, {int(tokens)} tokens an epoch; {flops / tokens / 1e9:.2f} GFLOP a token")


if __name__ == "__main__":
    main()
