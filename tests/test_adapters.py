"""The from-scratch adapters and IA3 (chapter 8): identity at initialisation, parameter counts,
IA3 parity with peft, and their errors."""
import pytest
import torch

import labkit as lk
from labkit import adapters


def ids(B=2, T=9, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["serial", "parallel"])
def test_adapters_start_exactly_at_the_base_model(kind):
    x = ids()
    want = lk.tiny_llama()(input_ids=x).logits
    model = adapters.inject_adapters(lk.tiny_llama(), kind, bottleneck=8)
    assert torch.equal(model(input_ids=x).logits, want)
    wrapped = [m for m in model.modules() if isinstance(m, (adapters.SerialAdapter, adapters.ParallelAdapter))]
    assert len(wrapped) == 2 * 2                                  # o_proj and mlp in each of 2 layers


@pytest.mark.parametrize("kind", ["serial", "parallel"])
def test_adapter_parameter_count_and_that_only_adapters_train(kind):
    model = adapters.inject_adapters(lk.tiny_llama(), kind, bottleneck=8)      # d = 64
    per_adapter = (64 * 8 + 8) + (8 * 64 + 64)
    trainable, total = lk.count_parameters(model)
    assert trainable == 4 * per_adapter
    assert total == lk.count_parameters(lk.tiny_llama())[1] + trainable
    assert all(("adapter" in n) == p.requires_grad for n, p in model.named_parameters())


def test_adapters_learn_and_differ_by_placement():
    x = ids()
    outs = {}
    for kind in ("serial", "parallel"):
        model = adapters.inject_adapters(lk.tiny_llama(), kind, bottleneck=8)
        torch.manual_seed(1)
        for m in model.modules():
            if isinstance(m, adapters.Bottleneck):
                torch.nn.init.normal_(m.up.weight, std=0.05)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        outs[kind] = model(input_ids=x).logits
    assert not torch.allclose(outs["serial"], outs["parallel"])


def test_serial_and_parallel_formulas():
    lin = torch.nn.Linear(6, 6)
    x = torch.randn(3, 6)
    s, p = adapters.SerialAdapter(lin, 6, 2), adapters.ParallelAdapter(lin, 6, 2, scale=2.0)
    for a in (s, p):
        torch.nn.init.normal_(a.adapter.up.weight)
    ad = lambda a, v: a.adapter.up(torch.relu(a.adapter.down(v)))
    assert torch.allclose(s(x), lin(x) + ad(s, lin(x)))
    assert torch.allclose(p(x), lin(x) + 2.0 * ad(p, x))


def test_adapter_bad_input():
    with pytest.raises(ValueError, match="kind must be"):
        adapters.inject_adapters(lk.tiny_llama(), "diagonal")
    with pytest.raises(ValueError, match="no module matches"):
        adapters.inject_adapters(lk.tiny_llama(), targets=["ffn"])
    with pytest.raises(ValueError, match="bottleneck must be an int in 1..64"):
        adapters.inject_adapters(lk.tiny_llama(), bottleneck=0)
    with pytest.raises(ValueError, match="activation must be"):
        adapters.inject_adapters(lk.tiny_llama(), activation="tanh")


def test_ia3_starts_at_base_and_counts():
    x = ids()
    want = lk.tiny_llama()(input_ids=x).logits
    model = adapters.inject_ia3(lk.tiny_llama())
    assert torch.equal(model(input_ids=x).logits, want)
    # per layer: k (32 outputs: 2 kv heads x 16), v (32), down's input (128)
    assert lk.count_parameters(model)[0] == 2 * (32 + 32 + 128)


def test_ia3_matches_peft_outputs_and_gradients():
    from peft import IA3Config, get_peft_model
    ours = adapters.inject_ia3(lk.tiny_llama())
    theirs = get_peft_model(lk.tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    assert lk.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for name, layer in adapters.ia3_layers(ours):
            layer.ia3_l.copy_(1 + 0.3 * torch.randn_like(layer.ia3_l))
            twin = theirs.base_model.model.get_submodule(name)
            twin.ia3_l["default"].copy_(layer.ia3_l.view_as(twin.ia3_l["default"]))
    x = ids()
    lo, lt = ours(input_ids=x, labels=x), theirs(input_ids=x, labels=x)
    assert (lo.logits - lt.logits).abs().max() < 1e-5
    lo.loss.backward()
    lt.loss.backward()
    for name, layer in adapters.ia3_layers(ours):
        g = theirs.base_model.model.get_submodule(name).ia3_l["default"].grad
        assert (layer.ia3_l.grad - g.view_as(layer.ia3_l)).abs().max() < 1e-5


def test_ia3_bad_input():
    with pytest.raises(ValueError, match="match no module"):
        adapters.inject_ia3(lk.tiny_llama(), targets=["key"], feedforward=[])
    with pytest.raises(ValueError, match="must also be in targets"):
        adapters.inject_ia3(lk.tiny_llama(), targets=["k_proj"], feedforward=["down_proj"])
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        adapters.IA3Linear(torch.nn.LayerNorm(4))


class BufferLinear(torch.nn.Module):
    """A bias-less linear layer whose weight is a buffer, as in a 4-bit layer: no parameters at all."""

    def __init__(self, d, device):
        super().__init__()
        self.register_buffer("weight", torch.zeros(d, d, device=device))

    def forward(self, x):
        return x @ self.weight.T


@pytest.mark.parametrize("kind", ["serial", "parallel"])
def test_adapters_wrap_a_layer_that_holds_only_buffers(kind):
    """lk.LinearNF4 without a bias keeps its weight in buffers only; the adapter must still be made
    on the layer's device (the buffers': here "meta", where the rest of the model is on the CPU)."""
    model = lk.qlora.quantize_model(lk.tiny_llama())
    assert not list(model.model.layers[0].self_attn.o_proj.parameters())
    x = ids()
    want = model(input_ids=x).logits
    model = adapters.inject_adapters(model, kind, bottleneck=8, targets=("o_proj",))
    assert torch.equal(model(input_ids=x).logits, want)
    model = lk.tiny_llama()
    lk.replace_module(model, "model.layers.0.self_attn.o_proj", BufferLinear(64, "meta"))
    adapters.inject_adapters(model, kind, bottleneck=8, targets=("o_proj",))
    layers = model.model.layers
    assert layers[0].self_attn.o_proj.adapter.down.weight.device.type == "meta"
    assert layers[1].self_attn.o_proj.adapter.down.weight.device.type == "cpu"
