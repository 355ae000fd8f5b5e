"""How long a packed row can be, and whether gradient checkpointing is needed: the model's shape against the
GPU's free memory, decided once before the model loads and printed with the step math.

Longer rows mean fewer forward passes a step, and at SFT's short examples every pass carries a fixed cost (see
benchmarks/RESULTS.md: on 2 H200s at the reference's global batch of 128, a rank's ~4,750 tokens took two
passes in rows of 4,096 and one in rows of 8,192, 0.66 s against 0.48 s a step under ZeRO-2, measured on two
different leases). Gradient checkpointing saves activation memory for a recomputed forward (about a third more
work), so it is only worth it when the rows would not fit.

The estimate, in the precision trained (2 bytes for bf16/fp16, 4 for fp32):
- activations kept for backward, per token and decoder layer: bytes x (16 x hidden + 4 x intermediate); with
  checkpointing only each layer's input stays (bytes x hidden), plus one layer's worth being recomputed. Under
  ZeRO-3 x 1.4 where DeepSpeed's memory-efficient linear runs (it saves every frozen linear's input for backward,
  which plain PyTorch does not: measured slopes on Qwen2.5-7B, session 2, 10.0 MB a token under ZeRO-3, 7.3
  under ZeRO-2; 7.45 estimated), x 1.2 where lorakit turns it off (its whole-layer units: measured on
  Qwen2.5-32B with compiled layers, session 13, 1.12 GiB a layer kept for 2,688 tokens, 1.165 x the formula);
- the frozen weights as stored (bytes x parameters; with --quantization_bit the decoder's linear weights at about
  0.52 byte (4-bit) or 1 byte (8-bit) each, lorakit.engine.quantization), divided by the GPUs under ZeRO-3, plus
  four layers' worth in flight (gathered ahead and kept for reuse across the forward/backward turn: DeepSpeed's
  live budget, lorakit.engine.deepspeed_config.gather_next_layer_ahead); under ZeRO-3
  with quantised weights and no checkpointing, every quantised weight whole instead: bitsandbytes' 4-bit matmul
  keeps a view of each gathered weight until that layer's backward;
- the loss: one chunk of fp32 logits, its gradient and softmax (lorakit.loss.CHUNK_ROWS x vocab x 12 bytes);
- modules trained in full (--additional_target: an embedding and output head are 1.1B weights on Qwen2.5-7B):
  their trained copy (bytes, divided by the GPUs under ZeRO-3) and, partitioned over the GPUs at every stage
  but 0, its gradient (bytes) and the optimizer's fp32 master and two moments (12 bytes). The LoRA matrices'
  own share of these is negligible and not counted.
Checked against six measured peaks of Qwen2.5-7B on H200s, 1 to 4 GPUs, rows of 1,280 to 4,096 tokens: within
2 GiB (tests/engine/test_memory.py). One peak ran 7 GiB over (ZeRO-3, 2 GPUs, a 4,864-token row), so only
HEADROOM of the free memory is planned, also for the allocator's fragmentation and NCCL's buffers.

Rules: an explicit --pack_tokens or --gradient_checkpointing is obeyed, and the other is planned around it. By
default rows are the longest power of two from 16,384 down that fits, in this order of preference: rows of at
least 4,096 tokens without checkpointing; then with it; then shorter rows (down to --cutoff_len) without, then
with it. Planned checkpointing covers the fewest decoder layers that fit, the first k (lorakit.engine.model.
recompute_first_layers_only; Megatron's `--recompute-num-layers`): each layer left out keeps its activations and
is not run again in backward. --gradient_checkpointing true recomputes every layer.
Rows are never planned longer than a rank's largest share of a step (the tokens it really gets,
`step_tokens`, lorakit.data.batching.step_tokens_bound): a longer row is never filled, and planning for one turned
checkpointing on for a 32B model that fit without it (rows of 16,384 planned at ~45 GiB, 2,300 tokens a rank a
step, 21.6 GiB measured peak). Nor are a row's activations counted beyond that share (`pass_tokens`): Qwen2.5-32B
on 4 H100s at the reference's batch has rows of 4,096 tokens but passes of at most 2,944, and recomputed 43 of its
64 layers where sizing the full row recomputed 50 (measured: 42.0 GiB at peak against 57 planned, session 13); with
the ZeRO-3 factor measured without DeepSpeed's linear (1.2, above) it recomputes 39.
The order is a judgement from the H200 measurements: a pass of ~1,200 tokens cost 0.23 s and one of
4,096 about 0.33 s, so passes shorter than 4,096 tokens are mostly fixed cost, while recomputation adds a third.
Every rank plans from the smallest free memory of any rank, so all agree on the rows. On the CPU nothing is
planned: rows of max(--cutoff_len, 4096) tokens, no checkpointing.

Under ZeRO-3 with lorakit's automatic persistence threshold, the frozen weights stay whole on every GPU when they
take at most KEEP_FROZEN_SHARE of its free memory (and the rows still fit): ZeRO-3 then gathers each weight once
instead of twice a step per layer, and the adapter's gradients and optimizer state stay partitioned. Measured on 4
H200s at the reference's global batch: 0.618 -> 0.417 s a step, losses identical (benchmarks/RESULTS.md). A model
too large for that (a 32B on 80 GB cards) is partitioned, and what the plan leaves of its budget keeps the first
decoder layers' frozen weights whole instead (`resident_layers`: a whole layer each, since DeepSpeed keeps a
gathered weight's partition beside it, 0.91 GiB a Qwen2.5-32B layer): ZeRO-3 then stops gathering those layers for
every forward and backward (after the first step, whose trace DeepSpeed records releasing everything). On 4 H200s
(the 32B fits without recomputation) a layer's gather costs the step ~1.4 ms each time even when prefetched (it
slows the matmuls beside it, benchmarks/RESULTS.md session 13). Recomputation is settled first: a layer not
recomputed saves a whole forward of it (~1.1 GiB of a 32B's activations at ~2,700 tokens), about what two gathers
cost, for more memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.batching import GPU_ROW_MULTIPLE
from lorakit.loss import CHUNK_ROWS

HEADROOM = 0.8
KEEP_FROZEN_SHARE = 0.25
ZERO3_ACTIVATIONS = 1.4  # with DeepSpeed's memory-efficient linear (its default)
ZERO3_ACTIVATIONS_TORCH_LINEAR = 1.2  # without it (lorakit's whole-layer units turn it off)
LONGEST_ROW = 16384
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    parameters: int
    dtype_bytes: int  # of the precision trained
    trained_full: int = 0  # weights of the modules --additional_target trains in full (copies beside the frozen)
    quantized: int = 0  # of the parameters, those stored quantised (--quantization_bit: the decoder's linears)
    quantized_bytes: float = 0.0  # a quantised weight's bytes, its quantisation constants included
    largest_layer: int = 0  # weights of the largest decoder layer (0: the model names no decoder layer class)
    largest_weight: int = 0  # elements of the largest single weight (0: not counted)

    @classmethod
    def of(cls, hf_config: Any, parameters: int, dtype_bytes: int, trained_full: int = 0, quantized: int = 0,
           quantized_bytes: float = 0.0, largest_layer: int = 0, largest_weight: int = 0) -> ModelShape:  # fmt: skip
        hidden = hf_config.hidden_size
        return cls(hf_config.num_hidden_layers, hidden, getattr(hf_config, "intermediate_size", None) or 4 * hidden,
                   hf_config.vocab_size, parameters, dtype_bytes, trained_full, quantized, quantized_bytes,
                   largest_layer, largest_weight)  # fmt: skip

    @property
    def weight_bytes(self) -> int:
        """The frozen weights as stored on the GPU."""
        return int(self.dtype_bytes * (self.parameters - self.quantized) + self.quantized_bytes * self.quantized)

    def recomputed(self, checkpointing: bool, checkpointed: int | None) -> int:
        """Layers recomputed in backward: `checkpointed` of them, or all with checkpointing (None), or none."""
        return (self.layers if checkpointed is None else checkpointed) if checkpointing else 0

    def activation_bytes(self, tokens: int, checkpointing: bool, zero3: bool, checkpointed: int | None = None,
                         efficient_linear: bool = True) -> int:  # fmt: skip
        """`efficient_linear`: under ZeRO-3, DeepSpeed's memory-efficient linear runs (see the module docstring)."""
        layer = self.dtype_bytes * (16 * self.hidden + 4 * self.intermediate)
        recomputed = self.recomputed(checkpointing, checkpointed)
        per_token = (self.layers - recomputed) * layer + recomputed * self.dtype_bytes * self.hidden
        per_token += layer if recomputed else 0  # the layer being recomputed
        factor = (ZERO3_ACTIVATIONS if efficient_linear else ZERO3_ACTIVATIONS_TORCH_LINEAR) if zero3 else 1
        return int(tokens * per_token * factor)

    def fixed_bytes(self, zero3: bool, world_size: int, checkpointing: bool = True,
                    checkpointed: int | None = None) -> int:  # fmt: skip
        weights = self.weight_bytes
        if zero3:
            # bitsandbytes' 4-bit matmul keeps a view of the gathered weight for backward, so every layer not
            # recomputed keeps its gathered weights until that layer's backward
            kept = self.layers - self.recomputed(checkpointing, checkpointed)
            in_flight = int(self.quantized_bytes * self.quantized * kept / self.layers) if self.quantized else 0
            weights = weights // world_size + max(in_flight, 4 * weights // self.layers)
        trained = int(self.trained_full * (self.dtype_bytes / (world_size if zero3 else 1)
                                           + (self.dtype_bytes + 12) / world_size))  # fmt: skip
        return weights + trained + CHUNK_ROWS * self.vocab * 12


@dataclass(frozen=True)
class MemoryPlan:
    pack_tokens: int
    gradient_checkpointing: bool
    lines: list[str]
    keep_frozen: bool = False  # ZeRO-3 keeps every frozen weight whole on every GPU
    checkpointed_layers: int | None = None  # with checkpointing, the first this many decoder layers only (None: all)
    resident_layers: int = 0  # ZeRO-3: the first this many decoder layers' frozen weights stay whole on every GPU
    peak_share: float = 0.0  # the estimated peak over the free memory (0.0: nothing planned, the CPU)


def row_candidates(cutoff_len: int) -> list[int]:
    """Row lengths to try, longest first: powers of two from LONGEST_ROW down, and --cutoff_len itself."""
    rows = [n for n in (LONGEST_ROW >> k for k in range(8)) if n >= cutoff_len]
    return sorted(set(rows) | {cutoff_len}, reverse=True)


def plan_memory(shape: ModelShape, free_bytes: int | None, zero3: bool, world_size: int, cutoff_len: int,
                pack_tokens: int, checkpointing: bool | None, batch_tokens: int = 0,
                step_tokens: int = 0, may_keep_frozen: bool = False,
                efficient_linear: bool = True) -> MemoryPlan:  # fmt: skip
    """The rows and checkpointing to train with. pack_tokens 0 = plan it; checkpointing None = plan it.
    batch_tokens > 0: packing is off and a forward pass holds at most this many tokens (micro-batch x cutoff).
    step_tokens > 0: the most tokens a rank gets in one step; no row is planned longer than needed for it.
    may_keep_frozen: ZeRO-3's persistence threshold is lorakit's to choose (see the module docstring).
    efficient_linear: ZeRO-3 runs DeepSpeed's memory-efficient linear (`memory_efficient_linear`, its default)."""
    if free_bytes is None:  # the CPU: nothing planned
        return MemoryPlan(pack_tokens or max(cutoff_len, 4096), bool(checkpointing), [])
    weights = shape.weight_bytes
    if zero3 and may_keep_frozen and weights <= KEEP_FROZEN_SHARE * free_bytes:
        kept = plan_memory(shape, free_bytes, False, world_size, cutoff_len, pack_tokens, checkpointing,
                           batch_tokens, step_tokens)  # fmt: skip
        partitioned = plan_memory(shape, free_bytes, True, world_size, cutoff_len, pack_tokens, checkpointing,
                                  batch_tokens, step_tokens, efficient_linear=efficient_linear)  # fmt: skip
        if (kept.pack_tokens, kept.gradient_checkpointing) == (partitioned.pack_tokens,
                                                               partitioned.gradient_checkpointing):  # fmt: skip
            # kept's own count of recomputed layers, which may be more: gathering once a step saves more
            line = (f"ZeRO-3: the frozen weights ({weights / GiB:.1f} GiB) take under {KEEP_FROZEN_SHARE:.0%} of the "
                    "smallest GPU's free memory and are kept whole on every GPU, gathered once (a number for "
                    "stage3_param_persistence_threshold in the DeepSpeed file partitions them)")  # fmt: skip
            return MemoryPlan(kept.pack_tokens, kept.gradient_checkpointing, [*kept.lines, line], True,
                              kept.checkpointed_layers, peak_share=kept.peak_share)  # fmt: skip

    share = 0 if batch_tokens else step_tokens  # a padded micro-batch is sized as it is, never by a packed share

    def needed(tokens: int, recomputed: int) -> int:  # recomputed: how many layers (0 to all)
        return (shape.activation_bytes(pass_tokens(tokens, share), recomputed > 0, zero3, recomputed, efficient_linear)
                + shape.fixed_bytes(zero3, world_size, recomputed > 0, recomputed))  # fmt: skip

    def fewest_recomputed(tokens: int) -> int | None:
        """The fewest layers to recompute for rows of `tokens` to fit (all: None if even that does not)."""
        fitting = [k for k in range(1, shape.layers + 1) if needed(tokens, k) <= HEADROOM * free_bytes]
        return fitting[0] if fitting else None

    fixed_rows = batch_tokens or pack_tokens
    asked = {None: None, True: shape.layers, False: 0}[checkpointing]
    if fixed_rows:
        if asked is None:  # rows fixed by the user: recompute the fewest layers they need, if any
            fits_whole = needed(fixed_rows, 0) <= HEADROOM * free_bytes
            asked = 0 if fits_whole else fewest_recomputed(fixed_rows) or shape.layers
        recomputed = asked
        rows = pack_tokens  # 0 with packing off: nothing to choose
    else:
        recomputed, rows = planned_rows(shape, cutoff_len, step_tokens, asked, needed, fewest_recomputed,
                                        HEADROOM * free_bytes)  # fmt: skip
    tokens = fixed_rows or rows
    estimate = needed(tokens, recomputed)
    partial = 0 < recomputed < shape.layers
    which = f"on for {recomputed} of {shape.layers} layers" if partial else "on" if recomputed else "off"
    held = pass_tokens(tokens, share)
    holds = f" (a pass holds at most {held:,}: a rank's largest share of a step)" if held < tokens else ""
    line = (f"memory plan: {free_bytes / GiB:.0f} GiB free on the smallest GPU; "
            f"{'rows' if rows else 'micro-batches'} of {tokens:,} tokens{holds}, gradient checkpointing {which}: "
            f"about {estimate / GiB:.0f} GiB at peak (lorakit.engine.memory)")  # fmt: skip
    lines = [line]
    if estimate > HEADROOM * free_bytes:
        lines.append(f"WARNING: the estimate exceeds {HEADROOM:.0%} of free memory; if the GPU runs out, lower "
                     "--cutoff_len or --pack_tokens, or spread the model with ZeRO-3 over more GPUs")  # fmt: skip
    room = HEADROOM * free_bytes - estimate
    resident, said = resident_layers(shape, room, world_size) if zero3 and may_keep_frozen else (0, [])
    return MemoryPlan(rows, recomputed > 0, lines + said, checkpointed_layers=recomputed if partial else None,
                      resident_layers=resident, peak_share=estimate / free_bytes)  # fmt: skip


def resident_layer_bytes(shape: ModelShape) -> int:
    """What keeping one decoder layer's frozen weights whole adds to a GPU: the whole layer (DeepSpeed keeps each
    gathered weight's partition beside it)."""
    return shape.dtype_bytes * shape.largest_layer


def resident_layers(shape: ModelShape, room: float, world_size: int) -> tuple[int, list[str]]:
    """How many decoder layers' frozen weights fit whole in `room` bytes left by the plan (see the module
    docstring), and the plan's line saying so. 0 under quantisation (bitsandbytes' packed weights have their own
    in-flight rule, above) or on one GPU (nothing partitioned)."""
    if shape.quantized or not shape.largest_layer or world_size < 2 or room <= 0:
        return 0, []
    count = min(shape.layers, int(room // resident_layer_bytes(shape)))
    if not count:
        return 0, []
    return count, [f"ZeRO-3: the first {count} of {shape.layers} decoder layers keep their frozen weights whole on "
                   f"every GPU ({count * resident_layer_bytes(shape) / GiB:.0f} GiB of the plan's room left), not "
                   "gathered again after the first step"]  # fmt: skip


def pass_tokens(rows: int, step_tokens: int) -> int:
    """The most tokens one forward pass holds: a row, or a rank's largest share of a step where that is shorter
    (padded to the GPU's row multiple); its activations are what the plan sizes. 0: the share is unknown."""
    if not step_tokens:
        return rows
    return min(rows, -(-step_tokens // GPU_ROW_MULTIPLE) * GPU_ROW_MULTIPLE)


def planned_rows(shape: ModelShape, cutoff_len: int, step_tokens: int, asked: int | None, needed: Any,
                 fewest_recomputed: Any, budget: float) -> tuple[int, int]:  # fmt: skip
    """(layers recomputed, row length) by the module docstring's order of preference; `asked`: the layers the
    user's --gradient_checkpointing fixes (all or none), None to plan. With recomputation planned, the longest row
    that fits with some is taken with the fewest layers it needs (Megatron's `--recompute-num-layers` idea): each
    layer not recomputed saves a forward of it in backward."""
    candidates = row_candidates(cutoff_len)
    holding = [n for n in candidates if n >= step_tokens]
    if step_tokens and holding:  # longer than the shortest row that holds a rank's whole share: never filled
        candidates = [n for n in candidates if n <= min(holding)]
    long_rows = [n for n in candidates if n >= 4096]
    short_rows = [n for n in candidates if n < 4096]
    for rows_ in (long_rows, short_rows):
        for option in [0, "fewest"] if asked is None else [asked]:
            for n in rows_:
                recomputed = fewest_recomputed(n) if option == "fewest" else option
                if recomputed is not None and needed(n, recomputed) <= budget:
                    return recomputed, n
    return (shape.layers if asked is None else asked), cutoff_len
