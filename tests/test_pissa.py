"""PiSSA from scratch (labkit/pissa.py) against peft's init_lora_weights="pissa", and QLoRA started
three ways (labkit/qinit.py: B = 0, LoftQ, PiSSA) on a small Llama (chapter 10).

Tolerances: peft's PiSSA and labkit's run the same float32 operations in the same order on the same
weight, so A, B and the residual base are compared for equality; LoftQ at a scaling s is LoftQ at
s = 1 with A and B divided by sqrt(s), checked to 1e-6 relative."""
import copy

import pytest
import torch

import labkit as lk
from labkit import loftq, pissa, qinit, quant
from conftest import require

peft = require("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g) * 0.02
    return W + 0.05 * torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)   # some structure


@pytest.mark.parametrize("r,alpha", [(4, 8), (8, 8), (2, 16)])
def test_pissa_equals_peft_to_the_bit(r, alpha):
    model = lk.tiny_llama(seed=1)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.Linear)}
    assert sorted(layers) == sorted(originals)
    for name, W in originals.items():
        layer = layers[name]
        A, B, res = pissa.pissa(W, r, scaling=alpha / r)
        assert torch.equal(A, layer.lora_A["default"].weight), name
        assert torch.equal(B, layer.lora_B["default"].weight), name
        assert torch.equal(res, layer.base_layer.weight), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                           # PiSSA's start is the same model, up to rounding
        assert torch.allclose(theirs(ids).logits, model(ids).logits, atol=1e-5)


def test_pissa_residual_quantizes_with_less_error_than_w():
    W = weight((256, 192), seed=0)
    plain = torch.linalg.norm(W - quant.dequantize_nf4(*quant.quantize_nf4(W))).item()
    packed, state, A, B = pissa.pissa_nf4(W, 8, scaling=2.0)
    start = torch.linalg.norm(W - quant.dequantize_nf4(packed, state) - 2.0 * B @ A).item()
    assert start < 0.8 * plain
    assert qinit.start_error(W, "pissa", 8, 2.0, double_quant=False) == pytest.approx(start / torch.linalg.norm(W).item())


def test_loftq_scaling_moves_only_the_split_between_s_and_ba():
    W = weight((192, 128), seed=3)
    p1, s1, A1, B1 = loftq.loftq(W, 8, iters=2)
    p2, s2, A2, B2 = loftq.loftq(W, 8, iters=2, scaling=4.0)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(A2, A1 / 2, rtol=1e-6, atol=0)          # each divided by sqrt(4)
    torch.testing.assert_close(B2, B1 / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(4.0 * B2 @ A2, B1 @ A1, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("init,iters", [("zeros", 1), ("loftq", 1), ("loftq", 3), ("pissa", 1)])
def test_init_qlora_builds_the_start_it_names(init, iters):
    r, alpha, dq = 4, 8, True
    model = qinit.init_qlora(lk.tiny_llama(seed=2), TARGETS, r, alpha, init=init, iters=iters, double_quant=dq)
    plain = lk.tiny_llama(seed=2)
    layers = dict(lk.lora_layers(model))
    assert sorted(layers) == sorted(n for n, _ in plain.named_modules() if n.endswith(tuple(TARGETS)))
    for name, layer in layers.items():
        W = plain.get_submodule(name).weight.detach()
        base = quant.dequantize_nf4(layer.base.packed, layer.base.quant_state())
        if init == "zeros":
            assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
            assert torch.equal(layer.base.packed, quant.quantize_nf4(W, 64, dq)[0])
            continue
        if init == "loftq":
            packed, state, A, B = loftq.loftq(W, r, iters, scaling=alpha / r, double_quant=dq)
        else:
            packed, state, A, B = pissa.pissa_nf4(W, r, alpha / r, double_quant=dq)
        assert torch.equal(layer.base.packed, packed) and torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
        assert torch.equal(base, quant.dequantize_nf4(packed, state))       # absmax and its double quant too
        start = torch.linalg.norm(W - base - layer.delta_weight())
        # the layer as built, against what start_error says of it (computed apart, from W alone)
        assert start.item() / torch.linalg.norm(W).item() == pytest.approx(
            qinit.start_error(W, init, r, alpha / r, iters), rel=1e-5)
        assert start < torch.linalg.norm(W - quant.dequantize_nf4(*quant.quantize_nf4(W, 64, dq))), name
    assert model.qlora_start == dict(init=init, iters=iters)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(init="gaussian"), ValueError, "choose one of"),
    (dict(init="pissa", iters=3), ValueError, "LoftQ's number of rounds"),
    (dict(init="loftq", iters=0), ValueError, "iters"),
    (dict(target_modules=["qproj"]), ValueError, "matches no module"),
    (dict(init="pissa", quantize=["v_proj"]), ValueError, "not quantized"),
    (dict(r=65), ValueError, "r="),
    (dict(init="pissa", blocksize=100), ValueError, "blocksize"),
    (dict(init="loftq", alpha=0), ValueError, "alpha"),
    (dict(init="pissa", double_quant="yes"), TypeError, "double_quant"),
    (dict(init="pissa", quantize=r"model\.layers\.0\.self_attn(\.q_proj)?"), TypeError, "not an nn.Linear"),
])
def test_init_qlora_refuses_and_leaves_the_model_as_it_was(kwargs, error, match):
    model = lk.tiny_llama(seed=4)
    before = copy.deepcopy(model.state_dict())
    settings = dict(target_modules=TARGETS, r=4, alpha=8) | kwargs
    with pytest.raises(error, match=match):
        qinit.init_qlora(model, **settings)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not lk.lora_layers(model) and all(type(m) is not lk.LinearNF4 for m in model.modules())


def test_init_qlora_refuses_a_model_with_adapters():
    model = lk.inject_lora(lk.tiny_llama(seed=4), ["q_proj"], r=4, alpha=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="already has LoRA"):
        qinit.init_qlora(model, TARGETS, 4, 8, init="pissa")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == model.state_dict().keys()


def test_init_qlora_writes_no_weight_in_place():
    """The output head of tiny_llama shares its weight with the embedding: adapting it must leave
    the embedding as it was (the head's LinearNF4 holds its own base)."""
    model = lk.tiny_llama(seed=6)
    embedding = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qinit.init_qlora(model, ["lm_head"], 4, 8, init="pissa", quantize=["lm_head"])
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_init_qlora_on_bf16_keeps_the_fp32_start_it_fitted():
    """A bf16 model: the base quantized is the fp32 start itself, so the stored codes are the ones
    B A was fitted to (quantizing the base after rounding it to bf16 would not be)."""
    model = lk.tiny_llama(seed=7).to(torch.bfloat16)
    W = model.model.layers[0].self_attn.q_proj.weight.detach().float()
    qinit.init_qlora(model, ["q_proj"], 4, 8, init="loftq", iters=2)
    layer = model.model.layers[0].self_attn.q_proj
    packed, state, A, B = loftq.loftq(W, 4, 2, scaling=2.0, double_quant=True)
    assert torch.equal(layer.base.packed, packed) and torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
    assert layer.base.weight_dtype == torch.bfloat16


def test_pissa_refuses_bad_input():
    with pytest.raises(ValueError, match="rank"):
        pissa.pissa(torch.zeros(8, 16), 9)
    with pytest.raises(ValueError, match="one weight matrix"):
        pissa.pissa(torch.zeros(2, 8, 16), 2)
    with pytest.raises(ValueError, match="scaling"):
        pissa.pissa(torch.ones(8, 16), 2, scaling=0.0)


@pytest.mark.parametrize("method", lk.finetune.QLORA_STARTS)
def test_finetune_prepares_the_qlora_starts(method):
    model = lk.finetune.prepare(lk.tiny_llama(seed=5), method)
    assert model.qlora_start["init"] == method.removeprefix("qlora_")
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lk.lora_layers(model)}) == sorted(lk.finetune.QKVO)
    assert method not in lk.finetune.METHODS               # chapter 8's comparison stays as it was
