"""The exercise checkers accept right answers, reject wrong ones, and report unattempted ones."""
import math

import pytest
import torch

from labkit import exercises as ex
from labkit.models import tiny_llama


def todo(*args):
    raise NotImplementedError


def test_full_finetune_bytes(capsys):
    ex.check_full_finetune_bytes(lambda n: 16 * n)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="AdamW"):
        ex.check_full_finetune_bytes(lambda n: 12 * n)
    ex.check_full_finetune_bytes(todo)
    assert "not attempted" in capsys.readouterr().out


def test_low_rank_and_savings():
    ex.check_low_rank_approx(lambda W, r: (lambda U, S, Vh: U[:, :r] * S[:r] @ Vh[:r])(*torch.linalg.svd(W, full_matrices=False)))
    with pytest.raises(AssertionError):
        ex.check_low_rank_approx(lambda W, r: W)                       # not rank r
    ex.check_lora_savings(lambda d, k, r: r * (d + k) / (d * k))
    with pytest.raises(AssertionError):
        ex.check_lora_savings(lambda d, k, r: r * d / (d * k))


def test_lora_forward_and_rslora():
    ex.check_lora_forward(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha / r * (x @ A.T @ B.T))
    with pytest.raises(AssertionError, match="alpha / r"):
        ex.check_lora_forward(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + (x @ A.T @ B.T))
    ex.check_rslora_scaling(lambda a, r: a / math.sqrt(r))
    with pytest.raises(AssertionError):
        ex.check_rslora_scaling(lambda a, r: a / r)


def test_trainable_count():
    cfg = tiny_llama().config                                        # hidden 64, kv 32, 2 layers
    ex.check_trainable_count(lambda c, t, r: 2 * r * ((64 + 64) + (64 + 32)), cfg, ["q_proj", "v_proj"], r=4)
    with pytest.raises(AssertionError, match="you counted"):
        ex.check_trainable_count(lambda c, t, r: 2 * r * (64 + 64) * 2, cfg, ["q_proj", "v_proj"], r=4)
