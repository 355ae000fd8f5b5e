"""A CPU proxy for ZeRO-3's per-step Python: the call graph of a Qwen2.5-7B LoRA step, on a model small enough for
a laptop. Measures what the GPU hosts are too scarce to measure for every change; a GPU lease confirms the result.

    python benchmarks/zero3_proxy.py --jsonl benchmarks/results.jsonl              # ZeRO-3, frozen weights kept whole
    python benchmarks/zero3_proxy.py --zero_stage 2                                 # the ZeRO-2 reference
    python benchmarks/zero3_proxy.py --zero_stage 2 --bf16 [--keep_overflow_check]  # bf16, as on the GPUs

Why it stands for the 7B: a step's Python work grows with the number of modules and parameters DeepSpeed hooks,
not with their size. The model here has Qwen2.5-7B's 28 decoder layers with LoRA on all 7 linears of each (392
adapter matrices, ~1,170 modules), one rank, the reference's DeepSpeed file with every frozen weight kept whole
(as the memory plan does for the 7B on 4 GPUs) and a gradient bucket that holds ~60 % of the adapter (the 7B's
12.8 M of 20 M elements). What it cannot show: kernel launches, collectives between ranks, GPU time. It reports
the Python calls of 5 steps under cProfile (deterministic: the number to compare) and the median wall time of a step
in 7 windows of 3 without it (two examples a step, so that Python, not arithmetic, fills it, as on the GPUs).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def write_inputs(root: Path, zero_stage: int, bf16: bool, keep_overflow_check: bool) -> list[str]:
    """The 28-layer model, 400 alpaca records and the DeepSpeed file; returns the flags of the run."""
    import tiny
    from transformers import Qwen2Config, Qwen2ForCausalLM

    records = tiny.alpaca_records(400)
    tokenizer = tiny.make_tokenizer([" ".join(r.values()) for r in records] + ["system user assistant"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tiny.write_dataset(root / "data", records)
    deepspeed = json.loads((REPO / "examples" / "ds_config_zero3.json").read_text())
    deepspeed["zero_optimization"].update(stage3_param_persistence_threshold=10**12, reduce_bucket_size=150_000)
    if keep_overflow_check:  # DeepSpeed's per-gradient check under bf16 ZeRO-1/2, which lorakit otherwise turns off
        deepspeed.setdefault("bf16", {})["check_grad_overflow"] = True
    (root / "ds.json").write_text(json.dumps(deepspeed))
    return ["--model_name_or_path", str(root / "model"), "--template", "qwen", "--dataset_dir", str(root / "data"),
            "--dataset", "tiny", "--cutoff_len", "256", "--lora_target", "all", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--deepspeed", str(root / "ds.json"), "--output_dir",
            str(root / "out"), "--num_train_epochs", "10", "--zero_stage", str(zero_stage),
            "--bf16", str(bf16)]  # fmt: skip


def measure(flags: list[str], top: int) -> dict:
    from lorakit.cli import parse_config
    from lorakit.train import run_step, set_learning_rate, set_up, step_plans
    from lorakit.validate import validate

    config = parse_config(flags)
    if config.model.bf16:
        import lorakit.validate  # lorakit refuses bf16 on the CPU for users (fp32 trains there); DeepSpeed runs it

        lorakit.validate.validate_precision = lambda config: None
    run = set_up(checked := validate(config))
    engine, dist = run.built.engine, run.dist
    set_learning_rate(engine, config.train.learning_rate)
    plans, pad_id = step_plans(run), checked.tokenizer.pad_token_id
    engine.train()

    def steps(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            run_step(engine, run.data, next(plans), dist, pad_id, config.train.packing)
        return (time.perf_counter() - started) / count

    steps(3)  # warm-up: first gathers, allocator, optimizer state
    seconds = statistics.median(steps(3) for _ in range(7))  # a shared CPU: the median of 7 windows
    profile = cProfile.Profile()
    profile.enable()
    steps(5)
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    print(text.getvalue())
    return {"python_calls_5_steps": stats.total_calls, "seconds_per_step": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero_stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--bf16", action="store_true", help="train in bf16, as the GPUs do (see measure)")
    parser.add_argument("--keep_overflow_check", action="store_true",
                        help="bf16 under ZeRO-1/2: keep DeepSpeed's per-gradient overflow check")  # fmt: skip
    parser.add_argument("--top", type=int, default=25, help="functions listed by their own time")
    parser.add_argument("--jsonl", type=Path, default=None, help="append the result here as one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorakit-zero3-proxy-") as root:
        result = measure(write_inputs(Path(root), args.zero_stage, args.bf16, args.keep_overflow_check), args.top)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    variant = ("-bf16" if args.bf16 else "") + ("-overflowcheck" if args.keep_overflow_check else "")
    line = {"run": f"cpu-proxy-zero{args.zero_stage}{variant}@1", "stage": args.zero_stage, "gpus": 0,
            "card": "CPU proxy (28-layer tiny Qwen2, one rank)", "date": datetime.date.today().isoformat(),
            "commit": commit.stdout.strip(), **result}  # fmt: skip
    print(json.dumps(line))
    if args.jsonl:
        with open(args.jsonl, "a") as out:
            out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
