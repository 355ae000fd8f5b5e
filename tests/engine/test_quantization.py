"""QLoRA without a GPU: the flags (LLaMA-Factory's names and defaults), the bitsandbytes settings they make, the
bytes the memory plan counts for quantised weights, and merge/chat of a QLoRA adapter onto the unquantised base.
Training and the numbers against plain PEFT + bitsandbytes are in tests/engine/test_qlora_gpu.py; the one-line
refusals (a CPU, no bitsandbytes, 8 bits under ZeRO-3) in tests/test_bad_inputs_table.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_merge import _adapter
from transformers import AutoModelForCausalLM, Qwen2Config

from benchmarks.qwen7b import QWEN25_7B, QWEN25_32B
from lorakit.__main__ import entry
from lorakit.cli import parse_config
from lorakit.config import Config, ModelConfig
from lorakit.engine.memory import GiB, ModelShape, plan_memory
from lorakit.engine.plan import plan_engine
from lorakit.engine.quantization import bnb_config, describe, quantized_bytes_per_weight
from lorakit.errors import LorakitError
from lorakit.resume import run_fingerprint

H100 = 79 * GiB


def test_flags_take_llama_factorys_names_and_defaults():
    model = parse_config(["--quantization_bit", "4"]).model
    assert (model.quantization_bit, model.quantization_method, model.quantization_type, model.double_quantization) == (
        4,
        "bnb",
        "nf4",
        True,
    )
    changed = parse_config(["--quantization_bit", "4", "--quantization_type", "fp4", "--double_quantization", "false"])
    assert (changed.model.quantization_type, changed.model.double_quantization) == ("fp4", False)
    assert parse_config([]).model.quantization_bit is None


def test_4_bit_weights_are_packed_in_the_training_dtype_and_computed_in_it():
    config = bnb_config(ModelConfig(quantization_bit=4), torch.bfloat16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.bnb_4bit_quant_storage == torch.bfloat16
    fp4 = bnb_config(ModelConfig(quantization_bit=4, quantization_type="fp4", double_quantization=False), torch.float16)
    assert (fp4.bnb_4bit_quant_type, fp4.bnb_4bit_use_double_quant, fp4.bnb_4bit_quant_storage) == (
        "fp4",
        False,
        torch.float16,
    )
    assert bnb_config(ModelConfig(quantization_bit=8), torch.bfloat16).load_in_8bit
    assert describe(ModelConfig(quantization_bit=4)) == "4-bit NF4, double quantisation"


def _shape(architecture: dict, bits: int | None, double: bool = True) -> ModelShape:
    flags = {"bf16": True, "quantization_bit": bits, "double_quantization": double, "zero_stage": 2}
    return plan_engine(Config.from_flat(flags), Qwen2Config(**architecture), 1, on_gpu=True).shape


def test_the_plan_counts_the_decoders_linear_weights_at_their_quantised_bytes():
    plain, nf4, nf4_single, int8 = (_shape(QWEN25_7B, None), _shape(QWEN25_7B, 4), _shape(QWEN25_7B, 4, False),
                                    _shape(QWEN25_7B, 8))  # fmt: skip
    hidden, inter, kv, layers = 3584, 18944, 512, 28
    linears = layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter)  # q, o; k, v; gate, up, down
    assert nf4.quantized == int8.quantized == linears and plain.quantized == 0
    rest = 2 * (plain.parameters - linears)  # embeddings, output head, norms, biases: bf16
    assert plain.weight_bytes == 2 * plain.parameters  # 14.2 GiB
    assert nf4.weight_bytes == pytest.approx(rest + linears * (0.5 + 1 / 64 + 4 / 64 / 256), rel=1e-6)  # 5.2 GiB
    assert nf4_single.weight_bytes == pytest.approx(rest + linears * (0.5 + 4 / 64), rel=1e-6)
    assert int8.weight_bytes == rest + linears  # 8.1 GiB
    assert 17.5 * GiB < _shape(QWEN25_32B, 4).weight_bytes < 18.5 * GiB  # the 32B: 61 GiB in bf16
    assert quantized_bytes_per_weight(ModelConfig(quantization_bit=8)) == 1.0


@pytest.mark.parametrize(
    ("lora_target", "additional_target", "refused"),
    [
        ("q_proj", "v_proj", "model.layers.0.self_attn.v_proj"),  # a packed linear layer
        ("q_proj", "mlp", "model.layers.0.mlp.gate_proj"),  # a module holding packed ones
        ("all", "lm_head", None),  # the output head stays unpacked: trainable in full
        ("all", "embed_tokens,norm", None),  # no linear layer
    ],
)
def test_a_module_trained_in_full_under_quantisation_holds_no_packed_weight(lora_target, additional_target, refused):
    flags = {"bf16": True, "zero_stage": 2, "lora_target": (lora_target,),
             "additional_target": tuple(additional_target.split(","))}  # fmt: skip
    small = Qwen2Config(**{**QWEN25_7B, "num_hidden_layers": 2})
    for bits in (None, 4):  # without --quantization_bit every one of them is a module to train in full
        config = Config.from_flat({**flags, "quantization_bit": bits})
        if bits and refused:
            with pytest.raises(LorakitError, match=f"it is \\(or holds\\) the linear layer {refused}, which "
                                                   "--quantization_bit 4 stores packed"):  # fmt: skip
                plan_engine(config, small, 1, on_gpu=True)
        else:
            assert plan_engine(config, small, 1, on_gpu=True).shape.parameters > 0


def test_a_4_bit_32b_is_kept_whole_under_zero3_on_80_gb_cards_where_bf16_is_partitioned():
    """QLoRA's 32B: 17.9 GiB of weights take under a quarter of an H100, so ZeRO-3 gathers them once."""
    nf4, bf16 = _shape(QWEN25_32B, 4), _shape(QWEN25_32B, None)
    for shape, kept in ((nf4, True), (bf16, False)):
        plan = plan_memory(shape, H100, True, 2, 1024, 0, None, step_tokens=2300, may_keep_frozen=True)
        assert plan.keep_frozen == kept and plan.gradient_checkpointing  # 32B activations need recompute on 80 GB
        assert ("frozen weights (17.9 GiB)" in plan.lines[-1]) == kept


def test_zero3_without_recompute_holds_every_gathered_4_bit_weight_until_backward():
    nf4 = _shape(QWEN25_32B, 4)
    extra = nf4.fixed_bytes(True, 2, checkpointing=False) - nf4.fixed_bytes(True, 2, checkpointing=True)
    assert extra == int(nf4.quantized_bytes * nf4.quantized) - 4 * nf4.weight_bytes // nf4.layers
    plain = _shape(QWEN25_32B, None)  # torch's linear saves the parameter itself, not a view of its gathered data
    assert plain.fixed_bytes(True, 2, checkpointing=False) == plain.fixed_bytes(True, 2, checkpointing=True)


def test_a_change_of_quantisation_is_a_change_of_the_run_for_resume(tiny_model: Path):
    plain = Config.from_flat({"model_name_or_path": str(tiny_model)})
    nf4 = Config.from_flat({"model_name_or_path": str(tiny_model), "quantization_bit": 4})
    assert "quantization" not in run_fingerprint(plain, "d", ["q_proj"])  # as in checkpoints from before QLoRA
    assert run_fingerprint(nf4, "d", ["q_proj"])["quantization"] == "4-bit NF4, double quantisation"


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter whose lorakit_config.json says it was trained with --quantization_bit 4."""
    folder = _adapter(tiny_model, tmp_path_factory.mktemp("qlora") / "adapter", ["q_proj", "down_proj"])
    record = json.loads((folder / "lorakit_config.json").read_text())
    record["lorakit"] |= {"model_name_or_path": "/models/tiny", "quantization_bit": 4, "quantization_method": "bnb",
                          "quantization_type": "nf4", "double_quantization": True}  # fmt: skip
    (folder / "lorakit_config.json").write_text(json.dumps(record))
    return folder


def test_merge_of_a_qlora_adapter_uses_the_unquantised_base_and_says_so(tiny_model: Path, qlora_adapter: Path,
                                                                        tmp_path: Path, capsys):  # fmt: skip
    assert entry(["merge", "--base", str(tiny_model), "--adapter", str(qlora_adapter), "--out", str(tmp_path)]) != 0
    capsys.readouterr()  # --out exists: refused before the line; now a fresh folder
    out = tmp_path / "merged"
    assert entry(["merge", "--base", str(tiny_model), "--adapter", str(qlora_adapter), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    trained = "trained on /models/tiny quantised to 4-bit NF4, double quantisation"
    assert lines[0] == (f"merge: QLoRA adapter ({trained}): using the unquantised base {tiny_model} (float32 weights "
                        "as stored), not a quantised one")  # fmt: skip
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        expected = PeftModel.from_pretrained(base, qlora_adapter)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chat_with_a_qlora_adapter_says_which_base_on_stderr(tiny_model: Path, qlora_adapter: Path, capsys):
    argv = ["chat", "--model", str(tiny_model), "--adapter", str(qlora_adapter), "--prompt", "hi"]
    assert entry([*argv, "--max_new_tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "chat: QLoRA adapter (trained on /models/tiny quantised to 4-bit NF4" in captured.err
    assert "QLoRA" not in captured.out  # stdout is the reply alone
