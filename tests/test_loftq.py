"""LoftQ from scratch (labkit/loftq.py, chapter 10) against peft's loftq_init on the same weights:
the NF4 base, A and B equal to the bit. Both sides run the same float32 operations on the same
machine on the same inputs (labkit's NF4 is byte-identical to bitsandbytes', which peft calls), so
any difference means one side changed what it computes."""
import inspect

import pytest
import torch

from conftest import require
from labkit import loftq, quant

require("bitsandbytes")
loftq_utils = require("peft.utils.loftq_utils")

# peft's loftq_init sends the weight to CUDA or XPU ("compute_device"), so on a CPU-only torch it
# raises "Torch not compiled with CUDA enabled". The test runs peft's own function with only that
# line changed to the CPU; if peft rewrites the line, the test fails here instead of testing less.
DEVICE_LINE = '    compute_device = "xpu" if is_xpu_available() else "cuda"\n'


def peft_loftq_on_cpu():
    source = inspect.getsource(loftq_utils.loftq_init)
    assert DEVICE_LINE in source, "peft's loftq_init no longer picks its device in the line this test replaces"
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(DEVICE_LINE, '    compute_device = "cpu"\n'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g) * 0.02
    return W + 0.05 * torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)   # some structure


@pytest.mark.parametrize("shape,r,iters", [((192, 128), 8, 1), ((192, 128), 8, 5), ((96, 256), 1, 2), ((128, 64), 16, 3)])
def test_loftq_equals_peft_to_the_bit(shape, r, iters):
    W = weight(shape, seed=r + iters)
    q_peft, A_peft, B_peft = peft_loftq_on_cpu()(W.clone(), num_bits=4, reduced_rank=r, num_iter=iters)
    packed, state, A, B = loftq.loftq(W, r, iters)
    assert torch.equal(quant.dequantize_nf4(packed, state), q_peft)
    assert A.shape == (r, shape[1]) and B.shape == (shape[0], r)
    assert torch.equal(A, A_peft) and torch.equal(B, B_peft)


def test_loftq_starts_closer_to_w_than_the_plain_nf4_base():
    W = weight((256, 192), seed=0)
    plain, one = loftq.errors(W, 8, iters=1)
    _, five = loftq.errors(W, 8, iters=5)
    _, wide = loftq.errors(W, 32, iters=1)
    assert one < plain and five <= one * (1 + 1e-6) and wide < one
    packed, state, A, B = loftq.loftq(W, 8, iters=1)                   # one round: the plain base, then its error's SVD
    assert torch.equal(packed, quant.quantize_nf4(W)[0])


@pytest.mark.parametrize("bad,match", [(dict(r=0), "rank"), (dict(r=65), "rank"), (dict(iters=0), "iters"),
                                       (dict(iters=1.5), "iters")])
def test_loftq_refuses_bad_settings(bad, match):
    settings = dict(r=8, iters=1) | bad
    with pytest.raises(ValueError, match=match):
        loftq.loftq(weight((64, 64), seed=1), **settings)
    with pytest.raises(ValueError, match="one weight matrix"):
        loftq.loftq(torch.zeros(2, 64, 64), 8)
