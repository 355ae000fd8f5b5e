import json
from pathlib import Path

import pytest

from lorakit.config import Config
from lorakit.engine.deepspeed_config import resolve_deepspeed_config
from lorakit.errors import LorakitError

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "ds_config_zero3.json"


def _config(**values) -> Config:
    base = {
        "model_name_or_path": "m",
        "dataset": ("d",),
        "output_dir": "o",
        "learning_rate": 5e-4,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "max_grad_norm": 1.0,
    }
    return Config.from_flat({**base, **values})


def test_reference_file_resolves_every_auto_and_drops_its_scheduler():
    ds, notes, _ = resolve_deepspeed_config(_config(deepspeed=str(REFERENCE)), world_size=8, hidden_size=3584,
                                            on_gpu=True, largest_lora=8 * 18944)  # fmt: skip
    assert "auto" not in json.dumps(ds)
    assert "scheduler" not in ds
    assert notes == [
        f"DeepSpeed file {REFERENCE}: its scheduler (WarmupLR) is replaced by lorakit's schedule "
        "(cosine, warmup, peak lr 0.0005)"
    ]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4,
        4,
        128,
    )
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {
        "lr": 5e-4,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "torch_adam": True,
    }
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 3584**2
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 3584**2)
    assert zero["stage3_param_persistence_threshold"] == 8 * 18944 + 1  # the adapter stays resident


def test_precision_flags_fill_auto_and_cpu_uses_torch_adamw():
    ds, _, _ = resolve_deepspeed_config(_config(deepspeed=str(REFERENCE), bf16=True), 2, 64, on_gpu=False)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_default_config_is_zero3_without_a_file():
    ds, notes, _ = resolve_deepspeed_config(_config(), 2, 64, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == 3 and notes == [] and "auto" not in json.dumps(ds)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"train_micro_batch_size_per_gpu": 2},
            "sets train_micro_batch_size_per_gpu=2 but --per_device_train_batch_size gives 4",
        ),
        (
            {"gradient_accumulation_steps": 8},
            "sets gradient_accumulation_steps=8 but --gradient_accumulation_steps gives 4",
        ),
        ({"train_batch_size": 64}, "sets train_batch_size=64 but micro x accumulation x world size gives 32"),
        ({"gradient_clipping": 0.5}, "sets gradient_clipping=0.5 but --max_grad_norm gives 1.0"),
        ({"bf16": {"enabled": True}}, "sets enabled=True but --bf16 False gives False"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "sets lr=0.0001 but --learning_rate gives 0.0005"),
        ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer type Lamb is unsupported"),
        (
            {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
            'fill "zero_optimization.sub_group_size": "auto"',
        ),
    ],
)
def test_contradictions_and_unknown_autos_are_errors(tmp_path: Path, override: dict, message: str):
    reference = json.loads(REFERENCE.read_text())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**reference, **override}))
    with pytest.raises(LorakitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_deepspeed_config(_config(deepspeed=str(path)), world_size=2, hidden_size=64, on_gpu=True)


def test_missing_or_broken_file(tmp_path: Path):
    with pytest.raises(LorakitError, match="file not found"):
        resolve_deepspeed_config(_config(deepspeed=str(tmp_path / "nope.json")), 2, 64, True)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LorakitError, match="is not valid JSON"):
        resolve_deepspeed_config(_config(deepspeed=str(tmp_path / "bad.json")), 2, 64, True)


@pytest.mark.parametrize(
    "stage, granularity, lorakit_units, kept",
    [
        (3, None, True, None),  # absent: lorakit gathers whole decoder layers
        (3, "auto", True, None),
        (3, 0, False, 0),  # a number: DeepSpeed decides (0 is its per-module gathering)
        (3, 10**7, False, 10**7),
        (2, "auto", False, None),  # nothing to gather below stage 3
    ],
)
def test_gathering_unit_is_lorakits_unless_the_file_sets_a_granularity(
    tmp_path: Path, stage: int, granularity, lorakit_units: bool, kept
):
    from lorakit.engine.deepspeed_config import lorakit_chooses_units

    config = json.loads(REFERENCE.read_text())
    config["zero_optimization"]["stage"] = stage
    if granularity is not None:
        config["zero_optimization"]["stage3_module_granularity_threshold"] = granularity
    (tmp_path / "ds.json").write_text(json.dumps(config))
    ds, _, _ = resolve_deepspeed_config(_config(deepspeed=str(tmp_path / "ds.json")), 2, 64, on_gpu=True)
    assert lorakit_chooses_units(ds) is lorakit_units
    assert ds["zero_optimization"].get("stage3_module_granularity_threshold") == kept


@pytest.mark.parametrize(
    "zero_settings, expected",
    [
        ({}, False),  # lorakit gathers whole layers: torch's own linear
        ({"stage3_module_granularity_threshold": 0}, None),  # DeepSpeed's units: DeepSpeed's default (its linear)
        ({"memory_efficient_linear": True}, True),  # the file's value is kept
        ({"stage": 2}, None),
    ],
)
def test_memory_efficient_linear_is_off_where_lorakit_gathers_whole_layers(tmp_path, zero_settings, expected):
    reference = json.loads(REFERENCE.read_text())
    reference["zero_optimization"].update(zero_settings)
    (tmp_path / "ds.json").write_text(json.dumps(reference))
    ds, _, _ = resolve_deepspeed_config(_config(deepspeed=str(tmp_path / "ds.json")), 2, 64, on_gpu=True)
    assert ds["zero_optimization"].get("memory_efficient_linear") == expected


@pytest.mark.parametrize(
    ("threshold", "stage", "zero_stage", "left_to_lorakit"),
    [
        ("auto", 3, None, True),
        (None, 3, None, True),  # absent under stage 3: HF's rule, lorakit fills it
        (8 * 128 + 1, 3, None, False),  # lorakit's own number, written on purpose: the file decides
        (10**12, 3, None, False),
        (None, 2, 3, True),  # --zero_stage 3 over a stage-2 file without the key
        (None, 3, 2, False),  # stage 2: no threshold at all
    ],
)
def test_the_persistence_threshold_is_lorakits_only_where_the_file_leaves_it(
    tmp_path: Path, threshold, stage: int, zero_stage, left_to_lorakit: bool
):
    zero = {"stage": stage} | ({} if threshold is None else {"stage3_param_persistence_threshold": threshold})
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": zero}))
    config = _config(deepspeed=str(tmp_path / "ds.json"), **({} if zero_stage is None else {"zero_stage": zero_stage}))
    _, _, filled = resolve_deepspeed_config(config, 2, 64, on_gpu=True, largest_lora=8 * 128)
    assert ("stage3_param_persistence_threshold" in filled) is left_to_lorakit


LAYER = 487_000_000  # about one Qwen2.5-32B decoder layer
REFERENCE_ZERO3 = {"stage": 3, "stage3_prefetch_bucket_size": 23_592_960, "stage3_max_live_parameters": 1e9,
                   "stage3_param_persistence_threshold": 51_200}  # fmt: skip


@pytest.mark.parametrize(
    ("zero", "prefetch_is_lorakits", "expected", "said"),
    [
        ({}, True, {"stage3_prefetch_bucket_size": LAYER, "stage3_max_live_parameters": 4 * LAYER},
         ["bucket_size one layer (487,000,000", "1e+09 -> 1,948,000,000 (4 layers"]),
        ({}, False, {"stage3_prefetch_bucket_size": 23_592_960, "stage3_max_live_parameters": 4 * LAYER},
         ["1e+09 -> 1,948,000,000"]),  # the file's own bucket stays
        ({"stage3_max_live_parameters": 3e9}, True, {"stage3_prefetch_bucket_size": LAYER,
                                                     "stage3_max_live_parameters": 3e9}, ["one layer"]),
        ({"stage3_max_live_parameters": 3e9}, False, None, None),  # nothing left to change
        ({"stage3_prefetch_bucket_size": 0}, False, None, None),  # the file turned prefetching off
        ({"stage3_module_granularity_threshold": 0}, True, None, None),  # DeepSpeed's per-module units
        ({"stage3_param_persistence_threshold": 10**12}, True, None, None),  # every weight whole: nothing to gather
        ({"stage": 2}, True, None, None),
    ],
    ids=["reference", "files-bucket", "budget-enough", "nothing-to-change", "prefetch-off", "per-module", "resident",
         "stage-2"],
)  # fmt: skip
def test_the_next_layer_is_gathered_ahead_where_lorakit_gathers_whole_layers(zero, prefetch_is_lorakits, expected,
                                                                             said):  # fmt: skip
    from lorakit.engine.deepspeed_config import gather_next_layer_ahead

    ds_config = {"zero_optimization": REFERENCE_ZERO3 | zero}
    before = json.dumps(ds_config)
    changed, lines = gather_next_layer_ahead(ds_config, LAYER, prefetch_is_lorakits)
    assert json.dumps(ds_config) == before  # the caller's config is not edited in place
    if expected is None:
        assert changed is ds_config and lines == []
        return
    assert {key: changed["zero_optimization"][key] for key in expected} == expected
    (line,) = lines
    assert line.startswith("ZeRO-3: the next decoder layer is gathered while one computes: ")
    assert all(part in line for part in said), line


@pytest.mark.parametrize(
    ("zero", "quantized", "one_host", "one_dtype", "expected"),
    [
        ({}, False, True, True, True),  # the reference file under whole-layer units: lorakit's all-reduce fetch
        ({"stage3_use_all_reduce_for_fetch_params": False}, False, True, True, False),  # the file's choice stays
        ({"stage3_module_granularity_threshold": 0}, False, True, True, None),  # DeepSpeed's per-module units
        ({}, True, True, True, None),  # QLoRA: the all-gather its GPU tests ran with
        ({}, False, False, True, None),  # several hosts: twice the traffic over the network, not measured
        ({}, False, True, False, None),  # weights kept in fp32 beside bf16 ones: DeepSpeed's all-reduce refuses
        ({"offload_param": {"device": "cpu"}}, False, True, True, None),  # offloaded parameters: not measured
        ({"stage": 2}, False, True, True, None),
    ],
    ids=["reference", "files-choice", "per-module", "qlora", "hosts", "fp32-modules", "offload", "stage-2"],
)
def test_layers_are_fetched_by_all_reduce_where_lorakit_chooses_the_units(zero, quantized, one_host, one_dtype,
                                                                          expected):  # fmt: skip
    from lorakit.engine.deepspeed_config import fetch_layers_by_all_reduce

    ds_config = {"zero_optimization": REFERENCE_ZERO3 | zero}
    before = json.dumps(ds_config)
    changed, lines = fetch_layers_by_all_reduce(ds_config, quantized, one_host, one_dtype)
    assert json.dumps(ds_config) == before  # the caller's config is not edited in place
    assert changed["zero_optimization"].get("stage3_use_all_reduce_for_fetch_params") is expected
    assert len(lines) == (expected is True and "stage3_use_all_reduce_for_fetch_params" not in zero)


@pytest.mark.parametrize(
    ("zero", "trained_full", "quantized", "expected"),
    [
        ({"contiguous_gradients": True}, 0, False, False),  # the reference file, an adapter: no bucket copies
        ({}, 0, False, False),  # DeepSpeed's default is true as well
        ({"contiguous_gradients": True, "reduce_scatter": False}, 0, False, True),  # the reduction reads the bucket
        ({"contiguous_gradients": True}, 1_000_000, False, True),  # modules trained in full: large gradients
        ({"contiguous_gradients": True}, 0, True, True),  # QLoRA: as its GPU tests ran
        ({"contiguous_gradients": True, "offload_optimizer": {"device": "cpu"}}, 0, False, True),
        ({"contiguous_gradients": True, "offload_param": {"device": "none"}}, 0, False, False),
        ({"contiguous_gradients": True, "stage": 2}, 0, False, True),  # stage 2 reduces from its buffer
    ],
    ids=["reference", "default", "no-reduce-scatter", "full-modules", "qlora", "offload", "offload-none", "stage-2"],
)
def test_adapter_gradients_skip_stage_3s_bucket_copies(zero, trained_full, quantized, expected):
    from lorakit.engine.deepspeed_config import reduce_adapter_gradients_in_place

    ds_config = {"zero_optimization": REFERENCE_ZERO3 | zero}
    before = json.dumps(ds_config)
    changed, lines = reduce_adapter_gradients_in_place(ds_config, trained_full, quantized)
    assert json.dumps(ds_config) == before  # the caller's config is not edited in place
    assert changed["zero_optimization"].get("contiguous_gradients", True) is expected
    assert len(lines) == (not expected)


@pytest.mark.parametrize(
    "stage, bf16, more, expected",
    [
        (2, {"enabled": True}, {}, False),  # lorakit's agreement checks every step: DeepSpeed's check is redundant
        (1, {"enabled": True}, {}, False),
        (3, {"enabled": True}, {}, None),  # stage 3 does not check in bf16: nothing to turn off
        (0, {"enabled": True}, {}, None),
        (2, {"enabled": False}, {}, None),  # fp32: DeepSpeed does not check
        (2, {"enabled": True, "check_grad_overflow": True}, {}, True),  # the file's word is kept
        (2, {"enabled": True, "check_grad_overflow": False}, {}, False),
        (2, {"enabled": True}, {"compute_grad_norm": False}, None),  # no norm for lorakit to check
        (1, {"enabled": True}, {"grad_accum_dtype": "fp32"}, None),  # DeepSpeed's BF16_Optimizer: no switch
        (2, {"enabled": True}, {"grad_accum_dtype": "fp32"}, False),
    ],
)
def test_deepspeed_s_overflow_check_is_left_to_lorakit_under_bf16_zero_1_and_2(stage, bf16, more, expected):
    from lorakit.engine.deepspeed_config import leave_overflow_check_to_lorakit

    zero = {"stage": stage} | {k: v for k, v in more.items() if k == "compute_grad_norm"}
    ds_config = {"bf16": bf16, "fp16": {"enabled": False}, "zero_optimization": zero}
    if "grad_accum_dtype" in more:
        ds_config["data_types"] = {"grad_accum_dtype": more["grad_accum_dtype"]}
    before = json.dumps(ds_config)
    changed, lines = leave_overflow_check_to_lorakit(ds_config)
    assert json.dumps(ds_config) == before  # the caller's config is not edited in place
    assert changed["bf16"].get("check_grad_overflow") is expected
    assert len(lines) == ("check_grad_overflow" not in bf16 and expected is False)


def test_a_deepspeed_without_the_overflow_switch_keeps_its_check(monkeypatch):
    """DeepSpeed's bf16 section forbids keys it does not know: an older DeepSpeed would reject the switch."""
    from lorakit.engine import deepspeed_config

    monkeypatch.setattr(deepspeed_config, "deepspeed_has_overflow_switch", lambda: False)
    ds_config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    assert deepspeed_config.leave_overflow_check_to_lorakit(ds_config) == (ds_config, [])


MODEL, LARGEST = 1_000_000, 100_000  # the model's weights and its largest single weight's elements


@pytest.mark.parametrize(
    ("zero", "why"),
    [
        ({"stage": 3, "stage3_param_persistence_threshold": MODEL + 1}, None),  # keep_frozen_weights_resident's
        ({"stage": 3, "stage3_param_persistence_threshold": LARGEST}, None),  # DeepSpeed keeps numel <= threshold
        ({"stage": 3, "stage3_param_persistence_threshold": LARGEST - 1}, "stage3_param_persistence_threshold"),
        ({"stage": 3, "stage3_param_persistence_threshold": "1e12"}, "stage3_param_persistence_threshold"),  # a str
        (
            {"stage": 3, "stage3_param_persistence_threshold": 10**12, "stage3_model_persistence_threshold": MODEL - 1},
            "stage3_model_persistence_threshold",
        ),
        (
            {"stage": 3, "stage3_param_persistence_threshold": 10**12, "stage3_model_persistence_threshold": 10**13},
            None,
        ),
        (
            {"stage": 3, "stage3_param_persistence_threshold": 10**12, "offload_param": {"device": "cpu"}},
            "offload_param",
        ),
        ({"stage": 3, "stage3_param_persistence_threshold": 10**12, "offload_param": {"device": "none"}}, None),
        ({"stage": 3, "stage3_param_persistence_threshold": 10**12, "offload_optimizer": {"device": "cpu"}}, None),
        ({"stage": 3}, "stage3_param_persistence_threshold"),  # absent: DeepSpeed's own is far below a weight matrix
        ({"stage": 2, "stage3_param_persistence_threshold": 1}, None),  # nothing partitioned: not ZeRO-3
    ],
)
def test_zero3_keeping_every_weight_whole_is_forecast_from_its_settings(zero, why):
    from lorakit.engine.deepspeed_config import keep_frozen_weights_resident, zero3_partitions

    said = zero3_partitions({"zero_optimization": zero}, LARGEST, MODEL)
    assert (said is None) == (why is None) and (why is None or why in said), said
    planned = keep_frozen_weights_resident({"zero_optimization": {"stage": 3}}, MODEL)  # the memory plan's own
    assert zero3_partitions(planned, LARGEST, MODEL) is None


@pytest.mark.parametrize(
    ("zero", "graphs", "overlap"),
    [
        ({"stage": 3, "overlap_comm": True}, True, False),
        ({"stage": 3}, True, False),  # absent: DeepSpeed's stage-3 default is on
        ({"stage": 3, "overlap_comm": False}, True, False),  # already off: nothing said
        ({"stage": 3, "overlap_comm": 0}, True, False),
        ({"stage": 3, "overlap_comm": True}, False, True),  # no graphs: the file's overlap stays
        ({"stage": 2, "overlap_comm": True}, True, True),  # ZeRO-2 copies on the compute stream anyway
    ],
)
def test_zero3_reduces_on_the_compute_stream_under_cuda_graphs(zero, graphs, overlap):
    from lorakit.engine.deepspeed_config import reduce_gradients_on_compute_stream

    ds_config = {"zero_optimization": dict(zero)}
    changed, lines = reduce_gradients_on_compute_stream(ds_config, graphs)
    assert bool(changed["zero_optimization"].get("overlap_comm", True)) is overlap
    assert ds_config == {"zero_optimization": zero}  # the caller's dict untouched
    said = bool(zero.get("overlap_comm", True)) and not overlap  # turned off here, not found off
    assert len(lines) == int(said)
    assert all(line.startswith("ZeRO-3 with CUDA graphs: overlap_comm -> false") for line in lines)
