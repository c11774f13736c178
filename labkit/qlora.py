"""QLoRA from scratch (chapter 5): a frozen linear layer stored in NF4, with LoRA on top.

    h = dequant(W_nf4) x + (alpha / r) B A x        W_nf4: 4.5 (or ~4.13) bits per weight, frozen
                                                      A, B: full precision, trained

The base weight is dequantized on the fly, in the compute dtype, at every forward pass; it never
receives a gradient. The LoRA path is the LoRALinear of chapter 2, unchanged.

What bitsandbytes' own 4-bit layer does on a CPU (the same chapter's forensics) lives in lk.bnb_cpu;
its functions are also reachable here (lk.qlora.bnb_exact_on_cpu, ...).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bnb_cpu import (bnb_4bit_layers, bnb_cpu_repacked, bnb_exact_on_cpu, bnb_fused_cpu,  # noqa: F401
                      unpack_bnb_cpu_layout)                    # (chapter 5 reads them as lk.qlora.*)
from .lora import count_parameters, find_targets, inject_lora, replace_module
from . import nf4_cpu
from .quant import QuantState4, check_state, compiled_double, dequantize_nf4, nf4_bits, quantize_nf4


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4. Autograd would keep the dequantized W (4 bytes a
    weight) for the backward pass; this dequantizes it again instead, as bitsandbytes does, so a
    frozen 4-bit layer costs only its packed bytes between the two passes."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.weight, bias)           # under autocast this runs in its dtype (bf16)

    @staticmethod
    def backward(ctx, grad_out):                                   # only x needs a gradient
        W = ctx.layer.weight.to(grad_out.dtype)                    # grad_out is bf16 after autocast
        return (grad_out @ W).to(ctx.x_dtype), None, None


class LinearNF4(nn.Module):
    """A frozen nn.Linear whose weight lives as packed NF4 (two weights per byte). It offers what
    LoRALinear needs of a base layer: in_features, out_features, forward and add_to_weight."""

    def __init__(self, linear, blocksize=64, double_quant=True, compute_dtype=torch.float32):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearNF4 quantizes an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._store(linear.weight.detach(), blocksize, double_quant)

    def _store(self, W, blocksize, double_quant):
        packed, s = quantize_nf4(W, blocksize, double_quant)
        self.blocksize, self.double_quant, self.weight_dtype = blocksize, double_quant, W.dtype
        self.register_buffer("packed", packed)                    # (out*in/2, 1) uint8
        self.packed_weights = W.numel()                           # counted as parameters (as peft does)
        self.register_buffer("absmax", s.absmax)                  # per block: fp32, or uint8 with DQ
        for name in ("offset", "absmax2", "code2"):
            self.register_buffer(name, getattr(s, name))          # None without double quantization
        # the 16 NF4 values, kept on the layer's device so that a forward pass on a GPU reads nothing
        # back from the host; not a buffer: like bitsandbytes' codebook they are a shared constant,
        # neither saved nor counted in the layer's bytes (_apply moves them with the layer)
        self.code = s.code

    def quant_state(self):
        return QuantState4(torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.blocksize,
                           self.code, self.absmax, self.offset, self.absmax2, self.code2, code_name="nf4")

    @property
    def weight(self):
        """The dequantized weight (out, in), in the compute dtype: a fresh tensor, read-only in spirit.
        It is dequantize_nf4(self.packed, self.quant_state()); on a CPU with numba the compiled
        decode's arguments are made once and kept (_decoder), since a QLoRA step decodes each
        layer twice (tests/test_qlora.py holds the two paths equal)."""
        if self.packed.device.type == "cpu" and nf4_cpu.available():
            W = nf4_cpu.run(self._decoder()).view(self.out_features, self.in_features)
            return W.to(self.weight_dtype).to(self.compute_dtype)
        return dequantize_nf4(self.packed, self.quant_state()).to(self.compute_dtype)

    def _decoder(self):
        """nf4_cpu.prepare's arguments for this layer, made again whenever a stored tensor has been
        replaced (a new quantization, a move, load_state_dict(assign=True)); checked as dequantize_nf4
        checks them."""
        tensors = (self.packed, self.absmax, self.offset, self.absmax2, self.code2, self.code)
        key = tuple(None if t is None else (t.data_ptr(), t.dtype, t.numel()) for t in tensors) + (self.blocksize,)
        cached = getattr(self, "_decoded", None)
        if cached is None or cached[0] != key:
            state = self.quant_state()
            n = check_state(self.packed, state)
            cached = self._decoded = (key, nf4_cpu.prepare(self.packed.reshape(-1), state.code, state.absmax,
                                                           state.blocksize, n, compiled_double(state)))
        return cached[1]

    def forward(self, x):                                          # x: (..., in)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4Linear.apply(x.to(self.compute_dtype), self, bias)    # dequantize, then an ordinary matmul
        return y.to(x.dtype)          # back to the input's dtype, as bitsandbytes' Linear4bit does

    def _apply(self, fn, recurse=True):
        """model.to(device) moves the packed bytes and their constants; model.to(torch.bfloat16)
        (or .half()) must not round the quantization constants (absmax, offset, code2) to 16 bits:
        they keep their dtype, as bitsandbytes' Params4bit keeps its QuantState. Only the bias
        follows a dtype change; the compute dtype is the layer's own setting."""
        probe = fn(torch.zeros(1, device=self.packed.device))
        self.code = self.code.to(probe.device)                     # the codebook follows moves only
        if probe.dtype == torch.float32:                           # a move only: apply it to everything
            return super()._apply(fn, recurse)
        return super()._apply(lambda t: fn(t) if t is self.bias else t.to(probe.device), recurse)

    @torch.no_grad()
    def add_to_weight(self, delta):
        """W <- quantize(dequantize(W) + delta): what merging into a 4-bit layer has to do.
        The result is rounded to NF4 again, so it is not exactly W + delta (chapter 5 measures it)."""
        W = self.weight.float() + delta.float()
        self._store(W.to(self.weight_dtype), self.blocksize, self.double_quant)

    def extra_repr(self):
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, NF4 blocks of "
                f"{self.blocksize}{dq}, compute_dtype={self.compute_dtype}")


def quantize_targets(model, targets):
    """The names `targets` selects, each checked to be an nn.Linear that LinearNF4 can quantize."""
    names = find_targets(model, targets)
    if not names:
        raise ValueError(f"targets={targets!r} matches no module of this {type(model).__name__}")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return names


def quantize_model(model, targets="all-linear", blocksize=64, double_quant=True, compute_dtype=torch.float32,
                   bases=None):
    """Replace the target nn.Linear layers (all but the output head by default) with LinearNF4, in place.
    `bases` ({name: matrix}) quantizes another matrix in a layer's place (chapter 10's LoftQ and PiSSA
    starts), as it is, decoded to the layer's own dtype. Every new layer is built before the first is
    put in, so a refused call leaves the model as it was."""
    names = quantize_targets(model, targets)
    bases = bases or {}
    unknown = sorted(set(bases) - set(names))
    if unknown:
        raise ValueError(f"bases names layers that targets={targets!r} does not quantize: {unknown}")
    new = {}
    for name in names:
        module = model.get_submodule(name)
        if name in bases:
            holder = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            holder.weight = nn.Parameter(bases[name].detach(), requires_grad=False)
            holder.bias = module.bias
            new[name] = LinearNF4(holder, blocksize, double_quant, compute_dtype)
            new[name].weight_dtype = module.weight.dtype
        else:
            new[name] = LinearNF4(module, blocksize, double_quant, compute_dtype)
    for name, layer in new.items():
        replace_module(model, name, layer)
    model.requires_grad_(False)
    return model


def inject_qlora(model, target_modules, r, alpha, quantize="all-linear", blocksize=64, double_quant=True,
                 compute_dtype=torch.float32, **lora_kwargs):
    """QLoRA: quantize the base model's linear layers to NF4, then put LoRA on `target_modules`."""
    quantize_model(model, quantize, blocksize, double_quant, compute_dtype)
    return inject_lora(model, target_modules, r, alpha, **lora_kwargs)


def model_bytes(model):
    """Bytes held by a model's parameters and buffers (each tensor once): its memory footprint."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def footprint_table(name="smollm2"):
    """Memory of a model's weights in fp32, bf16, NF4 and NF4 + double quantization: the arithmetic,
    labkit's quantized model (measured), and bitsandbytes' through transformers (get_memory_footprint).
    Linear layers other than the output head are quantized; embeddings and norms stay in fp32."""
    from transformers import BitsAndBytesConfig
    from .models import load_model
    fp32 = load_model(name)[0]
    n_total = count_parameters(fp32)[1]
    n_linear = sum(fp32.get_submodule(n).weight.numel() for n in find_targets(fp32, "all-linear"))
    other = n_total - n_linear
    bits = {"NF4": nf4_bits(64), "NF4 + double quant": nf4_bits(64, double_quant=True)}
    rows = [dict(format="fp32", arithmetic=4 * n_total, labkit=model_bytes(fp32), bnb=fp32.get_memory_footprint()),
            dict(format="bf16", arithmetic=2 * n_total, labkit=model_bytes(load_model(name, dtype=torch.bfloat16)[0]),
                 bnb=None)]
    for label, b in bits.items():
        dq = label != "NF4"
        ours = quantize_model(load_model(name)[0], double_quant=dq)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                 bnb_4bit_compute_dtype=torch.float32)
        theirs = load_model(name, quantization_config=cfg, device_map="cpu")[0]
        rows.append(dict(format=label, arithmetic=n_linear * b / 8 + 4 * other, labkit=model_bytes(ours),
                         bnb=theirs.get_memory_footprint()))
    return rows, n_linear, other
