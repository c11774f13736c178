"""Where QLoRA starts (chapter 10): B = 0, LoftQ or PiSSA, on a whole model, and the error each leaves.

QLoRA from B = 0 starts at the NF4 model: every weight off by W - NF4(W). LoftQ (labkit/loftq.py)
and PiSSA (labkit/pissa.py) choose the base that is quantized and the adapter's first A and B
together, so that the starting model NF4(base) + s B A is closer to W:

    init      base quantized               A, B at the start
    "zeros"   W                            peft's default: A random (Kaiming), B = 0
    "loftq"   LoftQ's last residual        B A fits W - NF4(base), divided by s
    "pissa"   W - s B A                    W's top r singular directions

A model started by LoftQ or PiSSA has a base that is not NF4(W): its adapter is only meaningful on
that base, so a checkpoint must hold the base too (peft says the same of its "loftq" and "pissa"
starts); lk.finetune.checkpoint_bytes counts the adapter alone.
"""
import torch
from torch import nn

from .loftq import alternate, split_scaling
from .lora import _check_lora_args, find_targets, inject_lora, is_linear, lora_layers, lora_scaling
from .pissa import pissa
from .qlora import quantize_model, quantize_targets
from .quant import dequantize_nf4, quantize_nf4

INITS = ("zeros", "loftq", "pissa")


def start(W, init, r, scaling, iters=1, blocksize=64, double_quant=True):
    """One weight's start: (base, A, B) in float32, base being the matrix to quantize; A and B are
    None for "zeros" (the layer's own B = 0 start)."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}")
    W = W.detach().float()
    if init == "zeros":
        return W, None, None
    if init == "pissa":
        A, B, base = pissa(W, r, scaling)
        return base, A, B
    base, _, _, A, B = alternate(W, r, iters, blocksize, double_quant)
    return (base,) + split_scaling(A, B, scaling)


def start_error(W, init, r, scaling, iters=1, blocksize=64, double_quant=True):
    """||W - (NF4(base) + s B A)||_F / ||W||_F: how far the starting model's weight is from W."""
    base, A, B = start(W, init, r, scaling, iters, blocksize, double_quant)
    Q = dequantize_nf4(*quantize_nf4(base, blocksize, double_quant))
    approx = Q if A is None else Q + scaling * (B @ A)
    W = W.detach().float()
    return (torch.linalg.norm(W - approx) / torch.linalg.norm(W)).item()


def init_qlora(model, target_modules, r, alpha, init="zeros", iters=1, quantize="all-linear", blocksize=64,
               double_quant=True, compute_dtype=torch.float32, use_rslora=False):
    """QLoRA (lk.inject_qlora) with the adapters started by `init`: "zeros", "loftq" (with `iters`
    rounds) or "pissa". Every setting and target is checked, and every new layer built, before the
    model is changed; no weight of the model is written in place (a tied embedding stays as it was)."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a whole number >= 1, got {iters!r}")
    if init != "loftq" and iters != 1:
        raise ValueError(f"iters={iters} is LoftQ's number of rounds; init={init!r} has none")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if lora_layers(model) or getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA layers: init_qlora starts from a plain model")
    quantized = quantize_targets(model, quantize)
    for name in quantized:        # stricter than quantize_model: a subclass (bitsandbytes' Linear4bit) keeps W its own way
        if type(model.get_submodule(name)) is not nn.Linear:
            raise TypeError(f"{name} is a {type(model.get_submodule(name)).__name__}, not an nn.Linear to quantize")
    targets = find_targets(model, target_modules)
    if not targets:               # inject_lora's own message, written out there where chapter 3 shows it
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise ValueError(f"target_modules={target_modules!r} matches no module of this "
                         f"{type(model).__name__}; its nn.Linear layers are named {linear}")
    outside = [n for n in targets if n not in set(quantized)]
    if outside and init != "zeros":
        raise ValueError(f"init={init!r} absorbs the quantization error of the layer it adapts, but these targets "
                         f"are not quantized by quantize={quantize!r}: {outside}")
    for name in targets:
        _check_lora_args(model.get_submodule(name), r, alpha, 0.0, "kaiming")
    scaling = lora_scaling(alpha, r, use_rslora)
    # the fp32 start's base is quantized as it is, so that B A fits the error of exactly the base
    # that is stored; quantize_model builds every layer (and checks blocksize) before it changes any
    bases, starts = {}, {}
    if init != "zeros":
        for name in targets:
            bases[name], *starts[name] = start(model.get_submodule(name).weight, init, r, scaling, iters,
                                               blocksize, double_quant)
    quantize_model(model, quantize, blocksize, double_quant, compute_dtype, bases=bases)
    inject_lora(model, target_modules, r, alpha, use_rslora=use_rslora)
    with torch.no_grad():
        for name, (A, B) in starts.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    model.qlora_start = dict(init=init, iters=iters)     # what the adapters assume of their base
    return model
