"""Chapter 4 (NF4 quantization): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ._common import _attempt, _ok, _todo, _first_wrong


def check_nf4_codebook(fn):
    """fn() -> the 16 NF4 values (any float dtype), sorted."""
    from ..quant import nf4_codebook
    done, got = _attempt(fn)
    if not done:
        return _todo("NF4 codebook")
    got = torch.as_tensor(got, dtype=torch.float64).reshape(-1)
    assert got.numel() == 16, f"NF4 has 16 values, you gave {got.numel()}"
    err = (got - nf4_codebook().double()).abs().max().item()
    assert err < 1e-6, (f"off by up to {err:.2e}: 8 positive quantiles on linspace(offset, 0.5, 9)[:-1], "
                        "7 negative on linspace(offset, 0.5, 8)[:-1], a zero, then divide by the max")
    _ok(f"your 16 NF4 values match bitsandbytes' table (max difference {err:.1e})")


def check_pack(fn):
    """fn(idx) -> uint8 bytes with idx[2j] in the high nibble and idx[2j+1] in the low one."""
    from ..quant import pack_nibbles
    g = torch.Generator().manual_seed(0)
    for n in (2, 16, 64):
        idx = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        done, got = _attempt(fn, idx)
        if not done:
            return _todo("nibble packing")
        got = torch.as_tensor(got).reshape(-1)
        want = pack_nibbles(idx).reshape(-1)
        assert got.dtype == torch.uint8, f"bytes should be uint8, got {got.dtype}"
        assert torch.equal(got, want), (f"for indices {idx[:4].tolist()}... you gave bytes {got[:2].tolist()}, "
                                        f"expected {want[:2].tolist()}: element 2j goes in the HIGH nibble")
    _ok("two 4-bit codes per byte, in bitsandbytes' order")


def check_bits_per_parameter(fn):
    """fn(blocksize, double_quant) -> bits stored per parameter for NF4 with fp32 absmax
    (and, with double quantization, 8-bit absmax plus an fp32 absmax per 256 of them)."""
    for bs in (64, 128, 256):
        for dq in (False, True):
            done, got = _attempt(fn, bs, dq)
            if not done:
                return _todo("bits per parameter")
            want = 4 + (8 / bs + 32 / (bs * 256) if dq else 32 / bs)
            assert math.isclose(got, want, rel_tol=1e-9), f"blocksize {bs}, double_quant={dq}: got {got}, want {want}"
    _ok("4 + 32/blocksize bits, or 4 + 8/blocksize + 32/(256*blocksize) with double quantization")


# Build it (chapter 4): blockwise NF4, checked against bitsandbytes. The hidden cases: (shape,
# blocksize). Rows of 128 and 96 values are not blocks (so one absmax per row shows), one block holds
# an outlier, and one case asks for blocks of 32.
NF4_CASES = (((8, 128), 64), ((6, 96), 64), ((1024,), 64), ((4, 256), 32))


def _nf4_case(i):
    """The i-th hidden case: (w, blocksize)."""
    shape, blocksize = NF4_CASES[i]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05
    if len(shape) == 1:
        w[3 * blocksize + 5] = 1.0                                   # an outlier: 20 sigma, in block 3
    return w, blocksize


def _nibbles(packed, n):
    flat = packed.reshape(-1).to(torch.uint8)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()


def _nf4_reference(w, blocksize):
    """bitsandbytes' packed bytes (n // 2,) and absmax (n // blocksize,) for w: its quantize_4bit runs
    the same pure-torch code on every CPU (no CPU kernel is registered for it in bitsandbytes 0.50)."""
    import bitsandbytes.functional as bnbF
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    return packed.reshape(-1), state.absmax


def _nf4_decode(packed, absmax, n, blocksize):
    """code[index] * absmax of its block: what bitsandbytes' dequantize_4bit computes (its default,
    pure-torch path; its AVX512 CPU kernel agrees where it is right, see tests/test_quant.py). Decoded
    here rather than by bitsandbytes' kernel, whose CPU path differs between machines and is wrong
    on some shapes (chapter 4, section 6)."""
    from ..quant import nf4_codebook
    return nf4_codebook()[_nibbles(packed, n)] * absmax.float().repeat_interleave(blocksize)[:n]


def _explain_codes(w, got_idx, want_idx, absmax, blocksize):
    """Why the learner's 4-bit codes differ from bitsandbytes': name the likely mistake, and show the
    first wrong element (its value, its value / absmax, the code chosen and the nearest NF4 code)."""
    from ..quant import nf4_codebook
    code = nf4_codebook()
    flat = w.reshape(-1).float()
    scaled = flat / absmax.repeat_interleave(blocksize)
    nearest = lambda v: (v[:, None] - code).abs().argmin(dim=1)
    swapped = want_idx.view(-1, 2).flip(1).reshape(-1)
    guesses = (
        (swapped, "your nibbles are in the wrong order: element 2j of the flattened tensor goes in the HIGH nibble "
                  "(byte >> 4), element 2j + 1 in the low one"),
        (nearest(flat), "you rounded w itself, not w / absmax: divide each value by its block's absmax first, "
                        "so that the block fills [-1, 1]"),
        (((scaled + 1) * 7.5).round().clamp(0, 15).long(),
         "your codes are evenly spaced levels (-1 + 2k/15); NF4's 16 values are not evenly spaced: round to the "
         "nearest of lk.nf4_codebook()"),
        ((torch.searchsorted(code, scaled.contiguous(), right=True) - 1).clamp(0, 15),
         "you took the code just below each value, not the nearest one"),
    )
    for idx, why in guesses:
        if torch.equal(got_idx, idx):
            return why
    i = int((got_idx != want_idx).nonzero()[0])
    return (f"{int((got_idx != want_idx).sum())} of {got_idx.numel()} codes differ; the first is element {i} of "
            f"the flattened tensor: w = {flat[i].item():.5f}, w / absmax = {scaled[i].item():.4f}, you stored code "
            f"{got_idx[i].item()} ({code[got_idx[i]].item():.4f}), the nearest NF4 value is code {want_idx[i].item()} "
            f"({code[want_idx[i]].item():.4f})")


def _check_absmax(absmax, want, shape, blocksize, where):
    absmax = torch.as_tensor(absmax).reshape(-1)
    n, n_blocks = want.numel() * blocksize, want.numel()
    if absmax.numel() != n_blocks:
        rows = math.prod(shape[:-1]) if len(shape) > 1 else None
        why = (" (one per row? a block is blocksize consecutive elements of w.reshape(-1), and may span rows)"
               if absmax.numel() == rows else " (one for the whole tensor? one per block)" if absmax.numel() == 1
               else f" (blocks of {n // absmax.numel()}? this call asked for blocksize={blocksize})"
               if absmax.numel() and n % absmax.numel() == 0 else "")
        raise AssertionError(f"{where}: absmax has {absmax.numel()} values, expected {n_blocks} = {n} / {blocksize}, "
                             f"one per block{why}")
    assert absmax.dtype == torch.float32, \
        f"{where}: absmax is {absmax.dtype}, expected torch.float32 (bitsandbytes' dtype)"
    if not torch.equal(absmax, want):
        b = int((absmax != want).nonzero()[0])
        raise AssertionError(f"{where}: absmax of block {b} (elements {b * blocksize} to {(b + 1) * blocksize - 1} of "
                             f"w.reshape(-1)) is {absmax[b].item():.6g}, expected {want[b].item():.6g}: the largest "
                             "|value| of the block (abs first, then max)")


def _check_refusal(quantize):
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    try:
        got = quantize(w, 64)
    except ValueError as e:
        assert "100" in str(e) and "64" in str(e), (f"for a tensor of 100 values at blocksize 64 your ValueError says "
                                                    f"{str(e)!r}: say the size (100) and the block size (64)")
        return
    except Exception as e:
        raise AssertionError(f"for a tensor of 100 values at blocksize 64 your code raised {type(e).__name__}({e}) "
                             "from inside; check the size first and raise ValueError, with a message that gives the "
                             "size and the block size") from e
    raise AssertionError(f"for a tensor of 100 values at blocksize 64 (not a multiple) you returned "
                         f"{type(got).__name__}: raise ValueError instead, with a message that gives the size and the "
                         "block size (bitsandbytes pads a short last block; this lab leaves that out)")


def _check_nf4_quantize(quantize):
    """True if quantize matches bitsandbytes on every hidden case (and refuses a bad size), False if
    it is not attempted; raises AssertionError naming the first mistake."""
    for i in range(len(NF4_CASES)):
        w, blocksize = _nf4_case(i)
        shape, n = tuple(w.shape), w.numel()
        where = f"w of shape {shape}, blocksize {blocksize}"
        want_packed, want_absmax = _nf4_reference(w, blocksize)
        done, got = _attempt(quantize, w.clone(), blocksize)
        if not done:
            return False
        assert isinstance(got, (tuple, list)) and len(got) == 2, \
            f"{where}: quantize should return (packed, absmax), got {type(got).__name__}"
        packed, absmax = (torch.as_tensor(t) for t in got)
        assert packed.dtype == torch.uint8, f"{where}: packed is {packed.dtype}, expected torch.uint8 (bytes)"
        if packed.numel() == n:
            raise AssertionError(f"{where}: packed has {n} bytes for {n} values, one code per byte: pack two 4-bit "
                                 f"codes in each byte, {n // 2} bytes")
        assert tuple(packed.shape) in ((n // 2,), (n // 2, 1)), \
            f"{where}: packed has shape {tuple(packed.shape)}, expected ({n // 2},): two codes per byte"
        _check_absmax(absmax, want_absmax, shape, blocksize, where)
        if not torch.equal(packed.reshape(-1), want_packed):
            why = _explain_codes(w, _nibbles(packed, n), _nibbles(want_packed, n), want_absmax, blocksize)
            raise AssertionError(f"{where}: your packed bytes differ from bitsandbytes': {why}")
    _check_refusal(quantize)
    return True


def _check_nf4_dequantize(dequantize):
    """True if dequantize decodes bitsandbytes' own bytes and absmax right on every hidden case, False
    if it is not attempted; raises AssertionError naming the first mistake. Needs no quantize of yours."""
    from ..quant import nf4_codebook
    for i in range(len(NF4_CASES)):
        w, blocksize = _nf4_case(i)
        shape, n = tuple(w.shape), w.numel()
        where = f"w of shape {shape}, blocksize {blocksize}"
        want_packed, want_absmax = _nf4_reference(w, blocksize)
        done, out = _attempt(dequantize, want_packed.clone(), want_absmax.clone(), shape, blocksize)
        if not done:
            return False
        want = _nf4_decode(want_packed, want_absmax, n, blocksize).reshape(shape)
        assert isinstance(out, torch.Tensor), f"{where}: dequantize returned {type(out).__name__}, not a tensor"
        assert tuple(out.shape) == tuple(shape), f"{where}: dequantize gave shape {tuple(out.shape)}, expected {shape}"
        assert out.dtype == torch.float32, f"{where}: dequantize gave {out.dtype}, expected torch.float32"
        err = (out - want).abs().reshape(-1)
        if not (err <= 1e-6 * want_absmax.repeat_interleave(blocksize)).all():
            idx, flat = _nibbles(want_packed, n), out.reshape(-1)
            if torch.equal(flat, nf4_codebook()[idx]):
                why = "your values are the codes alone, in [-1, 1]: multiply each by its block's absmax"
            elif torch.equal(flat, _nf4_decode((want_packed << 4) | (want_packed >> 4), want_absmax, n, blocksize)):
                why = "you read the low nibble first: element 2j is in the HIGH nibble (byte >> 4)"
            else:
                why = _first_wrong(out, want, atol=1e-6 * want_absmax.max().item())
            raise AssertionError(f"{where}: dequantize of bitsandbytes' bytes is wrong: {why}")
    return True


def check_nf4_blockwise(quantize, dequantize):
    """Build it, chapter 4. quantize(w, blocksize) -> (packed, absmax): packed uint8 (n // 2,), two
    4-bit NF4 codes per byte (element 2j in the high nibble), absmax float32 (n // blocksize,), one
    per block of consecutive elements of w.reshape(-1); a ValueError when n is not a multiple of
    blocksize. dequantize(packed, absmax, shape, blocksize) -> float32 tensor of `shape`.

    Against bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4"): packed bytes and
    absmax identical (torch.equal). dequantize is fed bitsandbytes' own bytes and absmax and must
    give code[index] * absmax, bitsandbytes' formula, to within 1e-6 x the block's absmax (a float32
    rounding; exact in practice). That reference is decoded in plain torch, not by bitsandbytes' CPU
    kernel, which differs between CPUs; tests/test_build_labs_ch2_ch4.py holds it equal to
    dequantize_4bit on these cases.

    The two are checked independently (dequantize never sees the output of your quantize), and each
    is reported: ✓, not attempted, or an AssertionError that names the mistake. A wrong quantize is
    raised after dequantize's ✓ is printed (or with dequantize's own mistake appended). Full ✓ only
    when both pass; with neither attempted, one line (quantize's) says so."""
    try:
        q_done, q_error = _check_nf4_quantize(quantize), None
    except AssertionError as e:
        q_done, q_error = True, e
    try:
        d_done = _check_nf4_dequantize(dequantize)
    except AssertionError as d_error:
        if q_error is not None:
            raise AssertionError(f"{q_error}\n(and dequantize too: {d_error})") from q_error
        raise
    if q_error is not None:
        if d_done:
            _ok(f"dequantize: bitsandbytes' bytes decoded to code[index] x absmax on {len(NF4_CASES)} hidden cases")
        raise q_error
    if not q_done and not d_done:
        return _todo("blockwise NF4 quantize")
    if not q_done:
        _ok(f"dequantize: bitsandbytes' bytes decoded to code[index] x absmax on {len(NF4_CASES)} hidden cases")
        return _todo("blockwise NF4 quantize")
    if not d_done:
        _ok(f"quantize: packed bytes and absmax identical to bitsandbytes on {len(NF4_CASES)} hidden cases")
        return _todo("blockwise NF4 dequantize")
    return _ok(f"blockwise NF4: bytes and absmax identical to bitsandbytes' quantize_4bit on {len(NF4_CASES)} hidden "
               "cases, dequantized values equal to code[index] x absmax, and a size that is not a multiple of the block "
               "size refused")
