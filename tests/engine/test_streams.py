"""DeepSpeed's accelerator answers "current stream" without torch's device lookup, and answers the same."""

import pytest
import torch

from lorakit.engine.streams import answer_current_stream_directly, current_stream


def test_the_cpu_accelerator_is_left_alone():
    from deepspeed.accelerator import get_accelerator

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the GPU test below covers it")
    before = get_accelerator().current_stream
    assert answer_current_stream_directly() is False
    assert get_accelerator().current_stream == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_direct_answer_is_torchs_stream_on_every_stream():
    from deepspeed.accelerator import get_accelerator

    assert answer_current_stream_directly() is True
    assert get_accelerator().current_stream() == torch.cuda.current_stream()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # DeepSpeed queries inside its own streams' contexts
        assert current_stream() == side == torch.cuda.current_stream()
        assert get_accelerator().current_stream() == side
    assert current_stream(0) == torch.cuda.current_stream(0)
