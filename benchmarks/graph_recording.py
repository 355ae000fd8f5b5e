"""What a new row length costs under CUDA graphs: one GPU, the Qwen2.5-7B layer's shapes (28 layers by default, a
small vocabulary), LoRA on every linear as the reference's flags, lorakit's compile_decoder_layers in reduce-overhead
mode, steps (forward and backward of one packed row) at a sequence of row lengths, each length three times in a row,
then the first again. An experiment for issue 11: the whole job paid ~4-8 s at each new row length with graphs.

    python benchmarks/graph_recording.py [LAYERS] ['{"triton.slow_path_cudagraph_asserts": false}'] [keep-cache]
        [torch-lookups]

The JSON argument sets torch._inductor.config options; `keep-cache` makes torch.cuda.empty_cache (which
torch.cuda.graph calls before each capture: one a layer's forward and one its backward) a no-op; `torch-lookups`
records with torch's own cudagraph-tree lookups, not lorakit's (lorakit.engine.graph_trees). Prints one JSON
line: each step's length and seconds, the eager step's seconds; then cProfile's top functions (by own and by
cumulative time) over the three steps of the second row length.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compile_cost import build_model, set_inductor_options  # noqa: E402
from lorakit.engine import graph_trees  # noqa: E402
from lorakit.engine.kernels import compile_decoder_layers  # noqa: E402
from lorakit.loss import model_loss_sum  # noqa: E402

LENGTHS = (2304, 2432, 2560, 2176)


def step_seconds(model: torch.nn.Module, length: int) -> float:
    """One packed row of `length` tokens (examples of ~300 tokens), forward and backward, timed to the GPU's end."""
    started = time.perf_counter()
    pieces = [300] * (length // 300) + ([length % 300] if length % 300 else [])
    input_ids = torch.randint(3, 1024, (1, length))
    position_ids = torch.cat([torch.arange(n) for n in pieces])[None]
    inputs = {"input_ids": input_ids.cuda(), "position_ids": position_ids.cuda()}
    model_loss_sum(model, inputs, input_ids.clone()).backward()
    torch.cuda.synchronize()
    return round(time.perf_counter() - started, 3)


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 28
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    keep_cache = "keep-cache" in sys.argv[3:]
    set_inductor_options(options)
    if keep_cache:
        torch.cuda.empty_cache = lambda: None
    model = build_model(layers)
    with torch.compiler.set_stance("force_eager"):
        eager = [step_seconds(model, LENGTHS[0]) for _ in range(3)]
    compile_decoder_layers(model, mode="reduce-overhead")
    if "torch-lookups" in sys.argv[3:]:
        graph_trees.restore_torch_lookups()
    steps = []
    profile = cProfile.Profile()
    for index, length in enumerate((*LENGTHS[:1], *LENGTHS, LENGTHS[0])):
        for _ in range(1 if index in (0, len(LENGTHS) + 1) else 3):
            if index == 2:
                profile.enable()
            steps.append((length, step_seconds(model, length)))
            profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
    lookups = "torch" if "torch-lookups" in sys.argv[3:] else "lorakit"
    print(json.dumps({"layers": layers, "options": options, "keep_cache": keep_cache, "lookups": lookups,
                      "eager_step_seconds": eager,
                      "steps": steps, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}))  # fmt: skip
    print(text.getvalue())


if __name__ == "__main__":
    main()
