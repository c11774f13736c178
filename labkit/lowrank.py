"""Low-rank tools (chapter 1): SVD, the best rank-r approximation, and what it costs or saves.

Eckart-Young: among all matrices of rank <= r, the truncated SVD W_r = U_r S_r V_r^T is the
closest to W, and its error is the energy of the dropped singular values:
    ||W - W_r||_F = sqrt(s_{r+1}^2 + ... + s_n^2)
"""
import torch

from .session import has_float64


def _float64(W):
    """W, detached, in float64; moved to the CPU first where its device has no float64 (Apple's MPS)."""
    W = W.detach()
    return (W if has_float64(W.device) else W.cpu()).double()


def _check_rank(W, r):
    if W.dim() != 2:
        raise ValueError(f"expected a matrix (2-D tensor), got shape {tuple(W.shape)}")
    n = min(W.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= n:
        raise ValueError(f"rank r must be an integer in [0, {n}] for a {tuple(W.shape)} matrix, got {r!r}")


def singular_values(W):
    """Singular values of W, largest first, computed in float64 (on the CPU for a W on a device
    without float64, Apple's MPS: the values are then on the CPU)."""
    if W.dim() != 2:
        raise ValueError(f"expected a matrix (2-D tensor), got shape {tuple(W.shape)}")
    return torch.linalg.svdvals(_float64(W))


def low_rank_approx(W, r):
    """The best rank-r approximation of W (truncated SVD, computed in float64: on the CPU for a W
    on a device without it), in W's dtype, on W's device."""
    _check_rank(W, r)
    U, S, Vh = torch.linalg.svd(_float64(W), full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(W.device, W.dtype)      # (d, r) diag(r) (r, k) -> (d, k)


def eckart_young_error(S, r):
    """||W - W_r||_F predicted from the singular values alone."""
    return S[r:].pow(2).sum().sqrt().item()


def energy_captured(S, r=None):
    """Fraction of ||W||_F^2 held by the top r singular values (all prefixes if r is None)."""
    cum = S.pow(2).cumsum(0) / S.pow(2).sum()
    return cum if r is None else (cum[r - 1].item() if r > 0 else 0.0)


def rank_for_energy(S, energy=0.9):
    """The smallest r whose top-r singular values hold `energy` of ||W||_F^2."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    cum = energy_captured(S)
    return int((cum < energy - 1e-12).sum().item()) + 1


def effective_rank(S):
    """Roy & Vetterli's entropy effective rank, exp(H(p)) with p = s / sum(s): n for a flat spectrum, 1 for rank 1."""
    p = S / S.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).item()


def lora_param_count(d, k, r):
    """(full, low_rank): d*k parameters of W (d x k) against r*(d + k) of B (d x r) and A (r x k)."""
    return d * k, r * (d + k)
