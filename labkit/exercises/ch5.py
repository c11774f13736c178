"""Chapter 5 (QLoRA): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ._common import _attempt, _ok, _todo, _first_wrong


def check_qlora_weight_bytes(fn):
    """fn(n_params, double_quant) -> bytes of NF4 weights in blocks of 64."""
    for n in (64 * 256, 7_000_000_000, 65_000_000_000):
        for dq in (False, True):
            done, got = _attempt(fn, n, dq)
            if not done:
                return _todo("NF4 weight bytes")
            bits = 4 + (8 / 64 + 32 / (64 * 256) if dq else 32 / 64)
            assert math.isclose(got, n * bits / 8, rel_tol=1e-6), \
                f"for {n:,} parameters (double_quant={dq}) you gave {got:,.0f} bytes; expected {n * bits / 8:,.0f}"
    _ok("NF4 weights: n x 4.5 / 8 bytes, or n x 4.127 / 8 with double quantization")


def _bnb_peft_stack(weights, As, Bs, r, alpha):
    """The reference for check_nf4_matmul: bitsandbytes' Linear4bit layers (NF4, blocks of 64, fp32
    compute, the path that dequantizes exactly) in a stack, with peft's LoRA on each."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from ..bnb_cpu import bnb_exact_on_cpu

    class Stack(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    layers = []
    for W in weights:
        l4 = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=torch.float32,
                               compress_statistics=False, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False,
                                      blocksize=64)
        layers.append(l4.to("cpu"))
    names = [str(i) for i in range(len(weights))]
    model = bnb_exact_on_cpu(get_peft_model(Stack(layers), LoraConfig(r=r, lora_alpha=alpha, target_modules=names)))
    lora = [model.base_model.model.layers[i] for i in range(len(weights))]
    with torch.no_grad():
        for layer, A, B in zip(lora, As, Bs):
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    return model, lora


def check_nf4_matmul(Function):
    """Function: a torch.autograd.Function whose apply(x, packed, state) computes x W^T for the NF4
    weight W that (packed, state) = lk.quantize_nf4(W, 64) holds: x (..., in) -> (..., out). Its
    forward saves what backward needs without the dequantized W; its backward returns
    (grad of x, None, None), dequantizing W again.

    Checked in a stack of two or three 4-bit layers with LoRA on each, against bitsandbytes'
    Linear4bit with peft's LoRA holding the same weights, A and B: the output, the gradient of every
    A and B (the first layer's reach it only through your backward) and of the input, within 1e-5
    + 1e-5 x |value| (fp32); and no saved tensor as large as W."""
    from ..measure import count_saved_tensors
    from ..quant import dequantize_nf4, quantize_nf4
    g = torch.Generator().manual_seed(5)
    cases = (((5,), (64, 64, 64)), ((2, 3), (128, 64, 192)), ((4,), (64, 128, 64, 128)))   # square first
    r, alpha = 4, 8
    for batch, dims in cases:
        Ws = [torch.randn(dims[i + 1], dims[i], generator=g) / dims[i] ** 0.5 for i in range(len(dims) - 1)]
        As = [torch.randn(r, W.shape[1], generator=g) * 0.1 for W in Ws]
        Bs = [torch.randn(W.shape[0], r, generator=g) * 0.1 for W in Ws]   # a non-zero B, so gradients flow to A
        x = torch.randn(*batch, dims[0], generator=g)
        quantized = [quantize_nf4(W, 64) for W in Ws]
        # yours: each layer is your 4-bit matmul plus LoRA, written out
        mine_A = [A.clone().requires_grad_() for A in As]
        mine_B = [B.clone().requires_grad_() for B in Bs]
        h = x_mine = x.clone().requires_grad_()
        for i, ((packed, state), A, B) in enumerate(zip(quantized, mine_A, mine_B)):
            try:
                with count_saved_tensors() as saved:
                    y = Function.apply(h, packed, state)
            except NotImplementedError:
                return _todo("the 4-bit matmul with its own backward")
            want_shape = (*h.shape[:-1], Ws[i].shape[0])
            assert isinstance(y, torch.Tensor) and tuple(y.shape) == want_shape, (
                f"layer {i}: for x of shape {tuple(h.shape)} and W of shape {tuple(Ws[i].shape)} (out x in) your forward "
                f"returned {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}; expected "
                f"{want_shape}: y = x W^T")
            assert y.dtype == h.dtype, f"layer {i}: your forward returned {y.dtype} for an input of {h.dtype}"
            assert y.grad_fn is not None, ("your output has no grad_fn: call it as Function.apply(x, packed, state), "
                                           "and return a tensor computed from x")
            kept = [v for v in vars(y.grad_fn).values() if isinstance(v, torch.Tensor)]
            big = [t for t in kept if t.is_floating_point() and t.numel() >= Ws[i].numel()]
            assert not big and saved["bytes"] < 2 * Ws[i].numel(), (                 # bf16 W: 2 bytes a weight
                f"layer {i}: your forward kept {saved['bytes'] + sum(t.nbytes for t in kept):,} bytes for backward, "
                f"{'including a float tensor as large as W' if big else 'as much as W in 16 bits or more'} "
                f"({Ws[i].numel() * 4:,} bytes in fp32). Save packed (and keep state), and dequantize again in "
                "backward: that is what makes a frozen 4-bit layer cost only its packed bytes between the passes")
            probe = h.detach().clone().requires_grad_()                   # this layer's backward, alone
            try:
                Function.apply(probe, packed, state).sum().backward()
            except RuntimeError as e:
                raise AssertionError(f"layer {i}: your backward failed: {str(e).splitlines()[0]}. It gets grad_y "
                                     "(..., out) and must return one gradient per input of forward: "
                                     "(grad_y W, None, None), where W is out x in") from None
            assert probe.grad is not None, (
                f"layer {i}: your backward returned None as the gradient of x. The base weight is frozen, but x is "
                "not: every layer before this one learns through grad_x = grad_y W")
            bad = _first_wrong(probe.grad, torch.ones_like(y) @ dequantize_nf4(packed, state), 1e-5, 1e-5)
            assert bad is None, (f"layer {i}: your backward's gradient of x is wrong: {bad}. It is grad_y W (W out x "
                                 "in, dequantized again in backward), not grad_y W^T, and not scaled")
            h = y + (alpha / r) * (h @ A.T) @ B.T
        out_mine = h
        # the reference: bitsandbytes + peft, the same weights, A and B
        ref, lora = _bnb_peft_stack(Ws, As, Bs, r, alpha)
        x_ref = x.clone().requires_grad_()
        out_ref = ref(x_ref)
        bad = _first_wrong(out_mine.detach(), out_ref.detach(), 1e-5, 1e-5)
        deq = max((dequantize_nf4(p, s) - W).abs().max().item() for (p, s), W in zip(quantized, Ws))
        assert bad is None, (f"the stack's output differs from bitsandbytes + peft: {bad}. Is W dequantized with "
                             f"lk.dequantize_nf4(packed, state) (it is within {deq:.2g} of the fp32 W here), and is it "
                             "x W^T, not x W?")
        try:
            out_mine.pow(2).mean().backward()
        except RuntimeError as e:
            raise AssertionError(f"your backward failed: {str(e).splitlines()[0]}. It gets grad_y (..., out) and must "
                                 "return one gradient per input of forward: (grad_y W, None, None), where W is "
                                 "out x in") from None
        out_ref.pow(2).mean().backward()
        n = len(Ws)
        for i in reversed(range(n)):                                     # the last layer first: it needs no backward of yours
            for name, mine, theirs in (("B", mine_B[i], lora[i].lora_B["default"].weight),
                                       ("A", mine_A[i], lora[i].lora_A["default"].weight)):
                assert mine.grad is not None and mine.grad.abs().sum() > 0, (
                    f"layer {i}'s LoRA {name} got no gradient: the gradient to every layer before the last flows "
                    "through your backward's grad of x. Does it return grad_y W, or None?")
                bad = _first_wrong(mine.grad, theirs.grad, 1e-5, 1e-5)
                assert bad is None, (
                    f"the gradient of layer {i}'s LoRA {name} (of {n} layers) differs from peft's: {bad}. "
                    + ("The last layer's gradients do not use your backward: check the forward." if i == n - 1 else
                       "Layers after it are right, so your backward's grad of x is wrong: it is grad_y W "
                       "(W out x in, dequantized in backward), not grad_y W^T, and not scaled"))
        bad = _first_wrong(x_mine.grad, x_ref.grad, 1e-5, 1e-5)
        assert bad is None, f"the gradient of the input differs from bitsandbytes': {bad}"
    return _ok("your 4-bit matmul and its backward match bitsandbytes' Linear4bit with peft's LoRA (to 1e-5), "
               "and keep no dequantized weight for backward")


def check_lora_grad_flow(model):
    """After a backward pass, only LoRA A and B may hold gradients; every A and B must have one."""
    from ..lora import lora_layers
    others = [n for n, p in model.named_parameters() if p.grad is not None and not n.endswith((".lora_A", ".lora_B"))]
    assert not others, f"these frozen parameters received gradients: {others[:3]}"
    missing = [n for n, m in lora_layers(model) if m.lora_B.grad is None]
    assert not missing, f"these LoRA layers got no gradient on B: {missing[:3]}"
    _ok(f"gradients reached the {2 * len(lora_layers(model))} LoRA tensors and nothing else")
