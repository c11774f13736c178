"""Checkers for the chapters' exercises. Each takes the reader's function or answer, compares it
with labkit's reference on several inputs, and prints what is right or raises with a hint.
A function that still raises NotImplementedError is reported as not attempted (no error)."""
import math

import torch

from . import lowrank
from .lora import count_parameters, inject_lora


def _attempt(fn, *args):
    try:
        return True, fn(*args)
    except NotImplementedError:
        return False, None


def _ok(msg):
    print(f"✓ {msg}")


def _todo(name):
    print(f"… {name}: not attempted yet (replace the NotImplementedError with your code)")


# Chapter 0 ----------------------------------------------------------------------------------

def check_full_finetune_bytes(fn):
    """fn(n_params) -> bytes of weights + gradients + AdamW's two states, all fp32."""
    for n in (1, 135_000_000, 7_000_000_000):
        done, got = _attempt(fn, n)
        if not done:
            return _todo("full fine-tuning bytes")
        want = 16 * n
        assert got == want, (f"for {n:,} parameters you gave {got:,} bytes; expected {want:,}: "
                             "4 bytes each for the weight, its gradient, and AdamW's m and v")
    return _ok("16 bytes per parameter: weight, gradient, and AdamW's m and v in fp32")


# Chapter 1 ----------------------------------------------------------------------------------

def check_low_rank_approx(fn):
    """fn(W, r) -> the best rank-r approximation of W."""
    g = torch.Generator().manual_seed(0)
    for shape, r in (((12, 8), 3), ((30, 50), 1), ((20, 20), 20)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        done, got = _attempt(fn, W, r)
        if not done:
            return _todo("rank-r approximation")
        want = lowrank.low_rank_approx(W, r)
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = (got - want).abs().max().item()
        assert err < 1e-8, f"for a {shape} matrix at r={r} your approximation is off by {err:.2e} (max abs)"
    return _ok("your truncated SVD is the Eckart-Young optimum (to 1e-8)")


def check_lora_savings(fn):
    """fn(d, k, r) -> fraction of W's d*k parameters that B and A need: r*(d+k) / (d*k)."""
    for d, k, r in ((576, 576, 8), (4096, 11008, 16), (10, 10, 5)):
        done, got = _attempt(fn, d, k, r)
        if not done:
            return _todo("LoRA parameter fraction")
        full, low = lowrank.lora_param_count(d, k, r)
        assert math.isclose(got, low / full, rel_tol=1e-9), \
            f"for d={d}, k={k}, r={r} you gave {got}; B (d x r) and A (r x k) hold r*(d+k) = {low:,} of {full:,}"
    return _ok("r*(d+k) / (d*k): the fraction of parameters LoRA trains")


# Chapter 2 ----------------------------------------------------------------------------------

def check_lora_forward(fn):
    """fn(x, W0, b, A, B, alpha, r) -> h = x W0^T + b + (alpha/r) x A^T B^T."""
    g = torch.Generator().manual_seed(0)
    for batch, d_in, d_out, r, alpha in (((3,), 8, 6, 2, 4.0), ((2, 5), 16, 12, 4, 8.0)):
        x = torch.randn(*batch, d_in, generator=g)
        W0, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
        A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        done, got = _attempt(fn, x, W0, b, A, B, alpha, r)
        if not done:
            return _todo("LoRA forward")
        want = x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"off by {err:.2e}: is the update scaled by alpha / r, and are A, B transposed?"
    return _ok("h = W0 x + b + (alpha/r) B A x, for batched inputs too")


def check_rslora_scaling(fn):
    """fn(alpha, r) -> rsLoRA's scaling alpha / sqrt(r)."""
    for alpha, r in ((16, 16), (8, 2), (1, 64)):
        done, got = _attempt(fn, alpha, r)
        if not done:
            return _todo("rsLoRA scaling")
        assert math.isclose(got, alpha / math.sqrt(r)), f"for alpha={alpha}, r={r}: got {got}, want alpha/sqrt(r)"
    return _ok("rsLoRA scales by alpha / sqrt(r)")


# Chapter 3 ----------------------------------------------------------------------------------

def check_trainable_count(fn, config, targets, r):
    """fn(config, targets, r) -> the LoRA parameters for `targets` in a model of this config.
    The reference injects into a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM
    done, got = _attempt(fn, config, targets, r)
    if not done:
        return _todo("trainable parameter count")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = count_parameters(inject_lora(model, targets, r=r, alpha=2 * r))[0]
    assert got == want, f"you counted {got:,}; injecting into {targets} at r={r} gives {want:,}"
    return _ok(f"{want:,} trainable parameters for {targets} at r={r}")
