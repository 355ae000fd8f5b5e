import json
from pathlib import Path

from lorakit.__main__ import entry


def test_preview_prints_encoded_examples_as_json_lines(tiny_model: Path, tiny_data: Path, capsys):
    argv = [
        "preview",
        "--num_examples",
        "2",
        "--model_name_or_path",
        str(tiny_model),
        "--template",
        "qwen",
        "--dataset_dir",
        str(tiny_data),
        "--dataset",
        "tiny",
    ]
    assert entry(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2
    first = records[0]
    assert len(first["input_ids"]) == len(first["labels"])
    assert first["text"].startswith("<|im_start|>system\nYou are Qwen") and first["text"].endswith("<|im_end|>\n")
    assert first["trained_text"].startswith("The ") and first["trained_text"].endswith("<|im_end|>")
    assert first["truncated"] is False


def test_preview_reports_bad_input_in_one_line(tiny_model: Path, tmp_path: Path, capsys):
    assert (
        entry(["preview", "--model_name_or_path", str(tiny_model), "--dataset_dir", str(tmp_path), "--dataset", "x"])
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1


def test_preview_takes_num_examples_as_any_flag_is_spelled(tiny_model: Path, tiny_data: Path, capsys):
    """`--num_examples=1`, as argparse accepts `--flag=value` for every other flag, and --help lists it."""
    flags = ["--model_name_or_path", str(tiny_model), "--template", "qwen", "--dataset_dir", str(tiny_data)]
    assert entry(["preview", "--num_examples=1", *flags, "--dataset", "tiny"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    try:
        entry(["preview", "--help"])
    except SystemExit as stop:
        assert stop.code == 0
    assert "--num_examples" in capsys.readouterr().out
