"""The from-scratch LoRA layer: shapes, the equation, initialisation, merge/unmerge, bad input."""
import math

import pytest
import torch
import torch.nn as nn

import labkit as lk
from conftest import require


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
    # W0 + (alpha / r) B A written out (make(): alpha 8, r 4), not merge()'s own delta_weight()
    torch.testing.assert_close(layer.base.weight, W0 + (8 / 4) * (layer.lora_B @ layer.lora_A), rtol=0, atol=1e-6)
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


@pytest.mark.parametrize("init", ["gaussian", "random", "zeros"])
def test_reset_without_an_argument_uses_the_layers_own_init(init):
    """reset_lora_parameters() re-initialises with the init the layer was built with, not kaiming's."""
    layer = make(init=init)
    with torch.no_grad():
        layer.lora_A.fill_(7.0)
        layer.lora_B.fill_(7.0)
    torch.manual_seed(1)
    layer.reset_lora_parameters()
    torch.manual_seed(1)
    again = make(init=init)
    torch.manual_seed(1)
    again.reset_lora_parameters(init)                       # the same init, named
    same = torch.equal(layer.lora_A, again.lora_A) and torch.equal(layer.lora_B, again.lora_B)
    assert same, f"reset_lora_parameters() did not use the layer's init={init!r}"
    assert bool((layer.lora_B == 0).all()) == (init != "random")
    assert bool((layer.lora_A == 0).all()) == (init == "zeros")


def bnb_layers():
    """bitsandbytes' two quantized layers, as they are on a CPU after their first use: Linear8bitLt
    quantizes its weight to int8 on its first forward pass, Linear4bit packs it to NF4 on .to()."""
    bnb = require("bitsandbytes")
    torch.manual_seed(0)
    int8 = bnb.nn.Linear8bitLt(32, 24, has_fp16_weights=False)
    int8(torch.randn(2, 32))
    nf4 = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    return {"Linear8bitLt": int8, "Linear4bit": nf4}


@pytest.mark.parametrize("kind", ["Linear8bitLt", "Linear4bit"])
def test_merging_into_a_bitsandbytes_layer_is_refused_and_changes_nothing(kind):
    """bitsandbytes' layers subclass nn.Linear, so LoRA goes on top of them (and trains: the base is
    frozen anyway), but their weight is stored quantized: adding B A to it truncates (int8) or fails."""
    layer = lk.LoRALinear(bnb_layers()[kind], r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 32)
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad.abs().max() > 0                   # LoRA on a bnb layer trains
    W = layer.base.weight.data.clone()
    with pytest.raises(TypeError, match=rf"bitsandbytes' {kind}.*merge_and_unload.*LinearNF4"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight.data, W)
    model = nn.Sequential(nn.Linear(32, 32), bnb_layers()[kind])
    lk.inject_lora(model, ["0", "1"], r=4, alpha=8)
    W0 = model[0].base.weight.detach().clone()
    with pytest.raises(TypeError, match="bitsandbytes"):
        lk.merge_lora(model)                                   # refused before the nn.Linear is merged
    assert not model[0].merged and torch.equal(model[0].base.weight, W0)
