"""Chapter 1 (low-rank mathematics): the checkers of its exercises and its Build-it lab."""
import math

import torch

from .. import lowrank
from ._common import _attempt, _ok, _todo


def check_low_rank_approx(fn):
    """fn(W, r) -> W_r, the best rank-r approximation of W (d x k, float64): the top r singular
    triplets of its SVD, W_r = U[:, :r] diag(s[:r]) Vh[:r, :]. Checked to 1e-8 (max abs) against
    labkit's truncated SVD on matrices you do not see, square and not, with a diagnosis when wrong."""
    g = torch.Generator().manual_seed(0)
    for shape, r in (((12, 8), 3), ((30, 50), 1), ((20, 20), 20), ((40, 16), 5)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        done, got = _attempt(fn, W.clone(), r)
        if not done:
            return _todo("rank-r approximation")
        want = lowrank.low_rank_approx(W, r)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, (
            f"for a {shape} matrix you returned {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}, "
            f"expected {tuple(want.shape)}: W_r has W's shape")
        assert got.dtype == W.dtype, f"you returned {got.dtype} for a {W.dtype} matrix: keep W's dtype"
        err = (got - want).abs().max().item()
        if err < 1e-8:
            continue
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        rank = int(torch.linalg.matrix_rank(got, rtol=1e-5).item())       # float32 round-off is not rank
        hints = [(rank > r, f"your matrix has rank {rank}, more than r = {r}: keep only r singular triplets"),
                 ((got - U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]).abs().max() < 1e-8,
                  "you kept the r SMALLEST singular values: torch.linalg.svd returns them largest first"),
                 ((got - U[:, :r] @ Vh[:r]).abs().max() < 1e-8, "the singular values are missing: U_r diag(s_r) Vh_r"),
                 (err < 1e-4, "close, but not to 1e-8: compute in W's dtype (float64 here), not float32")]
        hint = next((h for cond, h in hints if cond), "the top-r triplets of torch.linalg.svd(W, full_matrices=False)")
        raise AssertionError(f"for a {shape} matrix at r={r} your approximation is off by {err:.2e} (max abs): {hint}")
    return _ok("your truncated SVD is the Eckart-Young optimum (to 1e-8)")


def check_eckart_young_error(fn):
    """fn(S, r) -> ||W - W_r||_F predicted from the singular values S alone (1-D, largest first):
    sqrt(s_{r+1}^2 + ... + s_n^2). Checked to 1e-9 relative, against the error of the truncated SVD
    measured on the matrix itself, with a diagnosis when wrong."""
    g = torch.Generator().manual_seed(1)
    for shape, r in (((12, 8), 3), ((30, 50), 1), ((20, 20), 20), ((16, 40), 0), ((9, 9), 8)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        S = lowrank.singular_values(W)
        done, got = _attempt(fn, S.clone(), r)
        if not done:
            return _todo("the Eckart-Young error")
        want = torch.linalg.norm(W - lowrank.low_rank_approx(W, r)).item()     # measured, not a formula
        got = float(got)
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9):
            continue
        dropped = S[r:]
        near = lambda x: math.isclose(got, float(x), rel_tol=1e-9, abs_tol=1e-9)   # noqa: E731
        hints = [(near(dropped.pow(2).sum()), "that is the squared error: take the square root"),
                 (near(dropped.sum()), "the singular values must be squared before they are added (energy is s^2)"),
                 (near(S[:r].pow(2).sum().sqrt()), "that is what the approximation keeps: the error is what it drops"),
                 (near(S[r + 1:].pow(2).sum().sqrt()) or (r > 0 and near(S[r - 1:].pow(2).sum().sqrt())),
                  "off by one: the dropped values are s_{r+1} ... s_n, that is S[r:] in Python")]
        hint = next((h for cond, h in hints if cond), "sqrt of the sum of the squared singular values after the r-th")
        raise AssertionError(f"for a {shape} matrix at r={r} you predicted {got:.6g}; the truncated SVD's error "
                             f"is {want:.6g}: {hint}")
    return _ok("your prediction from the singular values alone equals the measured error (Eckart-Young)")


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
