"""4-bit quantization from scratch (chapter 4): NF4, blockwise absmax, packing, double quantization.

    w  ->  blocks of `blocksize` values  ->  each block scaled by 1 / absmax into [-1, 1]
       ->  each value rounded to the nearest of 16 codes  ->  two 4-bit indices per byte

Every step matches bitsandbytes (`quantize_4bit(..., quant_type="nf4")`) byte for byte; the tests
in tests/test_quant.py check the packed bytes, the absmax values and the dequantized tensors.
"""
import collections
from dataclasses import dataclass
from typing import Optional

import torch

from . import nf4_cpu

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NF4_OFFSET = 0.9677083          # bitsandbytes' choice: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


# --------------------------------------------------------------------------------------------
# The codebooks

def nf4_codebook():
    """The 16 NF4 values, built as bitsandbytes builds them (`create_normal_map`): 8 positive
    quantiles of N(0, 1) and 7 negative ones on an evenly spaced probability grid, an exact zero,
    then scaled so the largest is 1. bitsandbytes makes the grid and the scaling in float32 (the
    quantiles themselves in float64); doing the same gives its table to the last bit."""
    Q = lambda p: torch.special.ndtri(p.double())                       # the normal quantile function
    pos = Q(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1])                    # 8 values, largest first
    neg = -Q(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1])                   # 7 values
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


def nf4_codebook_paper():
    """NF4 following the QLoRA paper's Eq. 4 literally: each code is the mean of two neighbouring
    quantiles, q_i = (Q(p_i) + Q(p_{i+1})) / 2, on the same probability grid per half (the offset
    keeps Q finite at the ends), with the zero kept exact; then scaled into [-1, 1]."""
    Q = lambda p: torch.special.ndtri(p)
    p_pos = torch.linspace(0.5, NF4_OFFSET, 9, dtype=torch.float64)
    p_neg = torch.linspace(0.5, NF4_OFFSET, 8, dtype=torch.float64)
    pos = (Q(p_pos[:-1]) + Q(p_pos[1:])) / 2                               # 8 values
    neg = -(Q(p_neg[:-1]) + Q(p_neg[1:])) / 2                              # 7 values
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def fp4_codebook():
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) values, sorted, scaled into [-1, 1].
    Its +0 and -0 are the same number, so it has 15 distinct values."""
    mags = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float64) / 12
    return torch.cat([mags, -mags]).unique().sort().values.float()


def int4_codebook():
    """Plain symmetric int4 with absmax scaling: the 15 levels k/7, k = -7..7."""
    return (torch.arange(-7, 8, dtype=torch.float64) / 7).float()


# --------------------------------------------------------------------------------------------
# Blockwise absmax quantization to any sorted 16-value codebook

def _check_tensor(w, blocksize):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"can only quantize floating-point tensors, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def block_absmax(flat, blocksize):
    """absmax of each block of a flat tensor (the last block may be shorter), and the values
    scaled into [-1, 1] by it, exactly as bitsandbytes scales them."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)                             # (n_blocks, blocksize)
    absmax = blocks.abs().max(dim=1).values
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:                                                            # the short last block
        tail = flat[full:]
        am = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, (tail / am).clamp(-1, 1)])             # divided, as bnb does
    return scaled, absmax


def round_to_code(scaled, code):
    """Index of the nearest code for each value; a value exactly half-way goes to the lower code."""
    midpoints = (code[:-1] + code[1:]) / 2                                  # 15 thresholds
    return torch.bucketize(scaled, midpoints)                               # x <= t -> lower code


def pack_nibbles(idx):
    """Two 4-bit indices per byte: element 2j in the high nibble, 2j+1 in the low one.
    An odd count is padded with the index of 0.0, as bitsandbytes pads (its code 7)."""
    idx = idx.to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, torch.full((1,), 7, dtype=torch.uint8, device=idx.device)])
    return ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)                      # ((n+1)//2, 1)


def unpack_nibbles(packed):
    """The inverse of pack_nibbles: the 4-bit indices, high nibble first (2 per byte)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)        # (2 * bytes,)


def code_values(packed, code):
    """Each stored weight's value in [-1, 1]: its index looked up in the codebook. This is the
    whole decode; dequantize_plain uses it, and dequantize_nf4 gets the same values faster."""
    return code[unpack_nibbles(packed).long()]


# --------------------------------------------------------------------------------------------
# Double quantization: the absmax constants, quantized again to 8 bits

def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 7 decades of exponent, a
    fraction whose resolution grows with the exponent, 0 and 1: 256 sorted values in [-0.993, 1]."""
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)


def quantize_blockwise_8bit(x, code, blocksize=256):
    """Blockwise absmax quantization of a flat float32 tensor to the 256-value `code`: the nearest
    value, ties to the lower one. Returns (uint8 indices, absmax per block).

    bitsandbytes' compiled CPU kernel agrees except for about 0.1% of values that lie within about
    1e-5 of a midpoint between two codes, where it sometimes takes the other neighbour (measured
    in tests/test_quant.py); the dequantized constants then differ by one 8-bit step."""
    n = x.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([x, x.new_zeros(pad)]).reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=1).values
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)
    right = (left + 1).clamp(max=255)
    go_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    idx = torch.where(go_right, right, left)
    idx = torch.where(normed.isnan(), 0, idx)        # an all-zero block (0/0): bnb lands on index 0
    return idx.to(torch.uint8), absmax


def dequantize_blockwise_8bit(q, absmax, code, blocksize=256):
    out = code.to(q.device).index_select(0, q.reshape(-1).int())             # a new tensor
    full = out.numel() - out.numel() % blocksize
    out[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])   # x its block's absmax
    out[full:].mul_(absmax[-1])                                              # the short last block
    return out


# --------------------------------------------------------------------------------------------
# The public API: quantize_nf4 / dequantize_nf4

@dataclass
class QuantState4:
    """What it takes to read packed 4-bit data back: shape, dtype, block size, the codebook, and the
    absmax of every block (or, with double quantization, those quantized again)."""
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor                        # (16,) float32
    absmax: torch.Tensor                      # (n_blocks,) float32, or uint8 with double quantization
    offset: Optional[torch.Tensor] = None     # double quantization: the mean subtracted from absmax
    absmax2: Optional[torch.Tensor] = None    # double quantization: absmax of each block of 256 absmax
    code2: Optional[torch.Tensor] = None      # double quantization: the 8-bit dynamic map
    blocksize2: int = 256
    code_name: Optional[str] = None           # "nf4" for nf4_codebook(): names the decode table, no need to read `code`

    @property
    def double_quant(self):
        return self.offset is not None

    @property
    def n(self):
        return int(torch.Size(self.shape).numel())

    def block_absmax(self):
        """The absmax of every block, as float32 (dequantized first under double quantization)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2, self.code2, self.blocksize2) + self.offset

    def nbytes(self):
        """Bytes stored for this tensor's constants (not counting the shared codebooks)."""
        extra = [self.absmax] + ([self.absmax2, self.offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in extra)


def quantize_4bit(w, code, blocksize=64, double_quant=False):
    """Quantize `w` to a 16-value codebook in blocks: returns (packed uint8 ((n+1)//2, 1), state)."""
    _check_tensor(w, blocksize)
    flat = w.detach().reshape(-1).float()
    code = code.to(flat.device, torch.float32)         # a float64 codebook (numpy's default) is read as float32
    if code.dim() != 1 or not 2 <= code.numel() <= 16 or not bool((code[1:] > code[:-1]).all()):
        raise ValueError(f"the codebook must hold 2 to 16 values in increasing order (rounding finds a value's "
                         f"code between its sorted neighbours), got {code.tolist()}")
    # pack_nibbles(round_to_code(*block_absmax(flat, blocksize))) in one pass: compiled on the CPU
    # (labkit/nf4_cpu.py), a chunk at a time in torch elsewhere (tests/test_quant.py holds both
    # equal to the plain steps, byte for byte)
    packed, absmax = _quantize_fast(flat, code, blocksize)
    if not torch.isfinite(absmax).all():               # a block's absmax is NaN or inf exactly when one of its values is
        raise ValueError("the tensor holds NaN or inf values: absmax scaling would spread them over a whole block")
    state = QuantState4(w.shape, w.dtype, blocksize, code, absmax)
    if double_quant:
        state.offset = absmax.mean()
        state.code2 = dynamic_map().to(flat.device)
        state.absmax, state.absmax2 = quantize_blockwise_8bit(absmax - state.offset, state.code2, state.blocksize2)
    return packed, state


def quantize_nf4(w, blocksize=64, double_quant=False):
    """Quantize `w` to NF4, bitsandbytes' way: returns (packed uint8 of shape ((n+1)//2, 1), state)."""
    packed, state = quantize_4bit(w, nf4_codebook(), blocksize, double_quant)
    state.code_name = "nf4"
    return packed, state


def dequantize_nf4(packed, state):
    """Read packed 4-bit data back into a tensor of the original shape and dtype."""
    n = check_state(packed, state)
    # dequantize_plain's two steps (each index looked up in the codebook, each block times its absmax),
    # fused: tests/test_quant.py holds the two equal for every byte value
    flat = packed.reshape(-1)
    if flat.device.type == "cpu" and nf4_cpu.available():     # one compiled pass (labkit/nf4_cpu.py)
        out = nf4_cpu.dequantize(flat, state.code, state.absmax, state.blocksize, n, compiled_double(state))
    else:                                  # torch, a chunk at a time: a GPU's path, and the CPU's without numba
        out = _dequantize_fast(flat, state.code, state.block_absmax(), state.blocksize, n, state.code_name)
    return out.reshape(state.shape).to(state.dtype)


def compiled_double(state):
    """What nf4_cpu's decode takes for double quantization: (code2, absmax2, offset, blocksize2), or None."""
    return (state.code2, state.absmax2, state.offset, state.blocksize2) if state.double_quant else None


def check_state(packed, state):
    """n, the number of values, once `packed` and `state` are checked to belong together (the
    compiled decode reads them unchecked)."""
    if not isinstance(state, QuantState4):
        raise TypeError(f"expected the QuantState4 returned by quantize_nf4, got {type(state).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    n = state.n
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"this state does not belong to the packed data: the state describes "
                         f"{tuple(state.shape)} ({n} values, {(n + 1) // 2} bytes) but {packed.numel()} bytes were given")
    n_blocks = -(-n // state.blocksize)
    if state.absmax.numel() != n_blocks:
        raise ValueError(f"this state does not belong to the packed data: {state.absmax.numel()} absmax values "
                         f"for {n_blocks} blocks of {state.blocksize}")
    if state.double_quant:             # the compiled decode reads these unchecked: a wrong size would read past them
        want = -(-n_blocks // state.blocksize2) if state.blocksize2 > 0 else None
        if (state.absmax.dtype != torch.uint8 or state.code2 is None or state.code2.numel() != 256
                or state.absmax2 is None or want is None or state.absmax2.numel() != want):
            raise ValueError(f"this state's double quantization is inconsistent: absmax {state.absmax.dtype} "
                             f"(uint8 expected), code2 of {None if state.code2 is None else state.code2.numel()} values "
                             f"(256 expected), absmax2 of {None if state.absmax2 is None else state.absmax2.numel()} "
                             f"values ({want} expected for {n_blocks} blocks in groups of {state.blocksize2})")
    return n


def dequantize_plain(packed, state):
    """dequantize_nf4, the plain way: each stored index looked up in the codebook, then every value
    multiplied by its block's absmax."""
    n = state.n
    absmax = state.block_absmax()
    out = code_values(packed, state.code)[:n]                               # in [-1, 1], a new tensor
    full = n - n % state.blocksize
    out[:full].view(-1, state.blocksize).mul_(absmax[: full // state.blocksize, None])  # x its block's absmax
    out[full:].mul_(absmax[-1])                                                     # the short last block
    return out.reshape(state.shape).to(state.dtype)


# --------------------------------------------------------------------------------------------
# The fast paths behind quantize_4bit and dequantize_nf4 (same results as the plain functions above)

CHUNK = 1 << 15          # values per chunk on a CPU: 128 KiB of float32, which stays in a core's cache


def _chunk_rows(device, n_blocks, blocksize):
    """Blocks per chunk: on a CPU a few per chunk-of-cache; elsewhere (a GPU) all at once."""
    return max(1, CHUNK // blocksize) if device.type == "cpu" else max(1, n_blocks)


def _quantize_fast(flat, code, blocksize):
    """(packed, absmax) equal to pack_nibbles(round_to_code(*block_absmax(flat, blocksize))).
    The values are not clamped to [-1, 1]: a value an ulp beyond 1 lands on the end code either way."""
    n = flat.numel()
    full = n - n % blocksize
    midpoints = (code[:-1] + code[1:]) / 2
    blocks = flat[:full].view(-1, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    if flat.device.type == "cpu" and nf4_cpu.available() and blocksize % 2 == 0:   # one compiled pass
        packed[: full // 2], absmax = nf4_cpu.quantize(flat[:full], midpoints, blocksize)
    else:
        absmax = torch.empty(blocks.shape[0], dtype=torch.float32, device=flat.device)
        step = _chunk_rows(flat.device, blocks.shape[0], blocksize)
        for i in range(0, blocks.shape[0], step):
            b = blocks[i:i + step]
            a = torch.amax(b.abs(), dim=1, out=absmax[i:i + b.shape[0]])
            idx = torch.bucketize(b * (1.0 / a.clamp(min=1e-38))[:, None], midpoints, out_int32=True).view(-1, 2)
            packed[i * blocksize // 2:(i + b.shape[0]) * blocksize // 2] = (idx[:, 0] << 4) | idx[:, 1]
    if full < n:                                                         # the short last block: the plain way
        scaled, am = block_absmax(flat[full:], blocksize)
        packed[full // 2:] = pack_nibbles(round_to_code(scaled, code)).reshape(-1)
        absmax = torch.cat([absmax, am])
    return packed.unsqueeze(1), absmax


_TABLES = collections.OrderedDict()      # (codebook, device) -> decode table; the few most recent kept
_MAX_TABLES = 8


def _decode_table(code, device, name=None):
    """The 4 values each of the 65,536 pairs of bytes holds, as one 16-byte element per pair (1 MiB),
    built once per codebook and device. A named codebook ("nf4") is found by its name, so a layer on
    a GPU never copies its codebook to the host to look the table up."""
    key = (name if name is not None else tuple(code.float().cpu().tolist()), str(device))
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    code = code.float().to(device)                    # the table holds float32 values, 4 per row
    code16 = torch.cat([code, code.new_zeros(16 - len(code))])                     # FP4, int4: 15 values
    b = torch.arange(256, device=device)
    by_byte = torch.stack([code16[b >> 4], code16[b & 0x0F]], dim=1)               # (256, 2)
    lo, hi = torch.arange(65536, device=device) % 256, torch.arange(65536, device=device) // 256
    table = torch.cat([by_byte[lo], by_byte[hi]], dim=1).contiguous()              # (65536, 4): little-endian
    _TABLES[key] = table.view(torch.complex128).reshape(-1)       # one 16-byte element per row: a faster gather
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return _TABLES[key]


def _pair_index(flat):
    """Each pair of bytes as one index in 0..65535 (little-endian, as the table is laid out)."""
    if flat.device.type == "cpu":
        return flat.view(torch.uint16).to(torch.int32)
    return flat.view(torch.int16).int() & 0xFFFF          # uint16 arithmetic is not on every accelerator


def _table_fits(device):
    """Whether `device` has the 16-byte complex128 elements the decode table is gathered as
    (Apple's MPS has no float64 or complex128: there the plain decode runs)."""
    return device.type != "mps"


def _code_values_fast(flat, code, name=None):
    """code_values(flat, code), faster: bytes are read two at a time, as one 16-bit number, through
    _decode_table. tests/test_quant.py checks it equal to code_values for every byte value."""
    if not _table_fits(flat.device):
        return code_values(flat, code.float().to(flat.device))
    table = _decode_table(code, flat.device, name)
    even = flat.numel() - flat.numel() % 2
    values = table.index_select(0, _pair_index(flat[:even])).view(torch.float32)
    if even < flat.numel():                                                          # an odd byte left over
        values = torch.cat([values, table.index_select(0, flat[even:].int()).view(torch.float32)[:2]])
    return values


def _dequantize_fast(flat, code, absmax, blocksize, n, name=None):
    """dequantize_plain's values (float32, flat), a chunk of blocks at a time: two bytes become four
    values through the decode table, written straight into the output, then scaled in the cache.
    The torch decode: a GPU's, and the CPU's where numba does not import (dequantize_nf4 chooses)."""
    out = torch.empty(n, dtype=torch.float32, device=flat.device)
    full = n - n % blocksize
    if not _table_fits(flat.device):                          # the plain decode, on the device
        out.copy_(code_values(flat, code.float().to(flat.device))[:n])
        out[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
        out[full:].mul_(absmax[-1])
        return out
    table = _decode_table(code, flat.device, name)
    blocks = out[:full].view(-1, blocksize)
    pairs = flat[: full // 2]                                # 2 values a byte, so 4 values per 2 bytes
    step = _chunk_rows(flat.device, blocks.shape[0], blocksize)
    for i in range(0, blocks.shape[0], step):
        rows = blocks[i:i + step]
        idx = _pair_index(pairs[i * blocksize // 2:(i + rows.shape[0]) * blocksize // 2])
        torch.index_select(table, 0, idx, out=rows.view(-1).view(torch.complex128))
        rows.mul_(absmax[i:i + rows.shape[0], None])
    if full < n:                                              # the short last block
        out[full:] = _code_values_fast(flat[full // 2:], code, name)[: n - full] * absmax[-1]
    return out


def dequantize_4bit(packed, state):
    """Same as dequantize_nf4, for any codebook (FP4, int4, the paper's NF4)."""
    return dequantize_nf4(packed, state)


def nf4_bits(blocksize=64, double_quant=False, blocksize2=256):
    """Bits stored per weight by 4-bit blockwise quantization, on paper: 4 for the code, plus an fp32
    absmax per block; with double quantization, an 8-bit absmax per block plus an fp32 constant per
    `blocksize2` blocks. 4.5 and about 4.127 at QLoRA's block size of 64."""
    return 4 + (8 / blocksize + 32 / (blocksize * blocksize2) if double_quant else 32 / blocksize)


def bits_per_parameter(packed, state):
    """Bits actually stored per parameter: the packed nibbles plus the per-block constants."""
    return 8 * (packed.numel() * packed.element_size() + state.nbytes()) / state.n


def quantization_error(w, code, blocksize=64, double_quant=False):
    """Mean squared error of quantizing `w` to `code` and reading it back."""
    packed, state = quantize_4bit(w, code, blocksize, double_quant)
    return (dequantize_4bit(packed, state).float() - w.float()).pow(2).mean().item()
