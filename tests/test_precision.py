"""bf16 and autocast on the CPU: what a GPU run does, checked where every machine can run it.

LoRA, QLoRA (labkit's and bitsandbytes + peft's), the bottleneck adapters and IA3 train under
torch.autocast("cpu", dtype=torch.bfloat16), on bf16 models, and with a bf16 compute dtype, with
A, B and the other trained tensors kept in fp32 (as peft keeps them). Tolerances against fp32:
bf16 rounds to 8 significant bits, so losses agree within 5e-2 relative.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit as lk
from conftest import require
from labkit import adapters
from labkit.train import autocast, train

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _perturb(model, seed=1):
    """Non-zero B (and adapters' up projections), so the trained path changes the output."""
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if p.requires_grad and (n.endswith("lora_B") or ".up." in n):
            p.data.normal_(std=0.05)
    return model


def _trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model, context):
    model.zero_grad(set_to_none=True)
    with context:
        loss = model(input_ids=X, labels=X).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad for n, p in _trained(model).items()}


MAKERS = {
    "lora": lambda: lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8),
    "qlora": lambda: lk.inject_qlora(lk.tiny_llama(), QKVO, r=4, alpha=8),
    "qlora-dq": lambda: lk.inject_qlora(lk.tiny_llama(), "all-linear", r=4, alpha=8, double_quant=True),
    "serial": lambda: adapters.inject_adapters(lk.tiny_llama(), "serial", bottleneck=8),
    "parallel": lambda: adapters.inject_adapters(lk.tiny_llama(), "parallel", bottleneck=8, scale=4.0),
    "ia3": lambda: adapters.inject_ia3(lk.tiny_llama()),
}


@pytest.mark.parametrize("method", list(MAKERS))
def test_trains_under_bf16_autocast_with_fp32_trained_tensors(method):
    model = _perturb(MAKERS[method]())
    assert all(p.dtype == torch.float32 for p in _trained(model).values())
    ref_loss, ref_grads = _loss_and_grads(model, torch.enable_grad())
    loss, grads = _loss_and_grads(model, BF16)
    assert loss != ref_loss                                    # autocast did change the arithmetic
    assert abs(loss - ref_loss) <= 5e-2 * ref_loss
    for n, g in grads.items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), n
    # the bf16 gradient points where the fp32 one does
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref = torch.cat([ref_grads[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.95


@pytest.mark.parametrize("method", ["lora", "serial", "parallel", "ia3"])
def test_a_bf16_model_keeps_its_trained_tensors_in_fp32(method):
    base = lk.tiny_llama().to(torch.bfloat16)
    inject = {"lora": lambda m: lk.inject_lora(m, QKVO, r=4, alpha=8),
              "serial": lambda m: adapters.inject_adapters(m, "serial", bottleneck=8),
              "parallel": lambda m: adapters.inject_adapters(m, "parallel", bottleneck=8),
              "ia3": adapters.inject_ia3}[method]
    model = _perturb(inject(base))
    assert all(p.dtype == torch.float32 for p in _trained(model).values())
    out = model(input_ids=X, labels=X)
    assert out.logits.dtype == torch.bfloat16                 # the model computes in its own dtype
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in _trained(model).values())


def _nf4_layer_and_references(layer, x):
    """(layer(x), the same product computed in x's dtype from the bf16-rounded weight, and computed
    in fp32 from the fp32 weight, both returned in x's dtype): what a layer's compute dtype decides."""
    W = lk.dequantize_nf4(layer.packed, layer.quant_state())                  # fp32
    return layer(x), F.linear(x.bfloat16(), W.bfloat16()).to(x.dtype), F.linear(x.float(), W).to(x.dtype)


def _closer(out, want, other):
    """out is want's numbers, not other's: within a tenth of how far the two references are apart."""
    apart = (want.float() - other.float()).abs().max()
    return apart > 0 and (out.float() - want.float()).abs().max() <= 0.1 * apart


def test_qlora_with_a_bf16_compute_dtype_on_an_fp32_model():
    """The NF4 layers take fp32 in and give fp32 back, but compute in bf16: their numbers are a bf16
    product's (a layer that ignored compute_dtype would give the fp32 product's, and the same loss)."""
    ours = _perturb(lk.inject_qlora(lk.tiny_llama(), QKVO, r=4, alpha=8, compute_dtype=torch.bfloat16))
    ref = _perturb(lk.inject_qlora(lk.tiny_llama(), QKVO, r=4, alpha=8))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    out, in_bf16, in_fp32 = _nf4_layer_and_references(ours.model.layers[0].self_attn.v_proj.base, x)
    assert out.dtype == torch.float32 and _closer(out, in_bf16, in_fp32)
    loss, grads = _loss_and_grads(ours, torch.enable_grad())
    ref_loss, _ = _loss_and_grads(ref, torch.enable_grad())
    assert loss != ref_loss and abs(loss - ref_loss) <= 5e-2 * ref_loss
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())


def test_bnb_qlora_through_peft_under_bf16_autocast(tmp_path):
    require("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    lk.tiny_llama().save_pretrained(tmp_path)
    ours = _perturb(lk.inject_qlora(lk.tiny_llama(), QKVO, r=4, alpha=8, double_quant=False))
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    theirs = lk.to_peft(ours, lk.qlora.bnb_exact_on_cpu(base))
    ref_loss, _ = _loss_and_grads(ours, torch.enable_grad())
    loss, grads = _loss_and_grads(theirs, BF16)
    assert abs(loss - ref_loss) <= 5e-2 * ref_loss
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("double_quant", [False, True])   # fp32 absmax, or uint8 codes with fp32 constants
@pytest.mark.parametrize("cast", ["to", "half", "to-meta"])
def test_linear_nf4_keeps_its_constants_when_the_model_changes_dtype(double_quant, cast):
    layer = lk.LinearNF4(nn.Linear(128, 64), double_quant=double_quant)
    W, consts = layer.weight, {n: b.clone() for n, b in layer.named_buffers()}
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    {"to": lambda: layer.to(torch.bfloat16), "half": layer.half,
     "to-meta": lambda: layer.to("meta", torch.bfloat16)}[cast]()
    for n, b in layer.named_buffers():
        assert b.dtype == consts[n].dtype, n                    # float constants stay fp32
        if cast == "to-meta":
            assert b.device.type == "meta", n                   # device and dtype at once: moved, not cast
        else:
            assert torch.equal(b, consts[n]), n
    assert layer.bias.dtype == dtype                            # the bias follows, as in bitsandbytes
    if cast == "to-meta":
        return
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=0)  # the stored weight is unchanged
    x = torch.randn(3, 128, dtype=dtype)
    assert layer(x).dtype == dtype
    fresh = lk.LinearNF4(nn.Linear(128, 64), double_quant=double_quant).to(dtype)
    fresh.load_state_dict(layer.state_dict())                   # a state dict round trip keeps it all
    torch.testing.assert_close(fresh.weight, W, rtol=0, atol=0)


def test_a_qlora_model_cast_to_bf16_computes_in_bf16():
    """.to(bf16) makes the model compute in bf16, but not its NF4 layers: they keep their own compute
    dtype (fp32 by default), taking bf16 in, computing in fp32 and giving bf16 back. Their numbers are
    the fp32 product's, rounded once (a layer that computed in its input's dtype gives other ones)."""
    model = lk.inject_qlora(lk.tiny_llama(), QKVO, r=4, alpha=8).to(torch.bfloat16)
    assert model(input_ids=X).logits.dtype == torch.bfloat16
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    out, in_bf16, in_fp32 = _nf4_layer_and_references(model.model.layers[0].self_attn.v_proj.base, x)
    assert out.dtype == torch.bfloat16 and _closer(out, in_fp32, in_bf16)


def test_train_with_amp_on_the_cpu_autocasts_to_bf16():
    model = lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    batches = iter(lambda: {"input_ids": X, "labels": X}, None)
    losses = train(model, batches, steps=6, lr=1e-2, amp=True, progress=False)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert losses[-1] < losses[0]
    seen.clear()
    train(model, batches, steps=1, progress=False)                 # default on a CPU: fp32
    assert seen == [(False, torch.float32)]


def test_amp_choices():
    ctx, scaler = autocast("cpu", None)
    assert scaler is None and not isinstance(ctx, torch.autocast)
    ctx, scaler = autocast("cpu", "fp16")
    assert isinstance(ctx, torch.autocast) and scaler is not None
    with pytest.raises(ValueError, match="amp must be"):
        autocast("cpu", "int8")


def test_a_t4_gets_fp16_because_its_bf16_is_only_emulated(monkeypatch):
    # torch.cuda.is_bf16_supported() is True on a T4 through emulation; only real bf16 counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert lk.amp_dtype("cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert lk.amp_dtype("cuda") == torch.bfloat16
    assert lk.amp_dtype("cpu") == torch.bfloat16


def test_train_moves_each_batch_to_the_models_device(monkeypatch):
    import labkit.train as lt
    model = lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8)
    moved = []
    real = lt.to_device
    monkeypatch.setattr(lt, "to_device", lambda batch, device: moved.append(device) or real(batch, device))
    train(model, iter(lambda: {"input_ids": X, "labels": X}, None), steps=2, progress=False)
    assert moved == [lt.input_device(model)] * 2 == [model.model.embed_tokens.weight.device] * 2


def test_a_missing_hard_dependency_skips_here_and_fails_under_ci(monkeypatch):
    """conftest.require: a learner's machine without a package skips its tests; CI (CI=true) must
    fail instead, or a broken wheel would turn parity tests into skips and leave CI green."""
    monkeypatch.delenv("CI", raising=False)
    assert require("torch") is torch
    with pytest.raises(pytest.skip.Exception, match="labkit_no_such_package"):
        require("labkit_no_such_package")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="labkit_no_such_package.*CI"):
        require("labkit_no_such_package")
