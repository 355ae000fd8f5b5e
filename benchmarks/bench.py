"""The reference job (Qwen2.5-7B architecture, huanhuan, the reference's flags) under lorakit and under the
HF Trainer baseline, on the GPUs of one host; one JSON line per run and a markdown table at the end.

    python benchmarks/bench.py --runs zero3,zero2,zero3-1gpu,baseline --steps 40 --out results.json

Model FLOPs (for TFLOP/s and MFU): LoRA trains no base weight, so a token costs 4 x N_matmul (forward 2N, and
2N for the input gradients of backward) over the decoder's linear layers, plus 4 x vocab x hidden for the output
head at each target token (lorakit computes logits only there), plus attention: 6 x layers x hidden x L^2 per
example of L tokens (QK^T and AV, causal, forward and backward). MFU = that / (989 TFLOP/s dense bf16 x GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16
REFERENCE_FLAGS = ["--stage", "sft", "--do_train", "True", "--finetuning_type", "lora", "--template", "qwen",
                   "--dataset", "huanhuan", "--cutoff_len", "1024", "--learning_rate", "5e-04",
                   "--num_train_epochs", "10", "--max_samples", "100000", "--per_device_train_batch_size", "4",
                   "--gradient_accumulation_steps", "4", "--lr_scheduler_type", "cosine", "--max_grad_norm", "1.0",
                   "--warmup_steps", "0", "--neftune_noise_alpha", "0", "--lora_rank", "8", "--lora_dropout", "0.1",
                   "--lora_alpha", "32", "--lora_target", "q_proj,v_proj,k_proj,gate_proj,up_proj,o_proj,down_proj",
                   "--bf16", "True", "--logging_steps", "5", "--overwrite_output_dir", "--seed", "42"]  # fmt: skip
RUNS = {  # name: (GPUs, extra flags)
    "zero3": (2, []),
    "zero3-persist": (2, ["--deepspeed", "{persist}"]),
    "zero3-leaf-layers": (2, ["--deepspeed", "{leaf_layers}"]),
    "zero3-leaf-small": (2, ["--deepspeed", "{leaf_small}"]),
    "zero3-bigfetch": (2, ["--deepspeed", "{bigfetch}"]),
    "zero3-1gpu-hfpersist": (1, ["--deepspeed", "{hfpersist}"]),
    "zero2": (2, ["--zero_stage", "2"]),
    "zero3-1gpu": (1, []),
    "zero2-1gpu": (1, ["--zero_stage", "2"]),
    "unpacked-zero2": (2, ["--zero_stage", "2", "--packing", "false"]),
    # packed vs unpacked, same examples and steps: 512 examples, 2 epochs (32 steps), to compare final-epoch loss
    "short-packed": (2, ["--zero_stage", "2", "--max_samples", "512", "--num_train_epochs", "2", "--max_steps", "-1"]),
    "short-unpacked": (
        2,
        [
            "--zero_stage",
            "2",
            "--max_samples",
            "512",
            "--num_train_epochs",
            "2",
            "--max_steps",
            "-1",
            "--packing",
            "false",
        ],
    ),
}


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


def launch(gpus: int, script: list[str], log: Path, timeout: int) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), *script]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as handle:
        return subprocess.run(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode


def lorakit_run(name: str, args: argparse.Namespace, flops_per_token: float, work: Path) -> dict:
    gpus, extra = RUNS[name]
    out = Path("/tmp") / f"bench-out-{name}"
    variants = {k: work / f"ds_{k}.json" for k in ("persist", "leaf_layers", "leaf_small", "bigfetch", "hfpersist")}
    extra = [e.format(**variants) for e in extra]
    flags = ["--deepspeed", str(REPO / "examples/ds_config_zero3.json"), *REFERENCE_FLAGS,
             "--model_name_or_path", str(args.model_dir), "--dataset_dir", str(args.data_dir),
             "--output_dir", str(out), "--max_steps", str(args.steps), *extra]  # fmt: skip
    started = time.perf_counter()
    code = launch(gpus, ["examples/sft.py", *flags], work / f"{name}.log", args.timeout)
    result = {"run": name, "gpus": gpus, "exit": code, "wall_seconds": round(time.perf_counter() - started, 1)}
    if code != 0:
        return result | {"log_tail": (work / f"{name}.log").read_text()[-3000:]}
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_results.json").read_text())
    steady = [r["tokens_per_second"] for r in records[1:]] or [records[-1]["tokens_per_second"]]  # window 1: warm-up
    tokens_per_second = statistics.median(steady)
    tflops = tokens_per_second * flops_per_token / 1e12
    return result | {
        "tokens_per_second_per_gpu": round(tokens_per_second / gpus, 1),
        "model_tflops_per_gpu": round(tflops / gpus, 1),
        "mfu": round(tflops / gpus / PEAK_TFLOPS, 3),
        "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
        "final_loss": records[-1]["loss"],
        "final_epoch_loss": round(
            statistics.mean(r["loss"] for r in records if r["epoch"] > records[-1]["epoch"] - 1), 4
        ),
        "log": records,
    }


def write_variants(work: Path) -> None:
    """The reference DeepSpeed file with one ZeRO-3 setting changed (see RESULTS.md); and the baseline's copy."""
    changes = {
        "persist": {"stage3_param_persistence_threshold": 10**12},  # every frozen weight stays resident
        "hfpersist": {"stage3_param_persistence_threshold": 35840},  # HF's 10 x hidden: MLP LoRA matrices gathered
        "leaf_layers": {"stage3_module_granularity_threshold": 10**7},  # decoder layers fetched as one unit
        "leaf_small": {"stage3_module_granularity_threshold": 3 * 10**6},  # attention blocks, LoRA-wrapped linears
        # whole decoder layers per gather and prefetched ahead, so NCCL moves large messages
        "bigfetch": {
            "stage3_prefetch_bucket_size": 5 * 10**8,
            "stage3_max_live_parameters": 3 * 10**9,
            "stage3_max_reuse_distance": 3 * 10**9,
            "reduce_bucket_size": 5 * 10**8,
        },
    }
    for name, change in changes.items():
        config = json.loads((REPO / "examples/ds_config_zero3.json").read_text())
        config["zero_optimization"].update(change)
        (work / f"ds_{name}.json").write_text(json.dumps(config))
    baseline = json.loads((REPO / "examples/ds_config_zero3.json").read_text())
    # DeepSpeed's fused Adam fails to JIT-build for the 9.0a arch on this host; torch's AdamW instead (LoRA: tiny)
    baseline["optimizer"]["params"]["torch_adam"] = True
    # HF fills WarmupLR's warmup_num_steps "auto" with --warmup_steps 0, which DeepSpeed 0.19 rejects; without the
    # section HF builds the cosine schedule the flags ask for (what the reference meant, and did not get)
    del baseline["scheduler"]
    (work / "ds_baseline.json").write_text(json.dumps(baseline))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", type=Path, default=Path("/tmp/qwen25-7b-random"))
    parser.add_argument("--data_dir", type=Path, default=Path("/tmp/huanhuan"))
    parser.add_argument("--huanhuan", type=Path, default=REPO.parent / "shared/data/huanhuan.json")
    parser.add_argument("--runs", default="zero3,zero2,baseline")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--baseline_steps", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"))
    args = parser.parse_args()
    from benchmarks.qwen7b import QWEN25_7B, make_data, make_model
    from lorakit.data import encode_dataset, load_conversations, resolve_datasets
    from lorakit.engine import load_tokenizer
    from lorakit.templates import get_template

    started = time.perf_counter()
    make_model(args.model_dir, "cuda")
    make_data(args.data_dir, args.huanhuan)
    print(f"model and data ready in {time.perf_counter() - started:.0f} s", flush=True)
    tokenizer = load_tokenizer(str(args.model_dir))
    conversations = load_conversations(resolve_datasets(str(args.data_dir), ("huanhuan",)), None)
    data = encode_dataset(conversations, get_template("qwen", tokenizer), tokenizer, 1024)
    flops, tokens = model_flops(data, QWEN25_7B)
    work = args.out.parent
    write_variants(work)
    results = []
    for name in args.runs.split(","):
        if name.startswith("profile-"):  # e.g. profile-zero2: the per-step profile of that run's settings
            gpus, extra = RUNS[name.removeprefix("profile-").removesuffix("-compiled")]
            os.environ["LORAKIT_BENCH_COMPILE"] = "1" if name.endswith("-compiled") else "0"
            variants = {
                k: work / f"ds_{k}.json" for k in ("persist", "leaf_layers", "leaf_small", "bigfetch", "hfpersist")
            }
            flags = ["--deepspeed", str(REPO / "examples/ds_config_zero3.json"), *REFERENCE_FLAGS,
                     "--model_name_or_path", str(args.model_dir), "--dataset_dir", str(args.data_dir),
                     "--output_dir", f"/tmp/bench-out-{name}", *[e.format(**variants) for e in extra]]  # fmt: skip
            code = launch(gpus, ["benchmarks/profile_steps.py", str(work / f"{name}.txt"), *flags],
                          work / f"{name}.log", args.timeout)  # fmt: skip
            print(json.dumps({"run": name, "exit": code}), flush=True)
            continue
        if name == "baseline":
            code = launch(2, ["benchmarks/hf_baseline.py", str(args.model_dir), str(args.data_dir),
                              str(work / "ds_baseline.json"), str(args.baseline_steps),
                              str(work / "baseline.json")], work / "baseline.log", args.timeout)  # fmt: skip
            result = {"run": "baseline", "gpus": 2, "exit": code}
            if code == 0:
                result |= json.loads((work / "baseline.json").read_text())
            else:
                result["log_tail"] = (work / "baseline.log").read_text()[-3000:]
        else:
            result = lorakit_run(name, args, flops / tokens, work)
        if "tokens_per_second_per_gpu" in result:
            full_job = 10 * tokens / (result["tokens_per_second_per_gpu"] * result["gpus"])
            result["projected_10_epoch_seconds"] = round(full_job, 1)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"data: {len(data)} examples, {int(tokens)} tokens an epoch; {flops / tokens / 1e9:.2f} GFLOP a token")


if __name__ == "__main__":
    main()
