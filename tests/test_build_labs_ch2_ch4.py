"""The "Build it" labs of chapters 2 and 4: each checker passes a right implementation written
differently from labkit's, refuses the typical mistakes with a message that names them, and
reports a skeleton (NotImplementedError) as not attempted.

Chapter 2: lk.exercises.check_lora_linear, against peft's lora.Linear (outputs and gradients to
1e-5, merged weights to 1e-6). Chapter 4: lk.exercises.check_nf4_blockwise, against bitsandbytes'
quantize_4bit (bytes and absmax identical) and its dequantize formula (1e-6 x absmax).
"""
import math

import pytest
import torch
import torch.nn as nn

import labkit as lk
from conftest import require
from labkit import exercises as ex

require("peft")
bnbF = require("bitsandbytes.functional")


def todo(*args):
    raise NotImplementedError


# Chapter 2 ----------------------------------------------------------------------------------

class EinsumLoRA(nn.Module):
    """A right LoRA layer, written unlike labkit's: einsum products, A ~ N(0, 0.01²), the base frozen
    parameter by parameter, merge through a helper."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad = False
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r
        self.merged = False

    def update(self, x):
        return self.scaling * torch.einsum("...i,ri,or->...o", x, self.lora_A, self.lora_B)

    def delta(self):
        return self.scaling * torch.einsum("or,ri->oi", self.lora_B, self.lora_A)

    def forward(self, x):
        h = self.base(x)
        return h if self.merged else h + self.update(x)

    @torch.no_grad()
    def merge(self):
        self.base.weight += self.delta()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.base.weight -= self.delta()
        self.merged = False


class NoScaling(EinsumLoRA):
    def update(self, x):
        return torch.einsum("...i,ri,or->...o", x, self.lora_A, self.lora_B)


class RandomB(EinsumLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))


class ZeroA(EinsumLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        nn.init.zeros_(self.lora_A)


class TransposedA(EinsumLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.lora_A = nn.Parameter(torch.randn(base.in_features, r) * 0.01)


class ScalingAlpha(EinsumLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.scaling = alpha


class BaseNotFrozen(EinsumLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        base.requires_grad_(True)


class DetachedA(EinsumLoRA):
    def update(self, x):
        return self.scaling * torch.einsum("...i,ri,or->...o", x, self.lora_A.detach(), self.lora_B)


class MergeWithoutScaling(EinsumLoRA):
    @torch.no_grad()
    def merge(self):
        self.base.weight += self.lora_B @ self.lora_A
        self.merged = True


class MergeWithoutFlag(EinsumLoRA):
    @torch.no_grad()
    def merge(self):
        self.base.weight += self.delta()


class UnmergeForgetsW0(EinsumLoRA):
    def unmerge(self):
        self.merged = False


class UnmergeForgetsFlag(EinsumLoRA):
    @torch.no_grad()
    def unmerge(self):
        self.base.weight -= self.delta()


class Skeleton(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        raise NotImplementedError


class NoMergeYet(EinsumLoRA):
    def merge(self):
        raise NotImplementedError


def test_lora_checker_passes_right_layers(capsys):
    ex.check_lora_linear(EinsumLoRA)
    assert "✓ your LoRA layer matches peft's lora.Linear on 3 hidden cases" in capsys.readouterr().out
    ex.check_lora_linear(lambda base, r, alpha: lk.LoRALinear(base, r, alpha))      # labkit's own
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("cls, message", [
    (NoScaling, r"0\.5 times peft's: multiply it by scaling = alpha / r = 2"),
    (RandomB, r"lora_B starts at max \|B\| = .*, not 0"),
    (ZeroA, "lora_A is all zeros"),
    (TransposedA, r"lora_A has shape \(16, 4\), transposed: expected \(4, 16\)"),
    (ScalingAlpha, r"scaling is 8; expected alpha / r = 8 / 4 = 2"),
    (BaseNotFrozen, r"these parameters train too: \['base.weight', 'base.bias'\]"),
    (DetachedA, "lora_A received no gradient"),
    (MergeWithoutScaling, "merge\\(\\) added B @ A without the scaling"),
    (MergeWithoutFlag, "after merge\\(\\) your forward adds scaling \\* B A x a second time"),
    (UnmergeForgetsW0, "unmerge\\(\\) did not restore W0 \\(the weight is still the merged one\\)"),
    (UnmergeForgetsFlag, "after unmerge\\(\\) W0 is back, but your output is wrong \\(it is W0 x \\+ b alone\\)"),
])
def test_lora_checker_names_each_mistake(cls, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_lora_linear(cls)


def test_lora_checker_reports_skeletons(capsys):
    ex.check_lora_linear(Skeleton)
    assert capsys.readouterr().out.startswith("… your LoRA layer: not attempted yet")
    ex.check_lora_linear(NoMergeYet)                         # forward done, merge not yet: both said
    out = capsys.readouterr().out
    assert "✓ your layer starts at W0 and matches peft's outputs and gradients" in out
    assert "… merge() and unmerge(): not attempted yet" in out


def test_lora_checker_first_wrong_element_is_named():
    class OffByOne(EinsumLoRA):                              # a bias added twice: not a scaled update
        def forward(self, x):
            return super().forward(x) + (self.base.bias if self.base.bias is not None else 0)
    with pytest.raises(AssertionError, match=r"the first at index \[0, 0\]: yours .*, expected"):
        ex.check_lora_linear(OffByOne)


# Chapter 4 ----------------------------------------------------------------------------------

CODE = lk.nf4_codebook()


def quantize_loop(w, blocksize=64):
    """Right, and unlike labkit's: a Python loop over blocks, division (not a reciprocal), argmin of
    the distance to each code (not bucketize on midpoints), packing by arithmetic."""
    flat = w.reshape(-1).float()
    if flat.numel() % blocksize:
        raise ValueError(f"{flat.numel()} values is not a multiple of the block size {blocksize}")
    idx, absmax = [], []
    for block in flat.split(blocksize):
        a = block.abs().max()
        absmax.append(a)
        idx.append((block / a)[:, None].sub(CODE).abs().argmin(dim=1))
    idx = torch.cat(idx)
    return (idx[0::2] * 16 + idx[1::2]).to(torch.uint8), torch.stack(absmax)


def dequantize_loop(packed, absmax, shape, blocksize=64):
    idx = torch.stack([packed // 16, packed % 16], dim=1).reshape(-1).long()
    return (CODE[idx].view(-1, blocksize) * absmax[:, None]).reshape(shape)


def quantize_variant(per_row=False, no_divide=False, uniform=False, swap=False, refuse=True):
    def quantize(w, blocksize=64):
        flat = w.reshape(-1).float()
        if refuse and flat.numel() % blocksize:
            raise ValueError(f"{flat.numel()} values, blocksize {blocksize}")
        blocks = w.reshape(w.shape[0], -1) if per_row else flat.view(-1, blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        scaled = blocks if no_divide else blocks / absmax
        if uniform:
            idx = ((scaled + 1) * 7.5).round().clamp(0, 15)
        else:
            idx = (scaled[..., None] - CODE).abs().argmin(dim=-1)
        idx = idx.reshape(-1).to(torch.uint8)
        packed = (idx[0::2] | (idx[1::2] << 4)) if swap else ((idx[0::2] << 4) | idx[1::2])
        return packed, absmax.reshape(-1)
    return quantize


def test_nf4_checker_passes_right_implementations(capsys):
    ex.check_nf4_blockwise(quantize_loop, dequantize_loop)
    assert "✓ blockwise NF4: bytes and absmax identical to bitsandbytes' quantize_4bit on 4 hidden cases" \
        in capsys.readouterr().out
    ex.check_nf4_blockwise(quantize_variant(), dequantize_loop)          # vectorised, bnb-shaped too
    assert "✓" in capsys.readouterr().out

    def labkit_quantize(w, blocksize=64):                               # labkit's own, (n // 2, 1) bytes
        if w.numel() % blocksize:
            raise ValueError(f"size {w.numel()} is not a multiple of {blocksize}")
        packed, state = lk.quant.quantize_nf4(w, blocksize)
        return packed, state.absmax
    ex.check_nf4_blockwise(labkit_quantize, dequantize_loop)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("quantize, message", [
    (quantize_variant(swap=True), "your nibbles are in the wrong order: element 2j .* goes in the HIGH nibble"),
    (quantize_variant(per_row=True), r"absmax has 8 values, expected 16 = 1024 / 64, one per block \(one per row\?"),
    (quantize_variant(uniform=True), "your codes are evenly spaced levels"),
    (quantize_variant(no_divide=True), "you rounded w itself, not w / absmax"),
    (quantize_variant(refuse=False), "for a tensor of 100 values at blocksize 64 your code raised RuntimeError"),
    (lambda w, bs=64: (torch.zeros(w.numel() // 2, dtype=torch.uint8) + 0x77, torch.ones(w.numel() // bs)),
     r"absmax of block 0 \(elements 0 to 63 of w.reshape\(-1\)\) is 1, expected"),
    (lambda w, bs=64: (lambda p, a: (p.to(torch.int64), a))(*quantize_loop(w, bs)),
     "packed is torch.int64, expected torch.uint8"),
    (lambda w, bs=64: (lambda p, a: (p, a.double()))(*quantize_loop(w, bs)), "absmax is torch.float64, expected"),
    (lambda w, bs=64: (torch.zeros(w.numel(), dtype=torch.uint8), quantize_loop(w, bs)[1]),
     "one code per byte: pack two 4-bit codes in each byte"),
])
def test_nf4_checker_names_each_quantize_mistake(quantize, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_nf4_blockwise(quantize, dequantize_loop)


def test_nf4_checker_names_the_first_wrong_code():
    def floor_at_zero(w, blocksize=64):                                  # code 7 wherever the nearest is 8
        packed, absmax = quantize_loop(w, blocksize)
        idx = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)
        idx = torch.where(idx == 8, 7, idx).to(torch.uint8)
        return (idx[0::2] << 4) | idx[1::2], absmax
    with pytest.raises(AssertionError, match=r"codes differ; the first is element \d+ of the flattened tensor: "
                                             r"w = .*, you stored code 7 \(0.0000\), the nearest NF4 value is code 8"):
        ex.check_nf4_blockwise(floor_at_zero, dequantize_loop)


def test_nf4_checker_refusal_must_be_a_clear_value_error():
    def pads(w, blocksize=64):                                           # pads quietly, as bitsandbytes does
        flat = w.reshape(-1)
        return quantize_loop(torch.cat([flat, flat.new_zeros((-flat.numel()) % blocksize)]), blocksize)
    with pytest.raises(AssertionError, match="not a multiple\\) you returned tuple: raise ValueError"):
        ex.check_nf4_blockwise(pads, dequantize_loop)

    def vague(w, blocksize=64):
        if w.numel() % blocksize:
            raise ValueError("bad size")
        return quantize_loop(w, blocksize)
    with pytest.raises(AssertionError, match="your ValueError says 'bad size': say the size \\(100\\)"):
        ex.check_nf4_blockwise(vague, dequantize_loop)


@pytest.mark.parametrize("dequantize, message", [
    (lambda p, a, shape, bs=64: dequantize_loop(p, torch.ones_like(a), shape, bs),
     "your values are the codes alone, in \\[-1, 1\\]: multiply each by its block's absmax"),
    (lambda p, a, shape, bs=64: dequantize_loop((p << 4) | (p >> 4), a, shape, bs), "you read the low nibble first"),
    (lambda p, a, shape, bs=64: dequantize_loop(p, a, shape, bs).reshape(-1), "dequantize gave shape \\(1024,\\)"),
    (lambda p, a, shape, bs=64: dequantize_loop(p, a, shape, bs).double(), "dequantize gave torch.float64"),
    (lambda p, a, shape, bs=64: dequantize_loop(p, a, shape, bs) * 1.01, "the first at index \\[0, 0\\]"),
])
def test_nf4_checker_names_each_dequantize_mistake(dequantize, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_nf4_blockwise(quantize_loop, dequantize)


def test_nf4_checker_reports_skeletons(capsys):
    ex.check_nf4_blockwise(todo, todo)                      # one line, as chapter 4's skeleton cell saves it
    assert capsys.readouterr().out == ("… blockwise NF4 quantize: not attempted yet (replace the "
                                       "NotImplementedError with your code)\n")
    ex.check_nf4_blockwise(quantize_loop, todo)
    out = capsys.readouterr().out
    assert "✓ quantize: packed bytes and absmax identical to bitsandbytes" in out
    assert "… blockwise NF4 dequantize: not attempted yet" in out


@pytest.mark.parametrize("case", range(len(ex.ch4.NF4_CASES)))
def test_the_nf4_checkers_references_are_bitsandbytes(case):
    """The checker takes bitsandbytes' quantize_4bit as it is (pure torch on every CPU), and decodes
    its bytes in plain torch: equal to labkit's dequantize_nf4 on every case, and to bitsandbytes'
    dequantize_4bit wherever its CPU kernel is right (tests/test_quant.py: not on an even last
    dimension that is not a multiple of the block size, such as (6, 96), on AVX512 CPUs)."""
    w, blocksize = ex.ch4._nf4_case(case)
    shape = tuple(w.shape)
    packed, absmax = ex.ch4._nf4_reference(w, blocksize)
    p_l, s_l = lk.quant.quantize_nf4(w, blocksize)
    assert torch.equal(packed, p_l.reshape(-1)) and torch.equal(absmax, s_l.absmax)
    decoded = ex.ch4._nf4_decode(packed, absmax, w.numel(), blocksize).reshape(shape)
    assert torch.equal(decoded, lk.quant.dequantize_nf4(p_l, s_l))
    p_b, s_b = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    theirs = bnbF.dequantize_4bit(p_b, s_b).reshape(shape)
    if shape[-1] % blocksize == 0 or shape[-1] % 2:
        assert torch.equal(decoded, theirs)


def test_nf4_checker_checks_dequantize_without_quantize(capsys):
    """dequantize is fed bitsandbytes' own bytes, so it is checked before the learner's quantize
    works: a right one is reported ✓ (quantize still to do), a wrong one is refused with its reason."""
    ex.check_nf4_blockwise(todo, dequantize_loop)
    out = capsys.readouterr().out
    assert "✓ dequantize: bitsandbytes' bytes decoded to code[index] x absmax on 4 hidden cases" in out
    assert "… blockwise NF4 quantize: not attempted yet" in out
    assert "✓ blockwise NF4:" not in out


@pytest.mark.parametrize("dequantize, message", [
    (lambda p, a, shape, bs=64: dequantize_loop((p << 4) | (p >> 4), a, shape, bs), "you read the low nibble first"),
    (lambda p, a, shape, bs=64: dequantize_loop(p, torch.ones_like(a), shape, bs), "your values are the codes alone"),
])
def test_nf4_checker_refuses_a_wrong_dequantize_without_quantize(dequantize, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_nf4_blockwise(todo, dequantize)


def test_nf4_checker_reports_both_when_quantize_is_wrong(capsys):
    """A wrong quantize is still raised, after a right dequantize's ✓; with both wrong, both reasons."""
    with pytest.raises(AssertionError, match="your nibbles are in the wrong order"):
        ex.check_nf4_blockwise(quantize_variant(swap=True), dequantize_loop)
    assert "✓ dequantize: bitsandbytes' bytes decoded" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"(?s)your codes are evenly spaced.*\(and dequantize too: .*"
                                             r"your values are the codes alone"):
        ex.check_nf4_blockwise(quantize_variant(uniform=True),
                               lambda p, a, shape, bs=64: dequantize_loop(p, torch.ones_like(a), shape, bs))
