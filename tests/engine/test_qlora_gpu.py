"""QLoRA on the GPU: lorakit's quantised model against a plain PEFT + bitsandbytes one, training under ZeRO-3 and
ZeRO-2, and the saved adapter on the 4-bit and on the unquantised base.

Skipped without bitsandbytes (lorakit[qlora]), so CI on the CPU skips the whole file. The first test also runs
on the CPU where bitsandbytes is installed (its CPU backend quantises and multiplies; lorakit itself refuses to
train there), which checks the construction anywhere; the rest need CUDA, and the training launch uses 2 GPUs
where the host has them (1 otherwise). The tiny model (tests/tiny.py: hidden 64, intermediate 128) fits
bitsandbytes' blocks of 64 weights exactly.

    PYTHONPATH=. python -m pytest -q tests/engine/test_qlora_gpu.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from launch import REPO, launch, torchrun
from tiny import make_model

from lorakit.config import LoraSettings, ModelConfig
from lorakit.engine.model import attach_lora, linear_module_names, load_base_model, model_config
from lorakit.loss import model_loss_sum

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="QLoRA needs bitsandbytes (pip install 'lorakit[qlora]')")  # fmt: skip
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="lorakit trains QLoRA on CUDA GPUs only")
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
SETTINGS = {
    "nf4": ModelConfig(quantization_bit=4),
    "fp4, single quantisation": ModelConfig(quantization_bit=4, quantization_type="fp4", double_quantization=False),
    "int8": ModelConfig(quantization_bit=8),
}


def _plain_bnb_config(settings: ModelConfig):
    """The BitsAndBytesConfig written out as PEFT's ZeRO-3/FSDP QLoRA guide does, not through lorakit."""
    from transformers import BitsAndBytesConfig

    if settings.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quantization_type,
                              bnb_4bit_use_double_quant=settings.double_quantization,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)  # fmt: skip


def _plain_peft_model(tiny_model: Path, settings: ModelConfig, use_dora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, device_map={"": DEVICE},
                                                 quantization_config=_plain_bnb_config(settings))  # fmt: skip
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=linear_module_names(model), use_dora=use_dora,
                      task_type="CAUSAL_LM")  # fmt: skip
    # the adapter in the base's precision, as lorakit keeps it (lorakit.engine.model.attach_lora says why)
    return get_peft_model(model, lora, autocast_adapter_dtype=False)


def _lorakit_model(tiny_model: Path, settings: ModelConfig, use_dora: bool):
    path = str(tiny_model)
    model = load_base_model(path, model_config(path), torch.bfloat16, {}, False, 0, quantization=(settings, DEVICE))
    return attach_lora(model, LoraSettings(lora_rank=8, lora_alpha=16, use_dora=use_dora), 0)


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for name, param in model.named_parameters():  # LoRA B starts at zero; give it values so A's gradients exist
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    generator = torch.Generator().manual_seed(0)
    lengths = [37, 90, 1, 128]  # a packed row: positions restart at each example
    input_ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs = {"input_ids": input_ids.to(DEVICE), "position_ids": position_ids.to(DEVICE)}
    model.train()  # as in training (bitsandbytes' CPU backend repacks weights for inference in eval mode)
    loss = model_loss_sum(model, inputs, input_ids.clone())
    loss.backward()
    grads = {name: param.grad.float().cpu() for name, param in model.named_parameters() if param.requires_grad}
    return loss.detach().float().cpu(), grads


def _frozen_state(model) -> dict[str, torch.Tensor]:
    """The quantised weights as stored, and their quantisation constants."""
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            state[name] = param.detach().cpu()
            quant = getattr(param, "quant_state", None)
            if quant is not None:
                state[f"{name}.absmax"] = quant.absmax.cpu()
            if getattr(param, "SCB", None) is not None:
                state[f"{name}.SCB"] = param.SCB.cpu()
    return state


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", SETTINGS)
def test_lorakit_quantises_and_trains_as_plain_peft_with_bitsandbytes(tiny_model: Path, name: str, use_dora: bool):
    """Same checkpoint, same bitsandbytes settings, same seed: the same packed weights and constants, bit for bit;
    then the same loss, and every LoRA (and DoRA magnitude) gradient, up to the order of floating-point sums
    (identical kernels on identical inputs: a few bf16 rounding steps at most, so 1e-3 relative on a loss summed
    over 255 tokens, and 2 % of each gradient's largest entry)."""
    settings = SETTINGS[name]
    if use_dora and settings.quantization_bit == 8:
        pytest.skip("DoRA is exercised on the 4-bit layers")
    ours, plain = _lorakit_model(tiny_model, settings, use_dora), _plain_peft_model(tiny_model, settings, use_dora)
    ours_state, plain_state = _frozen_state(ours), _frozen_state(plain)
    assert ours_state.keys() == plain_state.keys()
    for key, tensor in ours_state.items():  # bytes: packed 4-bit weights read as bf16 include NaN patterns
        assert torch.equal(tensor.contiguous().view(torch.uint8), plain_state[key].contiguous().view(torch.uint8)), key
    quantized = [p for p in ours.parameters() if hasattr(p, "quant_state") or hasattr(p, "SCB")]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    if settings.quantization_bit == 4:
        first = quantized[0]
        assert first.dtype == torch.bfloat16 and first.quant_state.quant_type == settings.quantization_type
        assert first.quant_state.nested == settings.double_quantization
    ours_loss, ours_grads = _loss_and_grads(ours)
    plain_loss, plain_grads = _loss_and_grads(plain)
    torch.testing.assert_close(ours_loss, plain_loss, rtol=1e-3, atol=0)
    assert ours_grads.keys() == plain_grads.keys() and len(ours_grads) == 2 * 7 * (3 if use_dora else 2)
    for key, grad in ours_grads.items():
        scale = plain_grads[key].abs().max()
        assert scale > 0, key
        torch.testing.assert_close(grad, plain_grads[key], rtol=2e-2, atol=2e-2 * float(scale), msg=key)


@pytest.fixture(scope="module")
def learner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with weights of std 0.1: its frozen output head reaches logits a dozen LoRA steps can move
    (at 0.02 the loss barely falls), without the saturated attention of larger weights, where one bf16 rounding
    step flips which token a head attends to."""
    return make_model(tmp_path_factory.mktemp("learner") / "model", initializer_range=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, learner: Path, tiny_data: Path) -> Path:
    """tests/qlora_driver.py on up to 2 GPUs: QLoRA under ZeRO-2, ZeRO-3 partitioned and ZeRO-3 kept whole."""
    workdir = tmp_path_factory.mktemp("qlora")
    script = str(REPO / "tests" / "qlora_driver.py")
    ranks = min(2, torch.cuda.device_count())
    launch([*torchrun(ranks), script, str(workdir), str(learner), str(tiny_data)], workdir / "log")
    return workdir


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_cuda
@pytest.mark.parametrize("run, reference", [("zero3", "zero2"), ("zero3_kept", "zero2"), ("dora_zero3", "dora_zero2")])
def test_zero3_qlora_trains_as_zero2_qlora(trained: Path, run: str, reference: str):
    """ZeRO-3 with every 4-bit weight partitioned (`zero3`, `dora_zero3`) or kept whole (`zero3_kept`) computes
    what ZeRO-2 does: the first step's loss before any update to bf16 rounding, the later ones within 3 % (bf16
    updates drift), and the loss falls."""
    zero3, zero2 = _log(trained / run / "trainer_log.jsonl"), _log(trained / reference / "trainer_log.jsonl")
    assert len(zero3) == len(zero2) >= 3
    assert zero3[0]["loss"] == pytest.approx(zero2[0]["loss"], rel=1e-3)
    assert zero3[0]["grad_norm"] == pytest.approx(zero2[0]["grad_norm"], rel=2e-2)
    for a, b in zip(zero3[1:], zero2[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=3e-2)
    assert zero3[-1]["loss"] < 0.8 * zero3[0]["loss"]  # 6.4 -> 3.6 in fp32 on 2 CPU ranks (QLoRA forced there)
    print(f"QLoRA on {json.loads((trained / 'metrics.json').read_text())['world_size']} GPU(s)")


@needs_cuda
def test_8_bit_qlora_trains_under_zero2(trained: Path):
    log = _log(trained / "int8_zero2" / "trainer_log.jsonl")
    assert len(log) >= 3 and log[-1]["loss"] < 0.8 * log[0]["loss"]


def _quantized_base(tiny_model: Path):
    from transformers import AutoModelForCausalLM

    nf4 = _plain_bnb_config(ModelConfig(quantization_bit=4))
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, device_map={"": DEVICE},
                                                quantization_config=nf4)  # fmt: skip


def _training_ids(tiny_model: Path, tiny_data: Path) -> torch.Tensor:
    """Sixteen training records in the chat format, as one row."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = json.loads((tiny_data / "tiny.json").read_text())[:16]
    chats = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
             for r in records]  # fmt: skip
    text = "".join(tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats)
    return torch.tensor(tokenizer(text)["input_ids"])[None]


def _losses(model, ids: torch.Tensor) -> tuple[float, float]:
    """(the base's loss, the base + adapter's) on `ids`, every token a target."""
    ids = ids.to(DEVICE)
    with torch.no_grad():
        adapted = float(model(input_ids=ids, labels=ids).loss)
        with model.disable_adapter():
            base = float(model(input_ids=ids, labels=ids).loss)
    return base, adapted


@needs_cuda
def test_the_zero3_adapter_reloads_onto_the_4_bit_base_with_plain_peft(trained: Path, learner: Path):
    """The same packed weights and the saved bf16 adapter give the logits of the model ZeRO-3 trained, on one GPU
    with the same kernels: equal but for the order of sums, so within a few bf16 steps (1/128 of the largest
    logit: 2 %)."""
    from peft import PeftModel

    saved = torch.load(trained / "logits.pt")
    model = PeftModel.from_pretrained(_quantized_base(learner), trained / "zero3").eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"].to(DEVICE)).logits.float().cpu()
    scale = float(saved["logits"].abs().max())
    torch.testing.assert_close(logits, saved["logits"], rtol=2e-2, atol=2e-2 * scale)


@needs_cuda
def test_the_qlora_adapter_works_on_the_unquantised_base_and_merges_onto_it(
    trained: Path, learner: Path, tiny_data: Path, tmp_path: Path
):
    """On the unquantised base, which `merge` uses, the adapter keeps at least half of what it gains on the 4-bit
    base it was trained on (the loss on training records; quantisation moves each weight by a few per cent, not
    the direction the adapter learnt), and the merged model equals PEFT's base + adapter (fp32 sums: 1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.merge import merge

    ids, adapter = _training_ids(learner, tiny_data), trained / "zero3"
    four_bit_base, four_bit = _losses(PeftModel.from_pretrained(_quantized_base(learner), adapter).eval(), ids)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(learner, device_map={"": DEVICE}),
                                      adapter).eval()  # fmt: skip
    base, adapted = _losses(model, ids)
    assert four_bit < four_bit_base - 0.2  # it trained
    assert base - adapted > 0.5 * (four_bit_base - four_bit)
    merged = AutoModelForCausalLM.from_pretrained(merge(str(learner), str(adapter), str(tmp_path / "merged")),
                                                  device_map={"": DEVICE})  # fmt: skip
    with torch.no_grad():
        expected, got = model(input_ids=ids.to(DEVICE)).logits, merged(input_ids=ids.to(DEVICE)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
