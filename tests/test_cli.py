import dataclasses
import re
import sys
from pathlib import Path

import pytest

from lorakit.cli import parse_config
from lorakit.config import Config, flat_fields
from lorakit.errors import LorakitError

REFERENCE_FLAGS = """--deepspeed ds_config_zero3.json --stage sft --do_train True --model_name_or_path m
--finetuning_type lora --template qwen --dataset_dir data/ --dataset identity --cutoff_len 1024
--learning_rate 5e-04 --num_train_epochs 10 --max_samples 100000 --per_device_train_batch_size 4
--gradient_accumulation_steps 4 --lr_scheduler_type cosine --max_grad_norm 1.0 --logging_steps 5 --save_steps 100
--warmup_steps 0 --neftune_noise_alpha 0 --lora_rank 8 --lora_dropout 0.1 --lora_alpha 32
--lora_target q_proj,v_proj,k_proj,gate_proj,up_proj,o_proj,down_proj
--output_dir ./output/qwen_7b_ds/train_2024_02_27 --bf16 True --plot_loss True --local_rank=0"""


def test_every_reference_flag_maps_onto_the_config():
    config = parse_config(REFERENCE_FLAGS.split())
    assert config.train.deepspeed == "ds_config_zero3.json" and config.train.num_train_epochs == 10
    assert config.model.bf16 is True and config.model.template == "qwen"
    assert config.data.dataset == ("identity",) and config.data.max_samples == 100000
    assert config.lora.lora_target == ("q_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
    assert config.lora.alpha == 32 and config.lora.lora_dropout == 0.1 and config.train.learning_rate == 5e-4
    assert (config.train.save_steps, config.train.logging_steps, config.train.plot_loss) == (100, 5, True)


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "learning_rate: 1.0e-3\nlora_target: [q_proj, v_proj]\nbf16: true\n"),
        (".json", '{"learning_rate": 1e-3, "lora_target": "q_proj,v_proj", "bf16": true}'),
    ],
)
def test_config_file_then_flags_override(tmp_path: Path, suffix: str, text: str):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    config = parse_config([str(path), "--learning_rate", "2e-4", "--output_dir", "o"])
    assert config.train.learning_rate == 2e-4 and config.lora.lora_target == ("q_proj", "v_proj")
    assert config.model.bf16 is True and config.train.output_dir == "o"


@pytest.mark.parametrize("flag, value", [("--bf16", []), ("--bf16", ["true"]), ("--bf16", ["1"]), ("--bf16", ["True"])])
def test_boolean_spellings(flag, value):
    assert parse_config([flag, *value]).model.bf16 is True
    assert parse_config(["--bf16", "false"]).model.bf16 is False


def test_flat_round_trip_and_unique_names():
    config = parse_config(REFERENCE_FLAGS.split())
    assert Config.from_flat({k: tuple(v) if isinstance(v, list) else v for k, v in config.to_flat().items()}) == config
    from lorakit.config import GROUPS

    declared = [f.name for group in GROUPS.values() for f in dataclasses.fields(group)]
    assert len(declared) == len(set(declared)) == len(flat_fields())  # no flag name used by two groups


def test_config_file_errors(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("learning_rate: [")
    with pytest.raises(LorakitError, match="could not be parsed"):
        parse_config([str(tmp_path / "bad.yaml")])
    (tmp_path / "typo.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(LorakitError, match=r"unknown key\(s\) \['learning_rat'\]"):
        parse_config([str(tmp_path / "typo.yaml")])


def test_an_empty_string_is_a_value_not_a_missing_one():
    config = parse_config(["--system", "", "--default_system", "none"])
    assert config.data.system == "" and config.data.default_system is None


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),  # unset: lorakit decides (memory plan / where the kernels can run)
        (["--gradient_checkpointing"], True),
        (["--gradient_checkpointing", "True"], True),
        (["--gradient_checkpointing", "false"], False),
        (["--gradient_checkpointing", "auto"], None),
    ],
)
def test_auto_booleans(argv: list[str], expected):
    assert parse_config(argv).train.gradient_checkpointing is expected
    liger = [a.replace("gradient_checkpointing", "enable_liger_kernel") for a in argv]
    assert parse_config(liger).model.enable_liger_kernel is expected
    compiled = [a.replace("gradient_checkpointing", "torch_compile") for a in argv]
    assert parse_config(compiled).model.torch_compile is expected


@pytest.mark.parametrize(
    "argv, expected", [([], False), (["--trust_remote_code"], True), (["--trust_remote_code", "false"], False)]
)
def test_remote_code_is_off_unless_the_flag_says_so(argv: list[str], expected: bool):
    """LLaMA-Factory's flag name; the YAML key is the same."""
    assert parse_config(argv).model.trust_remote_code is expected


@pytest.mark.parametrize(
    "argv, yaml, expected",
    [
        ([], "", ()),  # default: none
        (["--report_to", "tensorboard,mlflow"], "", ("tensorboard", "mlflow")),
        ([], "report_to: [wandb, tensorboard]\n", ("wandb", "tensorboard")),
        (["--report_to", "none"], "report_to: wandb\n", ()),  # a flag overrides the file
        (["--report_to", "mlflow,mlflow"], "", ("mlflow",)),
    ],
)
def test_report_to_is_a_list_flag_as_in_hugging_face(tmp_path: Path, argv: list[str], yaml: str, expected: tuple):
    path = tmp_path / "run.yaml"
    path.write_text(yaml or "{}\n")
    config = parse_config([str(path), *argv, "--run_name", "first try"])
    assert config.train.trackers == expected and config.train.run_name == "first try"


@pytest.mark.parametrize(
    "yaml, expected",
    [
        ("learning_rate: 1e-4\n", 1e-4),  # YAML 1.1 reads 1e-4 (no dot) as a string
        ("learning_rate: '2e-4'\n", 2e-4),
        ("max_samples: null\n", None),  # an optional field: null is its default
        ("bf16: no\n", False),
        ("lora_target: [q_proj, v_proj]\n", ("q_proj", "v_proj")),
        ("num_train_epochs: 2.0\n", 2),
    ],
)
def test_config_file_values_that_are_right(tmp_path: Path, yaml: str, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml)
    name = yaml.split(":")[0]
    value = parse_config([str(path)]).to_flat()[name]
    assert value == (list(expected) if isinstance(expected, tuple) else expected)


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_lorakit_help_prints_the_commands_and_succeeds(argv: list[str], capsys: pytest.CaptureFixture):
    from lorakit.__main__ import entry

    assert entry(argv) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "preview", "merge", "chat"))


def one_process_command(tiny_model: Path, tiny_data: Path, folder: Path) -> list[str]:
    """The run of test_an_error_during_training_is_a_line_of_its_own (conftest.one_process_runs starts it): the loss
    is no longer finite at the second step."""
    return [sys.executable, "examples/sft.py", "--model_name_or_path", str(tiny_model), "--template", "qwen",
            "--dataset_dir", str(tiny_data), "--dataset", "tiny", "--output_dir", str(folder / "out"),
            "--max_steps", "4", "--learning_rate", "1e30", "--max_grad_norm", "0"]  # fmt: skip


def test_an_error_during_training_is_a_line_of_its_own(one_process_runs: dict):
    """The progress bar's line ends in a carriage return, not a newline: an error raised while it is open (a
    non-finite loss, a full disk at a save, a signal) was printed after it, mid-line, in a log file. A process of
    its own: a process group made in the test process would outlive the test (and its environment, the next
    launch's)."""
    process, folder = one_process_runs[__name__]  # one_process_command's, started beside the other modules' runs
    code, stderr = process.wait(timeout=300), (folder / "stderr").read_text()
    assert code == 2, stderr[-2000:]
    assert "train:" in stderr  # the bar was open
    lines = stderr.replace("\r", "\n").splitlines()
    assert any(line.startswith("lorakit: error: ") and "finite" in line for line in lines), stderr[-2000:]


@pytest.mark.parametrize("name", ["run.YAML", "run.Yml"])
def test_a_config_files_suffix_is_read_whatever_its_case(tmp_path: Path, name: str):
    (tmp_path / name).write_text("learning_rate: 3e-4\n")
    assert parse_config([str(tmp_path / name)]).train.learning_rate == 3e-4


@pytest.mark.parametrize(
    ("values", "field", "expected"),
    [
        ({"packing": "false"}, ("train", "packing"), False),  # a truthy string, read as the flag reads it
        ({"learning_rate": "5e-4"}, ("train", "learning_rate"), 5e-4),
        ({"dataset": "a,b"}, ("data", "dataset"), ("a", "b")),  # not the letters of "a,b"
        ({"lora_target": "all"}, ("lora", "lora_target"), ("all",)),
        ({"num_train_epochs": 2.0}, ("train", "num_train_epochs"), 2),
    ],
)
def test_research_code_values_are_read_as_flags_are(values, field, expected):
    group, name = field
    assert getattr(getattr(Config.from_flat(values), group), name) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_train_epochs": 1.5}, "--num_train_epochs: expected a whole number, got 1.5"),
        ({"bf16": "perhaps"}, "--bf16: expected true or false"),
        ({"output_dir": 10}, "--output_dir: expected text, got 10"),  # YAML's `output_dir: 010`
        ({"system": False}, "--system: expected text, got False"),  # YAML's `system: no`
    ],
)
def test_values_that_are_no_flags_value_are_one_line_errors(values, message):
    with pytest.raises(LorakitError, match=re.escape(message)):
        Config.from_flat(values)
