"""labkit's LoRA against peft's, with the same A and B: outputs, gradients, merged weights, counts.

Tolerances (fp32): outputs and gradients to 1e-5 absolute (plus 1e-5 relative), merged weights to
1e-6. Both sides run the same matrix products in the same order, so the differences seen are ~1e-7.
"""
import pytest
import torch

import labkit as lk

TOL = dict(rtol=1e-5, atol=1e-5)


def randomise_B(model, seed=0):
    torch.manual_seed(seed)
    for _, m in lk.lora_layers(model):
        m.lora_B.data.normal_(std=0.05)


def pair(factory, targets, r=4, alpha=8, use_rslora=False):
    ours = lk.inject_lora(factory(), targets, r=r, alpha=alpha, use_rslora=use_rslora)
    randomise_B(ours)                         # B = 0 would make the check blind to B's role
    theirs = lk.to_peft(ours, factory())
    return ours, theirs


CASES = [
    (lk.tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    (lk.tiny_llama, "all-linear", True),
    (lk.tiny_llama, ["q_proj", "v_proj"], False),
    (lk.tiny_bert, ["query", "key", "value"], False),
]


def batch(model):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 12))
    return {"input_ids": x, "labels": x} if hasattr(model, "lm_head") else {"input_ids": x}


def output(model, b):
    out = model(**b)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("factory, targets, rslora", CASES)
def test_outputs_and_trainable_counts(factory, targets, rslora):
    ours, theirs = pair(factory, targets, use_rslora=rslora)
    b = batch(ours)
    torch.testing.assert_close(output(ours, b), output(theirs, b), **TOL)
    trainable_peft, total_peft = theirs.get_nb_trainable_parameters()
    assert lk.count_parameters(ours) == (trainable_peft, total_peft)


@pytest.mark.parametrize("factory, targets, rslora", CASES)
def test_gradients_on_A_and_B(factory, targets, rslora):
    ours, theirs = pair(factory, targets, use_rslora=rslora)
    b = batch(ours)
    for m in (ours, theirs):
        output(m, b).pow(2).mean().backward()
    grads = lk.peft_lora_grads(theirs)
    assert set(grads) == {n for n, _ in lk.lora_layers(ours)}
    for name, layer in lk.lora_layers(ours):
        gA, gB = grads[name]
        assert layer.lora_A.grad.abs().max() > 0
        torch.testing.assert_close(layer.lora_A.grad, gA, **TOL)
        torch.testing.assert_close(layer.lora_B.grad, gB, **TOL)


@pytest.mark.parametrize("factory, targets, rslora", CASES[:2])
def test_merged_weights_equal_merge_and_unload(factory, targets, rslora):
    ours, theirs = pair(factory, targets, use_rslora=rslora)
    merged_peft = theirs.merge_and_unload()
    lk.merge_lora(ours)
    for name, layer in lk.lora_layers(ours):
        torch.testing.assert_close(layer.base.weight, merged_peft.get_submodule(name).weight,
                                   rtol=0, atol=1e-6)


@pytest.mark.slow
def test_smollm2_parity():
    """The same check on the real SmolLM2-135M-Instruct weights."""
    make = lambda: lk.load_model("smollm2")[0]
    ours, theirs = pair(make, ["q_proj", "k_proj", "v_proj", "o_proj"], r=8, alpha=16)
    x = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": x, "labels": x}
    lo, po = ours(**b), theirs(**b)
    torch.testing.assert_close(lo.logits, po.logits, **TOL)
    lo.loss.backward()
    po.loss.backward()
    grads = lk.peft_lora_grads(theirs)
    for name, layer in lk.lora_layers(ours)[::7]:
        torch.testing.assert_close(layer.lora_A.grad, grads[name][0], **TOL)
        torch.testing.assert_close(layer.lora_B.grad, grads[name][1], **TOL)
    assert lk.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0] == 921_600
