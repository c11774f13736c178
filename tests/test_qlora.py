"""The from-scratch QLoRA layer against bitsandbytes' Linear4bit + peft's LoRA.

Both sides start from the same weights; labkit quantizes them itself (byte-identical to
bitsandbytes, test_quant.py), then the same A and B are copied across. Tolerance (fp32): 1e-5
on outputs and on the gradients of A and B. Without double quantization the dequantized weights
are identical, so only the matmul's summation order can differ.

bitsandbytes computes two ways on a CPU (chapter 5 shows both): it
dequantizes in the compute dtype, or, on a CPU with AVX512-BF16, repacks a layer at its first
inference call and computes through a fused bf16 kernel from then on. The 1e-5 parity holds on
the first path, which bnb_exact_on_cpu keeps on any CPU. The fused path is checked for what it
is: the same control flow on every CPU with the kernel emulated, and bitsandbytes' real kernel
where the CPU has the instructions, each within bf16 rounding (1e-2 of the largest logit).
"""
import pytest
import torch
import torch.nn as nn

import labkit as lk
from conftest import require

require("bitsandbytes")
TOL = dict(rtol=1e-5, atol=1e-5)
BF16_REL = 1e-2           # bf16 keeps 8 significant bits: 2^-8 = 0.4% per rounding
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
    theirs = lk.to_peft(ours, lk.qlora.bnb_exact_on_cpu(bnb_tiny_llama(tmp_path, double_quant=False)))
    assert len(lk.qlora.bnb_4bit_layers(theirs)) == 2 * 7      # every linear layer but the head is 4-bit there
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    lo, po = ours(input_ids=x, labels=x), theirs(input_ids=x, labels=x)
    assert lk.qlora.bnb_cpu_repacked(theirs) == []
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
    theirs = lk.qlora.bnb_exact_on_cpu(bnb_tiny_llama(tmp_path, double_quant=True))
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
    model = lk.tiny_llama()                        # q_proj comes before layer 0's mlp: still nothing replaced
    with pytest.raises(TypeError, match="not an nn.Linear"):
        lk.quantize_model(model, ["q_proj", "mlp"])
    assert not any(isinstance(m, lk.LinearNF4) for m in model.modules())
    with pytest.raises(ValueError, match="does not quantize"):
        lk.quantize_model(model, ["q_proj"], bases={"model.layers.0.mlp.up_proj": torch.zeros(128, 64)})
    assert not any(isinstance(m, lk.LinearNF4) for m in model.modules())


@pytest.mark.parametrize("kernel", ["emulated", "bitsandbytes"])
def test_the_fused_cpu_path_repacks_at_inference_and_rounds_to_bf16(tmp_path, kernel):
    """bitsandbytes' own control flow with its fused kernel: emulated in torch on any CPU, real where
    the CPU has AVX512-BF16. Logits stay within bf16 rounding of the fp32 result, and are not equal to it."""
    if kernel == "bitsandbytes" and not lk.session.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never takes its fused path here, and its "
                    "compiled kernel cannot run (the 'emulated' case checks the same control flow)")
    lk.tiny_llama(seed=0).save_pretrained(tmp_path)
    ours = lk.inject_qlora(lk.tiny_llama(seed=0), QKVO, r=4, alpha=8, double_quant=False)
    torch.manual_seed(1)
    for _, m in lk.lora_layers(ours):
        m.lora_B.data.normal_(std=0.05)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with lk.qlora.bnb_fused_cpu(emulate=kernel == "emulated"):
        theirs = lk.to_peft(ours, bnb_tiny_llama(tmp_path, double_quant=False))   # eval mode, as loaded
        layers = lk.qlora.bnb_4bit_layers(theirs)
        assert not any(m.training for _, m in layers) and lk.qlora.bnb_cpu_repacked(theirs) == []
        lo, po = ours(input_ids=x, labels=x), theirs(input_ids=x, labels=x)
        repacked = lk.qlora.bnb_cpu_repacked(theirs)
        # repacked: the layers whose input needs no grad (q, k, v of layer 0 read the embeddings);
        # after the first LoRA layer every input requires grad, and those layers stay as they were
        assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in repacked
        assert "base_model.model.model.layers.0.self_attn.o_proj.base_layer" not in repacked
        diff = (lo.logits - po.logits).abs().max().item()
        assert 1e-6 < diff <= BF16_REL * lo.logits.abs().max().item(), diff
        theirs.train()                                       # training mode keeps the fused path
        po = theirs(input_ids=x, labels=x)
        assert lk.qlora.bnb_cpu_repacked(theirs) == repacked
        assert abs(po.loss.item() - lo.loss.item()) <= BF16_REL * lo.loss.item()
        po.loss.backward()
        for A, B in lk.peft_lora_grads(theirs).values():
            assert A is not None and B is not None and torch.isfinite(A).all() and torch.isfinite(B).all()


def test_the_cpu_layout_holds_the_same_codes_as_the_packed_bytes():
    import bitsandbytes as bnb
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    with lk.qlora.bnb_fused_cpu(emulate=True):
        l4 = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=False,
                               quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=False, blocksize=64).to("cpu")
        packed = l4.weight.data.clone()
        with torch.no_grad():
            l4.eval()(torch.randn(2, 128))
        assert l4.weight.quant_state.packing_format_for_cpu
        codes = lk.qlora.unpack_bnb_cpu_layout(l4.weight.data, 64, 128)
    flat = packed.reshape(-1)
    expected = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(64, 128)    # high nibble first
    assert torch.equal(codes, expected)
    absmax = l4.weight.quant_state.absmax
    assert absmax.dtype == torch.bfloat16 and absmax.shape == (128 // 64, 64)  # rounded and transposed


def test_bnb_exact_on_cpu_refuses_a_layer_already_repacked(tmp_path):
    lk.tiny_llama(seed=0).save_pretrained(tmp_path)
    with lk.qlora.bnb_fused_cpu(emulate=True):
        model = bnb_tiny_llama(tmp_path, double_quant=False)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(RuntimeError, match="already repacked"):
            lk.qlora.bnb_exact_on_cpu(model)


@pytest.mark.parametrize("kernel", ["emulated", "bitsandbytes"])
def test_after_an_evaluation_the_fused_path_passes_no_gradient_back(tmp_path, kernel):
    """The fused kernel has no backward. Evaluate a bitsandbytes model under no_grad on such a CPU,
    then train LoRA on q and v: no gradient crosses o_proj, so every adapter gets exactly zero.
    lk.train.train refuses such a model; bnb_exact_on_cpu before the first forward avoids it."""
    if kernel == "bitsandbytes" and not lk.session.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never takes its fused path here, and its "
                    "compiled kernel cannot run (the 'emulated' case checks the same control flow)")
    from peft import LoraConfig, get_peft_model
    lk.tiny_llama(seed=0).save_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def lora_grads(exact):
        base = bnb_tiny_llama(tmp_path, double_quant=False)
        if exact:
            lk.qlora.bnb_exact_on_cpu(base)
        with torch.no_grad():
            base(input_ids=x)                                  # an evaluation first
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(std=0.05)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return model, [g for pair in lk.peft_lora_grads(model).values() for g in pair]

    with lk.qlora.bnb_fused_cpu(emulate=kernel == "emulated"):
        with pytest.warns(UserWarning, match="autograd kernel was not registered"):
            model, grads = lora_grads(exact=False)
        assert len(lk.qlora.bnb_cpu_repacked(model)) == 2 * 7
        assert len(grads) == 8 and all(g is None or torch.count_nonzero(g) == 0 for g in grads)   # none arrives
        with pytest.raises(RuntimeError, match="repacked"):
            lk.train.train(model, iter(lambda: {"input_ids": x, "labels": x}, None), steps=1, progress=False)
        model, grads = lora_grads(exact=True)
        assert lk.qlora.bnb_cpu_repacked(model) == []
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


class _NoHostReads:
    """Inside this block any call that reads a tensor back to the host (.tolist, .item, .cpu,
    .numpy, bool/int/float of a tensor) raises: on a GPU each one would stall the pipeline."""
    NAMES = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            def refuse(*args, _n=n, **kwargs):
                raise AssertionError(f"Tensor.{_n} called: a host synchronisation on an accelerator")
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_nf4_forward_and_backward_read_nothing_back_to_the_host(double_quant, monkeypatch):
    # The decode an accelerator runs is the torch one: the compiled CPU decode (labkit/nf4_cpu.py)
    # is taken only for tensors on the CPU, and hands them to numba through .numpy(), which this
    # guard would count; so the guard checks the torch decode, the path that matters on a GPU.
    from labkit import nf4_cpu
    monkeypatch.setattr(nf4_cpu, "available", lambda: False)
    torch.manual_seed(0)
    layer = lk.LoRALinear(lk.LinearNF4(nn.Linear(128, 64), double_quant=double_quant), r=4, alpha=8)
    nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(3, 128, requires_grad=True)
    with _NoHostReads():
        y = layer(x)
        y.pow(2).sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None
    with pytest.raises(AssertionError, match="host synchronisation"):      # the guard itself bites
        with _NoHostReads():
            y.sum().item()


def test_the_codebook_is_a_shared_constant_not_counted_and_it_follows_moves():
    """The layer keeps its 16 NF4 values on its device for the no-host-read forward pass, but, as
    bitsandbytes' codebook, they are neither saved nor counted in the layer's bytes (chapter 5
    prints those bytes), and a cast to bf16 leaves them in fp32."""
    layer = lk.LinearNF4(nn.Linear(128, 64, bias=False), double_quant=True)
    stored = sum(t.numel() * t.element_size() for t in (layer.packed, layer.absmax, layer.offset, layer.absmax2, layer.code2))
    assert lk.model_bytes(layer) == stored
    assert "code" not in layer.state_dict()
    layer.to(torch.bfloat16)
    assert layer.code.dtype == torch.float32 and torch.equal(layer.code, lk.nf4_codebook())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (7, 15)])            # (7, 15): a short last block
def test_the_kept_cpu_decoder_gives_dequantize_nf4s_bits_and_follows_every_change(double_quant, shape):
    """LinearNF4.weight keeps the compiled decode's arguments (numpy views of its buffers) between
    calls; what it returns must be dequantize_nf4's bits after every way the buffers can change:
    a merge (new tensors), load_state_dict copying in place, and load_state_dict(assign=True)."""
    from labkit import nf4_cpu
    if not nf4_cpu.available():
        pytest.skip("numba is not installed: the layer takes dequantize_nf4's torch path")
    torch.manual_seed(0)
    out_f, in_f = shape
    layer = lk.LinearNF4(nn.Linear(in_f, out_f), double_quant=double_quant)
    other = lk.LinearNF4(nn.Linear(in_f, out_f), double_quant=double_quant)     # other weights, same shapes

    def same_bits():
        want = lk.dequantize_nf4(layer.packed, layer.quant_state())
        assert torch.equal(layer.weight.view(torch.int32), want.view(torch.int32))

    same_bits()
    first = layer._decoder()
    assert layer._decoder() is first                                # kept, not made again
    layer.add_to_weight(torch.full(shape, 0.05))                    # new buffers: made again
    assert layer._decoder() is not first
    same_bits()
    before = layer.weight
    layer.load_state_dict(other.state_dict())                       # copied into the same storage
    same_bits()
    assert torch.equal(layer.weight, other.weight) and not torch.equal(layer.weight, before)
    layer.add_to_weight(torch.full(shape, -0.05))
    layer.load_state_dict(other.state_dict(), assign=True)          # the buffers replaced
    same_bits()
    assert torch.equal(layer.weight, other.weight)
