"""lorakit.engine.frozen_linear: a frozen linear that saves its weight parameter, not a view, computing what torch's
linear computes (the multi-rank test, tests/test_multirank_zero3.py, shows the memory it frees under ZeRO-3)."""

from __future__ import annotations

import pytest
import torch

from lorakit.engine.frozen_linear import FrozenWeightLinear, save_frozen_weights_by_reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA machine (skipped in CI)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])  # Qwen's q/k/v have one
@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (2, 1000, 512)])
def test_the_same_output_and_input_gradient_as_torchs_linear(device, dtype, bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[-1], 384, bias=bias).to(device, dtype).requires_grad_(False)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(*shape[:-1], 384, dtype=dtype, device=device)
    ours = FrozenWeightLinear.apply(x, linear.weight, linear.bias)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    theirs = torch.nn.functional.linear(x, linear.weight, linear.bias)
    (theirs_grad,) = torch.autograd.grad(theirs, x, grad)
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)


@pytest.mark.parametrize("linear_call, freed", [(FrozenWeightLinear.apply, True), (torch.nn.functional.linear, False)])
def test_the_weight_itself_is_saved_so_releasing_it_frees_its_storage(linear_call, freed):
    """What ZeRO-3's release does (`param.data = empty`) frees the gathered storage only if autograd holds the
    parameter, not a view of it: torch's linear holds a view."""
    weight = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    gathered = weight.data.untyped_storage().data_ptr()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = linear_call(torch.randn(3, 32, requires_grad=True), weight, None)
    weight.data = torch.empty(0)
    held = [t for t in saved if t.untyped_storage().data_ptr() == gathered and t.untyped_storage().nbytes()]
    assert (not held) == freed
    assert out.grad_fn is not None


def test_only_frozen_plain_linears_outside_the_skipped_modules_change():
    model = torch.nn.ModuleDict(
        {
            "frozen": torch.nn.Linear(4, 4).requires_grad_(False),
            "trained": torch.nn.Linear(4, 4),  # a module trained in full needs its weight's gradient
            "compiled": torch.nn.Sequential(torch.nn.Linear(4, 4).requires_grad_(False)),
            "subclass": type("Quantized", (torch.nn.Linear,), {})(4, 4).requires_grad_(False),
        }
    )
    (line,) = save_frozen_weights_by_reference(model, skip=[model["compiled"]])
    assert "1 frozen linear layers" in line
    changed = {name for name, m in model.named_modules() if "forward" in vars(m)}
    assert changed == {"frozen"}
    assert save_frozen_weights_by_reference(torch.nn.Linear(2, 2), skip=[]) == []


def test_a_changed_model_pickles_and_unfreezing_trains_through_torchs_linear():
    """Research code gets the model back (lorakit.train.TrainResult): torch.save of the whole model works, and a
    weight made trainable again gets its gradient (torch's linear, which FrozenWeightLinear would not give)."""
    import pickle

    model = torch.nn.Sequential(torch.nn.Linear(4, 3).requires_grad_(False))
    save_frozen_weights_by_reference(model, skip=[])
    copy = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 4)
    assert torch.equal(copy(x), model(x))
    model[0].weight.requires_grad_(True)
    model(x).sum().backward()
    assert model[0].weight.grad is not None


def test_autocasts_lower_precision_matmul_backs_off_in_its_own_dtype():
    """Under autocast the forward runs in bf16 with an fp32 weight; the input's gradient is bf16 too."""
    weight = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)
    x = torch.randn(3, 16, requires_grad=True)
    grads = []
    for call in (FrozenWeightLinear.apply, torch.nn.functional.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(x, weight, None)
        (grad,) = torch.autograd.grad(out.float().sum(), x)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])
