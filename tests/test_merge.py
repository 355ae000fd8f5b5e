"""Merge and chat on the tiny model: merged logits equal base + adapter; the merged folder carries the training
template and an end-of-turn eos; mismatched adapters and existing outputs are refused before anything is written;
a one-shot chat stops at the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import make_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lorakit.__main__ import entry
from lorakit.errors import LorakitError
from lorakit.merge import merge


def _adapter(base: Path, folder: Path, targets: list[str], **variant: bool) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM",
                      **variant)  # fmt: skip
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # a trained DoRA magnitude: no longer the base rows' norms, which merging would keep
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    flags = {"template": "qwen", "system": None, "default_system": None}
    (folder / "lorakit_config.json").write_text(json.dumps({"lorakit": flags}))
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _adapter(tiny_model, tmp_path_factory.mktemp("adapter"), ["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def merged(tiny_model: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge(str(tiny_model), str(adapter), str(tmp_path_factory.mktemp("merged") / "model"))


def test_merged_logits_equal_base_plus_adapter(tiny_model: Path, adapter: Path, merged: Path):
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["use_rslora", "use_dora"])
def test_merged_variant_logits_equal_base_plus_adapter(tiny_model: Path, tmp_path: Path, variant: str):
    adapter = _adapter(tiny_model, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"], **{variant: True})
    merged = merge(str(tiny_model), str(adapter), str(tmp_path / "merged"))
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)(ids).logits
        plain = merge(str(tiny_model), str(_adapter(tiny_model, tmp_path / "plain", ["q_proj", "v_proj", "down_proj"])),
                      str(tmp_path / "plain_merged"))  # fmt: skip
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        unvaried = AutoModelForCausalLM.from_pretrained(plain)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unvaried, expected, atol=1e-3)  # the variant changes the answer: merging must see it


def test_merged_folder_carries_the_training_template_and_an_end_of_turn_eos(merged: Path):
    tokenizer = AutoTokenizer.from_pretrained(merged)
    chat = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # qwen, not the tiny default
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_an_adapter_of_another_model_is_refused_before_writing(adapter: Path, tmp_path: Path):
    other = make_model(tmp_path / "other", hidden_size=32)
    with pytest.raises(LorakitError, match="does not fit the base model"):
        merge(str(other), str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_modules_the_base_lacks_is_refused(tiny_model: Path, adapter: Path, tmp_path: Path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "c_attn"): v for k, v in weights.items()}, renamed / "adapter_model.safetensors")
    (renamed / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(LorakitError, match="adapts modules the base model .* does not have"):
        merge(str(tiny_model), str(renamed), str(tmp_path / "out"))


def test_an_existing_out_needs_overwrite(tiny_model: Path, adapter: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["merge", "--base", str(tiny_model), "--adapter", str(adapter), "--out", str(out)]
    assert entry(argv) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert entry([*argv, "--overwrite"]) == 0 and (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_one_shot_chat_stops_at_the_end_of_turn_token(merged: Path, tmp_path: Path, capsys):
    """A merged model rigged so <|im_end|> is its first greedy token: the reply is empty, not 30 tokens of rubbish."""
    from lorakit.templates import Message, get_template

    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = get_template("qwen", tokenizer).generation_prompt([Message("user", "hello")])
    with torch.no_grad():
        first = int(model(tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0, -1].argmax())
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        weight = model.lm_head.weight
        weight[[first, end]] = weight[[end, first]].clone()  # swap: the greedy choice is now <|im_end|>
    rigged = tmp_path / "rigged"
    model.save_pretrained(rigged)
    tokenizer.save_pretrained(rigged)
    (rigged / "lorakit_config.json").write_text((merged / "lorakit_config.json").read_text())
    assert entry(["chat", "--model", str(rigged), "--prompt", "hello", "--max_new_tokens", "30"]) == 0
    assert capsys.readouterr().out == "\n"


def test_interactive_chat_keeps_history_resets_and_exits(merged: Path, monkeypatch):
    import io

    from lorakit import chat

    prompts: list[int] = []
    real = chat.generate_reply

    def spy(model, tokenizer, template, messages, max_new_tokens, streamer=None):
        prompts.append(len(messages))
        return real(model, tokenizer, template, messages, 3, streamer=streamer)

    monkeypatch.setattr(chat, "generate_reply", spy)
    model, tokenizer, template = chat.load_chat_model(str(merged))
    sink = io.StringIO()
    chat.chat_loop(model, tokenizer, template, None, 3, io.StringIO("hi\nmore\n/reset\nagain\n/exit\nnever\n"), sink)
    assert prompts == [1, 3, 1]  # history grows by user + assistant, /reset empties it, /exit stops reading
    assert sink.getvalue().count(">>> ") == 5


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_merged_file_follows_the_umask(tiny_model: Path, adapter: Path, tmp_path: Path, umask: int):
    """The shards go through safetensors, which alone would leave them 0600 beside 0644 JSON files."""
    import os

    previous = os.umask(umask)
    try:
        out = merge(str(tiny_model), str(adapter), str(tmp_path / "merged"))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and modes == {name: 0o666 & ~umask for name in modes}
