"""PiSSA from scratch (chapter 10): train the principal directions, quantize the rest.

LoRA starts from B = 0 and a random A, so it starts by learning directions. PiSSA (Meng et al.,
NeurIPS 2024) starts the adapter on the directions W already has, its top r singular triplets, and
leaves the base only what is left:

    W = U S V^T                          (chapter 1's SVD)
    B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T     so that s B A = U_r S_r V_r^T
    W_res = W - s B A                    the base the adapter sits on (s: LoRA's scaling)

At the start the model computes W_res x + s B A x = W x, the same model. Under QLoRA only W_res is
quantized (NF4(W_res)): its largest directions are gone, so its blocks' absmax are smaller and so
is its rounding error, while the principal part stays in fp32 in A and B.

peft does the same in `LoraLayer.pissa_init` (peft/tuners/lora/layer.py); this follows its order of
operations, so A, B and W_res are equal to the bit (tests/test_pissa.py). peft refuses a 4-bit base
("initialize PiSSA under float32 ... re-quantize the residual"): pissa_nf4 below is that route.
"""
import torch

from .loftq import check_weight
from .quant import quantize_nf4


def pissa(W, r, scaling=1.0):
    """PiSSA's start on one weight W (out, in): returns (A (r, in), B (out, r), W_res (out, in)), all
    float32, with W_res + scaling * B @ A equal to W up to rounding."""
    check_weight(W, r, "PiSSA")
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling!r}")
    W = W.detach().float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    A = torch.diag(torch.sqrt(Sr)) @ Vhr                      # (r, in)
    B = Ur @ torch.diag(torch.sqrt(Sr))                       # (out, r)
    return A, B, W - scaling * B @ A


def pissa_nf4(W, r, scaling=1.0, blocksize=64, double_quant=False):
    """QLoRA with PiSSA's start: (packed, state, A, B), the NF4 base being W_res's (lk.quantize_nf4)."""
    A, B, res = pissa(W, r, scaling)
    packed, state = quantize_nf4(res, blocksize, double_quant)
    return packed, state, A, B
