import pytest

from lorakit.engine.jit import settle_cuda_arch_list


@pytest.mark.parametrize(
    "arch_list, expected",
    [
        ("9.0a", "9.0"),  # the GPU image's value, which DeepSpeed's builder cannot parse
        ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
        ("9.0a 10.0a", "9.0;10.0"),
        ("9.0;9.0a", "9.0"),  # no duplicate entry left behind
        ("8.0;9.0", None),  # already parseable: untouched, nothing said
        (None, None),
    ],
)
def test_suffixed_architectures_lose_their_suffix_and_say_so(arch_list, expected):
    environ = {} if arch_list is None else {"TORCH_CUDA_ARCH_LIST": arch_list}
    lines = settle_cuda_arch_list(environ)
    assert environ.get("TORCH_CUDA_ARCH_LIST") == (expected or arch_list)
    assert len(lines) == (1 if expected else 0)
    if expected:
        assert f"using '{expected}' for this run" in lines[0]
