"""Every bad input: one line on stderr, exit status 2, before any training step, nothing in output_dir.

These run the real CLI entry in-process: every check happens in `lorakit.validate`, before a process group,
a model or an output file exists, so no launcher is needed to see them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.cli import main

REFERENCE_DS = Path(__file__).resolve().parents[1] / "examples" / "ds_config_zero3.json"


def _bad_data(folder: Path, text: str, name: str = "d.json") -> Path:
    folder.mkdir()
    (folder / name).write_text(text)
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": name}}))
    return folder


CASES = {
    "undefined dataset": (["--dataset", "identity"], None, "dataset 'identity' is not defined in"),
    "no dataset_info.json": (["--dataset_dir", "{tmp}/nowhere"], None, "dataset_info.json not found"),
    "missing data file": (["--dataset", "d"], ("gone", None), "not found (file_name in"),
    "invalid json": (
        ["--dataset", "d"],
        ('[{"instruction": "a",\n "output": }]', "d.json"),
        "d.json is not valid JSON (line 2",
    ),
    "no response column": (
        ["--dataset", "d"],
        ('[{"instruction": "a"}]', "d.json"),
        "d.json record 0 has no 'output' field",
    ),
    "non-string field": (
        ["--dataset", "d"],
        ('[{"instruction": ["a"], "output": "b"}]', "d.json"),
        "d.json record 0: field 'instruction' must be a string, got list",
    ),
    "no examples": (["--dataset", "d"], ("[]", "d.json"), "no examples left"),
    "unknown lora target": (["--lora_target", "c_attn"], None, "LoRA target module(s) ['c_attn'] not found"),
    "bf16 on the cpu": (["--bf16", "True"], None, "--bf16 is not supported on the CPU"),
    "liger kernels on the cpu": (["--enable_liger_kernel"], None, "--enable_liger_kernel needs a CUDA GPU"),
    "batch contradicts file": (
        ["--deepspeed", "{ds}", "--per_device_train_batch_size", "2"],
        "ds",
        "sets train_micro_batch_size_per_gpu=4 but --per_device_train_batch_size gives 2",
    ),
    "model path missing": (["--model_name_or_path", "{tmp}/no-model"], None, "no such model folder"),
    "unknown flag": (["--lora_rnak", "8"], None, "unrecognized arguments: --lora_rnak; run with --help"),
    "stage other than sft": (["--stage", "dpo"], None, "--stage dpo is not supported"),
    "finetuning type": (["--finetuning_type", "full"], None, "--finetuning_type full is not supported"),
    "epochs not whole": (["--num_train_epochs", "2.5"], None, "--num_train_epochs: expected a whole number"),
    "bad boolean": (["--plot_loss", "maybe"], None, "--plot_loss: expected true or false"),
    "template mismatch, strict": (["--strict_template"], None, "--template qwen renders conversations differently"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    case, tiny_model: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    extra, setup, message = CASES[case]
    dataset_dir = tiny_data
    if setup == "ds":
        ds = json.loads(REFERENCE_DS.read_text()) | {"train_micro_batch_size_per_gpu": 4}
        (tmp_path / "ds.json").write_text(json.dumps(ds))
    elif setup is not None:
        text, name = setup
        dataset_dir = _bad_data(tmp_path / "data", text or "[]", name or "d.json")
        if name is None:
            (dataset_dir / "d.json").unlink()
    output_dir = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(tiny_model),
        "--template",
        "qwen",
        "--dataset_dir",
        str(dataset_dir),
        "--dataset",
        "tiny",
        "--output_dir",
        str(output_dir),
        "--cutoff_len",
        "256",
    ]
    argv += [a.format(tmp=tmp_path, ds=tmp_path / "ds.json") for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error: "), err
    assert message in err[0]
    assert not output_dir.exists()


def test_template_mismatch_is_a_loud_warning_with_both_renderings(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    from lorakit.cli import parse_config
    from lorakit.validate import validate

    argv = ["--model_name_or_path", str(tiny_model), "--dataset_dir", str(tiny_data), "--dataset", "tiny",
            "--output_dir", str(tmp_path / "out"), "--cutoff_len", "256"]  # fmt: skip
    warning = validate(parse_config([*argv, "--template", "qwen"])).notes[0]
    assert warning.startswith("WARNING: --template qwen does not write conversations as the chat_template")
    assert "You are Qwen, created by Alibaba Cloud" in warning and "You are a tiny test model." in warning
    assert validate(parse_config([*argv, "--template", "auto"])).notes == []


def _read_only_case(output_dir: Path, tiny_model: Path, tiny_data: Path, capsys: pytest.CaptureFixture) -> str:
    argv = ["--model_name_or_path", str(tiny_model), "--template", "qwen", "--dataset_dir", str(tiny_data),
            "--dataset", "tiny", "--output_dir", str(output_dir), "--cutoff_len", "256"]  # fmt: skip
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--output_dir {output_dir} is not writable" in lines[0], lines
    return lines[0]


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK) or not Path("/proc/sys").is_dir(), reason="needs a read-only mount")
def test_an_output_dir_on_a_read_only_mount_is_one_line(tiny_model: Path, tiny_data: Path,
                                                        capsys: pytest.CaptureFixture):  # fmt: skip
    """Root passes every permission check but a read-only mount's (os.access); /proc/sys is one in a container."""
    _read_only_case(Path("/proc/sys/lorakit-out"), tiny_model, tiny_data, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_an_output_dir_in_a_read_only_folder_is_one_line(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture):  # fmt: skip
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    _read_only_case(locked / "out", tiny_model, tiny_data, capsys)
    assert list(locked.iterdir()) == []


def test_llama3_on_qwens_own_tokenizer_is_named_and_qwen_passes(qwen_tokenizer):
    """The issue's case with Qwen's real tokenizer: its vocabulary has no <|eot_id|> or <|start_header_id|>."""
    from lorakit.checks import check_special_tokens
    from lorakit.errors import LorakitError
    from lorakit.templates import get_template

    with pytest.raises(
        LorakitError, match=r"this template's special tokens do not exist in this tokenizer \(.*<\|eot_id\|>"
    ):
        check_special_tokens(get_template("llama3", qwen_tokenizer), qwen_tokenizer, "llama3")
    for name in ("qwen", "chatml", "auto"):
        check_special_tokens(get_template(name, qwen_tokenizer), qwen_tokenizer, name)


def test_a_utf8_byte_order_mark_is_accepted_in_data_and_dataset_info(tmp_path: Path):
    """What Windows editors write: accepted and dropped (README, "When something is wrong"), in JSON, JSONL and
    dataset_info.json alike."""
    from lorakit.data.records import load_conversations, resolve_datasets

    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    (tmp_path / "e.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, records)).encode())
    info = {"d": {"file_name": "d.json"}, "e": {"file_name": "e.jsonl"}}
    (tmp_path / "dataset_info.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(info).encode())
    for name in ("d", "e"):
        conversations = load_conversations(resolve_datasets(str(tmp_path), (name,)), None)
        assert [[m.content for m in c] for c in conversations] == [["a", "b"], ["c", "d"]]
