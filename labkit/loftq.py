"""LoftQ from scratch (chapter 10): start the adapter where it absorbs the quantization error.

QLoRA starts from B = 0, so the model it trains is the NF4 base, Q = NF4(W), and the first steps
spend themselves winning back W - Q. LoftQ (Li et al., ICLR 2024) picks Q and a rank-r B A together,
so that Q + B A is close to W, by alternating the two best answers it knows:

    res = W
    repeat `iters` times:
        Q      = NF4(res)                the nearest NF4 weight to what B A leaves (chapter 4)
        B, A   = SVD_r(W - Q)            the best rank-r fit of what Q misses (Eckart-Young, chapter 1)
        res    = W - B A                 (not needed after the last round)

With one round it is "quantize, then fit the error"; more rounds let Q move to where B A helps most.
peft's `loftq_init` (peft/utils/loftq_utils.py) does the same through bitsandbytes; labkit's NF4 is
byte-identical to bitsandbytes', so the codes, A and B are equal to the bit (tests/test_loftq.py).
peft splits the singular values evenly: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, and so does this.

peft's LoraLayer.loftq_init puts these A and B into the layer as they are, so the model it starts
from is Q + scaling * B A: equal to LoftQ's Q + B A only when lora_alpha = r (scaling 1); so it is
in peft 0.21.2, and peft issue #1982 ("LoftQ init without scaling", 2024) asked the same. Give
`scaling` here and A and B are divided by sqrt(scaling) each, so that Q + scaling * B A is LoftQ's
start at any alpha; with the default 1.0 they are peft's, to the bit.
"""
import math

import torch

from .quant import dequantize_nf4, quantize_nf4


def svd_factors(M, r):
    """The best rank-r fit of M as B (out, r) @ A (r, in), the singular values split evenly between
    them: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (peft's _low_rank_decomposition)."""
    if M.dim() != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(M.shape)}")
    if not 1 <= r <= min(M.shape):
        raise ValueError(f"rank r={r} must be between 1 and min{tuple(M.shape)} = {min(M.shape)}")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def check_weight(W, r, method):
    """What LoftQ and PiSSA (labkit/pissa.py) both need: one weight matrix, and a rank that fits it."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"{method} works on one weight matrix; got {type(W).__name__} of shape "
                         f"{tuple(getattr(W, 'shape', ()))}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise ValueError(f"rank r={r!r} must be a whole number between 1 and min{tuple(W.shape)} = {min(W.shape)}")


def alternate(W, r, iters=1, blocksize=64, double_quant=False):
    """LoftQ's rounds on W (out, in): returns (res, packed, state, A, B), where res is the matrix the
    last round quantized (packed, state = quantize_nf4(res)); B @ A fits W minus its NF4 weight."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a whole number >= 1, got {iters!r}")
    check_weight(W, r, "LoftQ")
    W = W.detach().float()
    res = W
    for step in range(iters):
        packed, state = quantize_nf4(res, blocksize, double_quant)
        B, A = svd_factors(W - dequantize_nf4(packed, state), r)
        if step + 1 < iters:
            res = W - B @ A
    return res, packed, state, A, B


def loftq(W, r, iters=1, blocksize=64, scaling=1.0, double_quant=False):
    """LoftQ's alternation on one weight W (out, in), float32: returns (packed, state, A, B) with the
    NF4 base (packed, state: lk.quantize_nf4's, without double quantization by default, as peft's
    loftq_init) and A (r, in), B (out, r), so that dequantize_nf4(packed, state) + scaling * B @ A
    is close to W."""
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling!r}")
    _, packed, state, A, B = alternate(W, r, iters, blocksize, double_quant)
    return (packed, state) + split_scaling(A, B, scaling)


def split_scaling(A, B, scaling):
    """A and B divided by sqrt(scaling) each, so that scaling * B A is the B A that was fitted."""
    if scaling == 1.0:
        return A, B
    root = math.sqrt(scaling)
    return A / root, B / root


def errors(W, r, iters=1, blocksize=64):
    """(||W - Q||, ||W - (Q + B A)||) in the Frobenius norm: QLoRA's start against LoftQ's, with Q
    the plain NF4 weight in the first and LoftQ's own base in the second."""
    W = W.detach().float()
    plain = dequantize_nf4(*quantize_nf4(W, blocksize))
    packed, state, A, B = loftq(W, r, iters, blocksize)      # (its first round quantizes W again: kept simple)
    return torch.linalg.norm(W - plain).item(), torch.linalg.norm(W - dequantize_nf4(packed, state) - B @ A).item()
