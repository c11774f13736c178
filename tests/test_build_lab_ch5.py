"""Chapter 5's Build-it lab: check_nf4_matmul accepts a right 4-bit matmul written another way
than labkit's, refuses the typical mistakes with a message that says which, and reports the
unattempted skeleton."""
import pytest
import torch

from labkit import exercises as ex
from labkit.quant import dequantize_nf4


class Right(torch.autograd.Function):
    """Written unlike labkit's _NF4Linear: matmul and einsum, the packed bytes saved through ctx."""

    @staticmethod
    def forward(ctx, x, packed, state):
        ctx.save_for_backward(packed)
        ctx.state = state
        return torch.einsum("...i,oi->...o", x, dequantize_nf4(packed, state))

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return torch.matmul(grad_y, dequantize_nf4(packed, ctx.state)), None, None


class SavesW(torch.autograd.Function):                     # the dequantized weight kept for backward
    @staticmethod
    def forward(ctx, x, packed, state):
        W = dequantize_nf4(packed, state)
        ctx.save_for_backward(W)
        return x @ W.T

    @staticmethod
    def backward(ctx, grad_y):
        (W,) = ctx.saved_tensors
        return grad_y @ W, None, None


class KeepsWOnCtx(SavesW):                                  # the same, hidden in a ctx attribute
    @staticmethod
    def forward(ctx, x, packed, state):
        ctx.W = dequantize_nf4(packed, state)
        return x @ ctx.W.T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.W, None, None


class TransposedBackward(Right):                            # grad_y W^T: a square layer runs, with wrong values
    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return grad_y @ dequantize_nf4(packed, ctx.state).T, None, None


class NoInputGradient(Right):                               # "the base is frozen, so no gradient": but x needs one
    @staticmethod
    def backward(ctx, grad_y):
        return None, None, None


class WrongCount(Right):                                    # one gradient for three inputs
    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return grad_y @ dequantize_nf4(packed, ctx.state)


class NotTransposed(Right):                                 # x W instead of x W^T
    @staticmethod
    def forward(ctx, x, packed, state):
        ctx.save_for_backward(packed)
        ctx.state = state
        return x @ dequantize_nf4(packed, state)


class CodesNotScaled(Right):                                # the codebook values without the block's absmax
    @staticmethod
    def forward(ctx, x, packed, state):
        from labkit.quant import unpack_nibbles
        ctx.save_for_backward(packed)
        ctx.state = state
        W = state.code[unpack_nibbles(packed)[: state.n].long()].reshape(state.shape)
        return x @ W.T


class Skeleton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_y):
        raise NotImplementedError


def test_a_right_implementation_written_another_way_passes(capsys):
    ex.check_nf4_matmul(Right)
    assert "✓" in capsys.readouterr().out


def test_the_skeleton_is_reported_not_attempted(capsys):
    ex.check_nf4_matmul(Skeleton)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (SavesW, "your forward kept 16,384 bytes for backward, as much as W in 16 bits"),
    (KeepsWOnCtx, "float tensor as large as W"),
    (TransposedBackward, "layer 0: your backward's gradient of x is wrong: .* the first at index.*not grad_y W\\^T"),
    (NoInputGradient, "layer 0: your backward returned None as the gradient of x"),
    (WrongCount, "layer 0: your backward failed.*one gradient per input"),
    (NotTransposed, "output differs from bitsandbytes \\+ peft.*not x W\\?"),
    (CodesNotScaled, "output differs from bitsandbytes \\+ peft: .* the first at index"),
])
def test_typical_mistakes_are_refused_with_what_is_wrong(wrong, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_nf4_matmul(wrong)
