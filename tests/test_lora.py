"""The from-scratch LoRA layer: shapes, the equation, initialisation, merge/unmerge, bad input."""
import math

import pytest
import torch
import torch.nn as nn

import labkit as lk


def make(r=4, alpha=8, **kw):
    torch.manual_seed(0)
    return lk.LoRALinear(nn.Linear(32, 24), r=r, alpha=alpha, **kw)


def test_shapes_and_scaling():
    layer = make(r=4, alpha=8)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (24, 4)
    assert isinstance(layer.lora_A, nn.Parameter) and isinstance(layer.lora_B, nn.Parameter)
    assert layer.scaling == 2.0
    assert make(r=4, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)


def test_only_A_and_B_train():
    layer = make()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_starts_at_the_base_layer():
    layer = make()
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), layer.base(x))      # B = 0, so the update is exactly zero


def test_forward_is_the_equation():
    layer = make(r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 32)
    W0, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    expected = x @ W0.T + b + (6 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init, a_zero, b_zero", [("kaiming", False, True), ("gaussian", False, True),
                                                  ("zeros", True, True), ("random", False, False)])
def test_inits(init, a_zero, b_zero):
    layer = make(init=init)
    assert bool((layer.lora_A == 0).all()) == a_zero
    assert bool((layer.lora_B == 0).all()) == b_zero


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(4096, 64), r=16, alpha=16, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 16) < 0.002


def test_zero_init_gets_no_gradient_and_b_zero_gets_gradient_only_on_B():
    x = torch.randn(8, 32)
    zeros = make(init="zeros")
    zeros(x).sum().backward()
    assert zeros.lora_A.grad.abs().max() == 0 and zeros.lora_B.grad.abs().max() == 0
    default = make()
    default(x).sum().backward()
    assert default.lora_A.grad.abs().max() == 0       # dL/dA = scaling * B^T (...) and B = 0
    assert default.lora_B.grad.abs().max() > 0


def test_merge_unmerge_round_trip():
    layer = make()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 32)
    W0 = layer.base.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base.weight, W0 + layer.delta_weight(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_acts_only_on_the_adapter_path_and_only_in_training():
    layer = make(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.lora_B.data.zero_()                          # no adapter: dropout must not touch W0 x
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("kw, err, msg", [
    (dict(r=0), ValueError, "r must be an integer >= 1"),
    (dict(r=2.0), ValueError, "r must be an integer"),
    (dict(r=25), ValueError, "larger than min"),
    (dict(alpha=0), ValueError, "alpha must be > 0"),
    (dict(alpha=-1), ValueError, "alpha must be > 0"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(init="xavier"), ValueError, "init must be one of"),
])
def test_bad_arguments(kw, err, msg):
    args = dict(r=4, alpha=8) | kw
    with pytest.raises(err, match=msg):
        lk.LoRALinear(nn.Linear(32, 24), **args)


def test_wraps_only_linear():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        lk.LoRALinear(nn.Conv1d(3, 3, 1), r=1, alpha=1)
