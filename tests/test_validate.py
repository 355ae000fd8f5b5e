"""Remote code: a model folder that ships its own Python (`auto_map` in config.json) is loaded only with
--trust_remote_code, which is announced in one line; without it the folder's code never runs and the CLI says
what to do in one line. The model here is the tiny Qwen2 with a config and model class of its own, whose module
leaves a marker file behind when it is imported."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from lorakit.cli import main, parse_config
from lorakit.validate import validate

REPO = Path(__file__).resolve().parents[1]
CONFIGURATION = """from pathlib import Path

from transformers import Qwen2Config

Path({marker!r}).write_text("the model folder's code ran")


class CustomConfig(Qwen2Config):
    model_type = "lorakit_custom"
"""
MODELING = """from transformers import Qwen2ForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(Qwen2ForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def remote_code_model(tiny_model: Path, tmp_path: Path) -> Path:
    folder = shutil.copytree(tiny_model, tmp_path / "custom-model")
    (folder / "configuration_custom.py").write_text(CONFIGURATION.format(marker=str(tmp_path / "marker")))
    (folder / "modeling_custom.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "lorakit_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
               "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _argv(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--template", "qwen", "--dataset_dir", str(data), "--dataset", "tiny",
            "--cutoff_len", "256", "--output_dir", str(output_dir), *extra]  # fmt: skip


def test_remote_code_is_refused_without_the_flag(remote_code_model: Path, tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture):  # fmt: skip
    assert main(_argv(remote_code_model, tiny_data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lorakit: error: the model folder {remote_code_model} ships its own "
                                               "Python code"), err  # fmt: skip
    assert "pass --trust_remote_code" in err[0]
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


def test_the_flag_runs_it_and_says_so_first(remote_code_model: Path, tiny_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture):  # fmt: skip
    checked = validate(parse_config(_argv(remote_code_model, tiny_data, tmp_path / "out", "--trust_remote_code")))
    assert (tmp_path / "marker").exists() and checked.fingerprint["model"]
    out = capsys.readouterr().out.splitlines()
    note = f"--trust_remote_code: Python code shipped in {remote_code_model} (auto_map in its config) may run"
    assert out[0] == f"{note}, in every process"
    assert sum("trust_remote_code" in line for line in out) == 1


def test_merge_and_chat_refuse_it_too_unless_asked(remote_code_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture):  # fmt: skip
    from lorakit.__main__ import entry

    chat = ["chat", "--model", str(remote_code_model), "--prompt", "hi", "--max_new_tokens", "2"]
    for argv in (["merge", "--base", str(remote_code_model), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")],
                 chat):  # fmt: skip
        assert entry(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ships its own Python code" in err[0], err
    assert not (tmp_path / "marker").exists() and not (tmp_path / "m").exists()
    assert entry([*chat, "--trust_remote_code"]) == 0
    assert capsys.readouterr().err.startswith(f"--trust_remote_code: Python code shipped in {remote_code_model} ")
    assert (tmp_path / "marker").exists()


def test_without_the_flag_nothing_is_said(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture):  # fmt: skip
    validate(parse_config(_argv(tiny_model, tiny_data, tmp_path / "out")))
    assert "trust_remote_code" not in capsys.readouterr().out


def _hugging_face_loads(tree: ast.AST) -> list[ast.Call]:
    """Calls like AutoConfig.from_pretrained(...) / AutoModelForCausalLM.from_config(...): where remote code runs."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("from_pretrained", "from_config") and isinstance(node.func.value, ast.Name)
            and node.func.value.id.startswith("Auto")]  # fmt: skip


def test_every_auto_class_load_in_lorakit_passes_the_flag_explicitly():
    """transformers' own default (None) asks on a terminal and runs the code on `y`: lorakit always decides."""
    loads = {}
    for path in sorted((REPO / "lorakit").rglob("*.py")):
        for call in _hugging_face_loads(ast.parse(path.read_text())):
            keywords = {k.arg for k in call.keywords}
            loads[f"{path.relative_to(REPO)}:{call.lineno}"] = "trust_remote_code" in keywords
    # config, tokenizer, model (whole and under zero.Init), the plan's meta skeleton, chat's model: at least these
    assert len(loads) >= 6 and [where for where, passes in loads.items() if not passes] == []
