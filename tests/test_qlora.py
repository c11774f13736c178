"""The from-scratch QLoRA layer against bitsandbytes' Linear4bit + peft's LoRA.

Both sides start from the same weights; labkit quantizes them itself (byte-identical to
bitsandbytes, test_quant.py), then the same A and B are copied across. Tolerance (fp32): 1e-5
on outputs and on the gradients of A and B. Without double quantization the dequantized weights
are identical, so only the matmul's summation order can differ.
"""
import pytest
import torch
import torch.nn as nn

import labkit as lk

pytest.importorskip("bitsandbytes")
TOL = dict(rtol=1e-5, atol=1e-5)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_linear_nf4_stores_packed_bytes_and_computes_with_the_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    layer = lk.LinearNF4(lin, blocksize=64, double_quant=False)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 128 * 64 // 2
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128)
    W = lk.dequantize_nf4(*lk.quantize_nf4(lin.weight.detach(), 64))
    torch.testing.assert_close(layer(x), x @ W.T + lin.bias, **TOL)


def test_gradients_reach_only_A_and_B_and_the_input():
    torch.manual_seed(0)
    layer = lk.LoRALinear(lk.LinearNF4(nn.Linear(128, 64)), r=4, alpha=8)
    layer.lora_B.data.normal_()
    x = torch.randn(5, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    assert layer.base.bias.grad is None
    # the input gradient goes through the dequantized weight, recomputed in backward
    W = layer.base.weight
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ W.T + layer.base.bias + layer.scaling * x2 @ layer.lora_A.T @ layer.lora_B.T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)


def test_the_dequantized_weight_is_not_kept_for_backward():
    layer = lk.LinearNF4(nn.Linear(256, 256))
    x = torch.randn(4, 256, requires_grad=True)
    with lk.memory.count_saved_tensors() as saved:
        layer(x)
    assert saved["bytes"] < 256 * 256 * 4 / 4          # far less than the fp32 weight it computes with


def test_bnb_linear4bit_plus_peft_single_layer():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    l4 = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=False, blocksize=64)
    l4 = l4.to("cpu")

    class Holder(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    theirs = get_peft_model(Holder(l4), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    ours = lk.inject_lora(Holder(lk.LinearNF4(lin, 64, double_quant=False)), ["proj"], r=4, alpha=8)
    torch.manual_seed(1)
    ours.proj.lora_B.data.normal_(std=0.1)
    twin = theirs.base_model.model.proj
    twin.lora_A["default"].weight.data.copy_(ours.proj.lora_A)
    twin.lora_B["default"].weight.data.copy_(ours.proj.lora_B)
    x = torch.randn(6, 128)
    yo, yt = ours(x), theirs(x)
    torch.testing.assert_close(yo, yt, **TOL)
    yo.pow(2).sum().backward()
    yt.pow(2).sum().backward()
    torch.testing.assert_close(ours.proj.lora_A.grad, twin.lora_A["default"].weight.grad, **TOL)
    torch.testing.assert_close(ours.proj.lora_B.grad, twin.lora_B["default"].weight.grad, **TOL)


def bnb_tiny_llama(path, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)


@pytest.mark.parametrize("targets", [QKVO, "all-linear"])
def test_whole_model_parity_with_transformers_bnb_and_peft(tmp_path, targets):
    lk.tiny_llama(seed=0).save_pretrained(tmp_path)
    ours = lk.inject_qlora(lk.tiny_llama(seed=0), targets, r=4, alpha=8, double_quant=False)
    torch.manual_seed(1)
    for _, m in lk.lora_layers(ours):
        m.lora_B.data.normal_(std=0.05)
    theirs = lk.to_peft(ours, bnb_tiny_llama(tmp_path, double_quant=False))
    import bitsandbytes as bnb
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules())
    assert n_4bit == 2 * 7                                     # every linear layer but the head is 4-bit there
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    lo, po = ours(input_ids=x, labels=x), theirs(input_ids=x, labels=x)
    torch.testing.assert_close(lo.logits, po.logits, **TOL)
    lo.loss.backward()
    po.loss.backward()
    grads = lk.peft_lora_grads(theirs)
    for name, m in lk.lora_layers(ours):
        torch.testing.assert_close(m.lora_A.grad, grads[name][0], **TOL)
        torch.testing.assert_close(m.lora_B.grad, grads[name][1], **TOL)
    assert lk.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_double_quant_model_stays_close_to_bnb(tmp_path):
    lk.tiny_llama(seed=0).save_pretrained(tmp_path)
    ours = lk.quantize_model(lk.tiny_llama(seed=0), double_quant=True)
    theirs = bnb_tiny_llama(tmp_path, double_quant=True)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-3, atol=1e-3)


def test_merge_into_4bit_requantizes():
    torch.manual_seed(0)
    layer = lk.LoRALinear(lk.LinearNF4(nn.Linear(128, 64)), r=4, alpha=8)
    layer.lora_B.data.normal_(std=0.01)
    exact = layer.base.weight + layer.delta_weight()
    layer.merge()
    after = layer.base.weight
    assert layer.base.packed.dtype == torch.uint8                # still 4-bit
    err = (after - exact).abs().max().item()
    assert 0 < err < 0.2 * exact.abs().max().item()             # rounded again: close, never exact


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="matches no module"):
        lk.quantize_model(lk.tiny_llama(), ["query"])
    with pytest.raises(TypeError, match="not an nn.Linear"):
        lk.quantize_model(lk.tiny_llama(), ["mlp"])
