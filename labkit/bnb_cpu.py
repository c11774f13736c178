"""bitsandbytes' Linear4bit on a CPU with AVX512-BF16 (chapter 5): the same layer takes another path there.

On such a CPU, the first time a Linear4bit runs in eval mode on an input that does not require
grad (evaluation or generate() under torch.no_grad(), or a layer whose input comes from frozen
layers only), bitsandbytes repacks its bytes into a CPU layout, and from then on, in training
mode too, computes through a fused kernel that casts the input and the block constants to bf16,
whatever bnb_4bit_compute_dtype says. That kernel has no backward: no gradient reaches the
layer's input through it, so adapters before a repacked layer stop learning. On every other CPU
(and on a GPU) bitsandbytes dequantizes in the compute dtype, as labkit's LinearNF4 does.

The chapter reads these through lk.qlora (lk.qlora.bnb_exact_on_cpu, ...), which re-exports them.
"""
import contextlib
import sys

import torch

from . import train


def bnb_4bit_layers(model):
    """(name, module) for every bitsandbytes Linear4bit of `model`."""
    import bitsandbytes as bnb
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def bnb_cpu_repacked(model):
    """Names of the Linear4bit layers that bitsandbytes has repacked for its fused bf16 CPU kernel."""
    return [n for n, m in bnb_4bit_layers(model)
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def refuse_repacked(model):
    """lk.train.train's check (registered below): a model with repacked layers would train wrong."""
    repacked = bnb_cpu_repacked(model) if "bitsandbytes" in sys.modules else []   # no Linear4bit without it
    if repacked:
        raise RuntimeError(
            f"{len(repacked)} bitsandbytes 4-bit layers (e.g. {repacked[0]}) were repacked for bitsandbytes' CPU "
            "inference kernel when the model ran under no_grad, and that kernel passes no gradient back: adapters "
            "before them would not learn. Load the model again and call lk.qlora.bnb_exact_on_cpu(model) before "
            "its first forward pass (chapter 5)")


train.MODEL_CHECKS.append(refuse_repacked)


def bnb_exact_on_cpu(model):
    """Keep every Linear4bit of `model` on the path that dequantizes in the compute dtype, on any
    CPU (it turns off the repacking described above). Call it before the model's first forward pass."""
    done = bnb_cpu_repacked(model)
    if done:
        raise RuntimeError(f"{len(done)} Linear4bit layers were already repacked for the fused CPU kernel "
                           f"(e.g. {done[0]}): call bnb_exact_on_cpu before the first forward pass")
    for _, m in bnb_4bit_layers(model):
        m.support_avx512bf16_for_cpu = False
    return model


def unpack_bnb_cpu_layout(packed, N, K, block_n=32):
    """The (N, K) 4-bit codes of a weight that bitsandbytes repacked for its CPU kernel
    (`_convert_weight_packed_for_cpu`: blocks of 32 rows; a byte holds one column of rows b and
    b + 16 of a block, row b in its low nibble)."""
    p = packed.reshape(-1, block_n)                                  # (N/32 * K/2, 32)
    rows = torch.cat([p & 0xF, p >> 4], dim=1)                       # (N/32 * K/2, 64): 32 rows x 2 columns
    return rows.reshape(N // block_n, K // 2, block_n, 2).transpose(1, 2).reshape(N, K)


def _fused_cpu_gemv_kernel(A, B, N, K, absmax, code, blocksize):
    """What bitsandbytes' fused CPU kernel computes, written in torch: the input and the block
    constants in bf16 (repacking already rounded the constants to bf16, transposed them to
    (K/blocksize, N), and undid double quantization), the weight dequantized to bf16, sums in
    fp32, the result in bf16. Like the compiled kernel it fills a fresh tensor: no autograd history."""
    with torch.no_grad():
        codes = unpack_bnb_cpu_layout(B.view(torch.uint8), N, K)
        W = (code.float()[codes.long()].reshape(-1, blocksize) * absmax.T.reshape(-1).float()[:, None]).reshape(N, K)
        return (A.to(torch.bfloat16).float() @ W.to(torch.bfloat16).float().T).to(torch.bfloat16).to(A.dtype)


_EMULATION = []


def _fused_cpu_gemv_emulated(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """F.gemv_4bit as bitsandbytes calls it on a repacked layer, through an operator registered the
    way bitsandbytes registers its own (a kernel, no autograd formula), so that autograd treats it as
    it treats the real one: backward passes no gradient through it to A, and warns."""
    if not _EMULATION:
        lib = torch.library.Library("labkit_bnb_emulation", "DEF")
        lib.define("gemv_4bit(Tensor A, Tensor B, int N, int K, Tensor absmax, Tensor code, int blocksize) -> Tensor")
        lib.impl("gemv_4bit", _fused_cpu_gemv_kernel, "CPU")
        _EMULATION.append(lib)
    N, K = state.shape
    y = torch.ops.labkit_bnb_emulation.gemv_4bit(A, B, N, K, state.absmax, state.code, state.blocksize)
    if out is not None:
        out.copy_(y)
        return out
    return y


@contextlib.contextmanager
def bnb_fused_cpu(emulate=None):
    """Inside this block, Linear4bit layers made (or loaded) behave as on a CPU with AVX512-BF16:
    they repack and take the fused path. On a CPU that has those instructions that is bitsandbytes'
    own kernel; elsewhere (or with emulate=True) `_fused_cpu_gemv_emulated` computes it, since the
    compiled kernel cannot run there. Use the layers inside the block only."""
    import bitsandbytes.functional as bnbF
    import bitsandbytes.nn.modules as bnb_modules
    from .session import cpu_has_avx512_bf16
    if emulate is None:
        emulate = not cpu_has_avx512_bf16()
    if not emulate:
        yield "bitsandbytes' kernel"
        return
    saved = bnb_modules.has_avx512bf16, bnbF.gemv_4bit
    bnb_modules.has_avx512bf16 = lambda: True
    bnbF.gemv_4bit = _fused_cpu_gemv_emulated
    try:
        yield "emulated in torch"
    finally:
        bnb_modules.has_avx512bf16, bnbF.gemv_4bit = saved
