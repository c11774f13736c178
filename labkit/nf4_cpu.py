"""A compiled NF4 decode and encode for the CPU (numba): dequantize_plain's values in one pass over
the bytes, and quantize_4bit's bytes in one pass over the values.

Why it exists. Dequantizing is bound by memory bandwidth: it reads n/2 bytes and writes 4n bytes.
Any decode made of torch operations writes the output at least twice (a gather of the codes, then
the multiplication by each block's absmax, each a pass over 4n bytes). This loop reads each byte
once and writes each value to memory once: a chunk of blocks at a time, small enough to stay in the
cache, it copies each byte's two codes from a 256-row table of pairs, then multiplies each block by
its absmax, the same single float32 multiplication dequantize_plain does, so the values are equal to the bit (tests/test_quant.py: every byte value with NF4, and the FP4
and int4 codebooks).

Threads. The loop releases the GIL (nogil). Below THREADS_FROM values one thread decodes: the
workbook's layers (SmolLM2's largest holds 884,736 weights) take 30 to 400 microseconds, and
starting threads costs about 80 (a thread pool) to 200 (numba's own parallel loop, measured).
Above it the blocks are split between as many threads as torch uses (OMP_NUM_THREADS).

The encode (_encode_blocks) does per block what labkit.quant._quantize_fast's torch operations do
(absmax, the float32 scale 1 / max(absmax, 1e-38), each value's code found by counting the
midpoints below it), equal byte for byte; one pass instead of five over the values, about 7 times
faster on a 4096 x 4096 matrix (scripts/bench_quant.py).

Chapter 4 teaches dequantize_plain and the plain quantize steps; this file is only the engine room.
Where numba does not import, or the tensors are not on the CPU, labkit.quant uses its torch decode
and encode instead (same values and bytes)."""
import concurrent.futures
import os

import numpy as np
import torch

try:
    import numba
    from numba import njit
except ImportError:                                  # an optional speed-up: labkit works without it
    numba = None

THREADS_FROM = 1 << 21      # values (8 MiB of float32); below this one thread decodes or encodes
_POOL = {}                  # (threads, process id) -> a ThreadPoolExecutor of threads - 1 workers (the caller is one)
_PAIRS = {}                 # a codebook's 16 float32 values, as bytes -> its (256, 2) table of pairs


if numba is not None:
    @njit(cache=True, nogil=True, error_model="numpy")
    def _decode_blocks(packed, pairs64, absmax, blocksize, b0, b1, out, qabsmax, code2, absmax2, offset, blocksize2):
        """Whole blocks b0..b1-1 of the flat float32 `out`: value = code of its nibble * its block's
        absmax. Block sizes are even, so a block is blocksize / 2 bytes and each byte two values
        (the high nibble first). Two steps over a chunk of CHUNK blocks (16 KiB of output, in the
        L1 or L2 cache): each byte's pair of codes copied as one 8-byte word from the 256-row table
        (`pairs64`, the (256, 2) float32 table seen as uint64), then each block multiplied by its
        absmax, a loop the compiler vectorizes; about a quarter faster than multiplying pair by pair
        (measured), and the same float32 product, so the same bits.
        Under double quantization (qabsmax not empty) a block's absmax is decoded here, as
        QuantState4.block_absmax does it: code2[qabsmax[b]] * absmax2[b // blocksize2] + offset,
        float32 throughout (offset is a 1-element float32 array: a Python float would be float64)."""
        half = blocksize // 2
        double = qabsmax.size > 0
        out64 = out.view(np.uint64)
        for c0 in range(b0, b1, 64):                    # CHUNK = 64 blocks (a constant: measured faster)
            c1 = min(b1, c0 + 64)
            p = packed[c0 * half:c1 * half]
            q = out64[c0 * half:c1 * half]
            for j in range(p.size):
                q[j] = pairs64[p[j]]
            for b in range(c0, c1):
                if double:
                    a = code2[np.int64(qabsmax[b])] * absmax2[b // blocksize2] + offset[0]
                else:
                    a = absmax[b]
                o = out[b * blocksize:(b + 1) * blocksize]
                for j in range(blocksize):
                    o[j] *= a


    @njit(cache=True, nogil=True, error_model="numpy")
    def _encode_blocks(flat, midpoints, blocksize, b0, b1, packed, absmax):
        """Whole blocks b0..b1-1 of float32 `flat`: absmax[b], and each pair of values packed into
        one byte, as labkit.quant._quantize_fast's torch operations compute them: the absmax
        (NaN where a block holds one), the scale 1 / max(absmax, 1e-38) in float32, and the index
        of a value = how many midpoints lie strictly below value * scale (torch.bucketize's rule:
        a value on a midpoint goes to the lower code)."""
        half = blocksize // 2
        tiny = np.float32(1e-38)
        one = np.float32(1.0)
        n_mid = midpoints.size
        for b in range(b0, b1):
            x = flat[b * blocksize:(b + 1) * blocksize]
            m = np.float32(0.0)
            for j in range(blocksize):
                v = abs(x[j])
                if v != v:                                  # NaN: the caller refuses the tensor
                    m = v
                    break
                if v > m:
                    m = v
            absmax[b] = m
            scale = one / (m if m > tiny else tiny)
            p = packed[b * half:(b + 1) * half]
            for j in range(half):
                hi = x[2 * j] * scale
                lo = x[2 * j + 1] * scale
                i_hi = 0
                i_lo = 0
                for k in range(n_mid):
                    i_hi += hi > midpoints[k]
                    i_lo += lo > midpoints[k]
                p[j] = np.uint8((i_hi << 4) | i_lo)


def available():
    """Whether the compiled decode and encode can run here (numba imports)."""
    return numba is not None


def _pairs(code):
    """(256, 2) float32: row b holds the codes of byte b's high and low nibble (the codebook padded
    with zeros to 16 values); row 17 k holds code k twice."""
    code16 = np.zeros(16, dtype=np.float32)
    code16[: code.numel()] = code.float().numpy()           # on the CPU already: the caller checks
    key = code16.tobytes()
    pairs = _PAIRS.get(key)
    if pairs is None:                 # held in a local: another thread may evict the entry meanwhile
        b = np.arange(256)
        pairs = _PAIRS[key] = np.ascontiguousarray(np.stack([code16[b >> 4], code16[b & 15]], axis=1))
        if len(_PAIRS) > 8:                                  # a few codebooks at most are in use
            _PAIRS.pop(next(iter(_PAIRS)), None)
    return pairs


def _threads(n):
    return 1 if n < THREADS_FROM else max(1, torch.get_num_threads())


def _pool(threads):
    """The pool of threads - 1 workers for this process (a forked child, a DataLoader worker, has
    none of its parent's threads, so it gets a pool of its own)."""
    key = (threads, os.getpid())
    return _POOL.get(key) or _POOL.setdefault(key, concurrent.futures.ThreadPoolExecutor(threads - 1))


def dequantize(flat, code, absmax, blocksize, n, double=None):
    """dequantize_plain's flat float32 values from CPU tensors: `flat` uint8 bytes, `code` the
    codebook (16 values or fewer), `absmax` one float32 per block, or with double quantization its
    uint8 codes, and `double` = (code2, absmax2, offset, blocksize2) to decode them with, inside the
    loop (no tensor of absmax values is made). The first call in a new Python compiles the loop (a
    few seconds; numba caches it on disk for later processes)."""
    return run(prepare(flat, code, absmax, blocksize, n, double))


def prepare(flat, code, absmax, blocksize, n, double=None):
    """dequantize's arguments as the compiled loop takes them, made once: a layer decoded at every
    pass keeps them (labkit.qlora.LinearNF4), which saves about 40 microseconds a call (measured).
    The arrays are numpy views of contiguous tensors, sharing their memory: a tensor changed in
    place is seen, a tensor replaced is not (the caller makes them again then)."""
    if blocksize % 2:
        raise ValueError(f"the compiled decode needs an even block size, got {blocksize}")
    pairs, packed = _pairs(code), flat.contiguous().numpy()
    if double is None:
        absmax = absmax.float().contiguous().numpy()
        dq = (np.zeros(0, np.uint8), np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32), 1)
    else:
        code2, absmax2, offset, blocksize2 = double
        dq = (absmax.contiguous().numpy(), code2.float().contiguous().numpy(), absmax2.float().contiguous().numpy(),
              offset.float().reshape(1).numpy(), int(blocksize2))
        absmax = np.zeros(1, np.float32)
    return packed, pairs, absmax, blocksize, n, dq


def run(prepared):
    """The flat float32 values of what prepare() made ready: a new tensor each call."""
    packed, pairs, absmax, blocksize, n, dq = prepared
    # A new torch tensor, as bitsandbytes' output is: for a large matrix most of this call's time is
    # the kernel faulting its pages in as they are first written (64 MiB: about 17 ms, measured)
    out = torch.empty(n, dtype=torch.float32)
    full = n // blocksize
    out1 = out[: full * blocksize].numpy()
    pairs64 = pairs.view(np.uint64).reshape(256)            # a byte's two float32 codes as one word
    threads = _threads(n)
    if threads == 1:
        _decode_blocks(packed, pairs64, absmax, blocksize, 0, full, out1, *dq)
    else:
        pool = _pool(threads)
        cuts = [full * k // threads for k in range(threads + 1)]
        rest = [pool.submit(_decode_blocks, packed, pairs64, absmax, blocksize, cuts[k], cuts[k + 1], out1, *dq)
                for k in range(1, threads)]
        _decode_blocks(packed, pairs64, absmax, blocksize, cuts[0], cuts[1], out1, *dq)
        for job in rest:
            job.result()
    if full * blocksize < n:                                 # the short last block, value by value
        if dq[0].size == 0:
            last = absmax[-1]
        else:                                                # float32 scalars: the loop's arithmetic
            qabsmax, code2, absmax2, offset, blocksize2 = dq
            last = code2[int(qabsmax[full])] * absmax2[full // blocksize2] + offset[0]
        tail = np.arange(full * blocksize, n)
        byte = packed[tail // 2]
        nibble = np.where(tail % 2 == 0, byte >> 4, byte & 15).astype(np.intp)    # 17 x 15 fits uint8, but only just
        out[full * blocksize:] = torch.from_numpy(pairs[nibble * 17, 0] * np.float32(last))
    return out


def quantize(flat, midpoints, blocksize):
    """(packed bytes, absmax) of the whole blocks of the flat float32 CPU tensor `flat`, equal to
    labkit.quant._quantize_fast's torch path byte for byte (tests/test_quant.py); the caller adds
    the short last block. Threads as for dequantize."""
    if blocksize % 2:
        raise ValueError(f"the compiled encode needs an even block size, got {blocksize}")
    if flat.dtype != torch.float32:                  # numba would compile a float64 loop, with other rounding
        raise TypeError(f"the compiled encode takes float32 values, got {flat.dtype}")
    full = flat.numel() // blocksize
    packed = torch.empty(full * blocksize // 2, dtype=torch.uint8)
    absmax = torch.empty(full, dtype=torch.float32)
    x, mids = flat.contiguous().numpy(), midpoints.float().contiguous().numpy()
    args = (x, mids, blocksize)
    outs = (packed.numpy(), absmax.numpy())
    threads = _threads(flat.numel())
    if threads == 1:
        _encode_blocks(*args, 0, full, *outs)
    else:
        pool = _pool(threads)
        cuts = [full * k // threads for k in range(threads + 1)]
        rest = [pool.submit(_encode_blocks, *args, cuts[k], cuts[k + 1], *outs) for k in range(1, threads)]
        _encode_blocks(*args, cuts[0], cuts[1], *outs)
        for job in rest:
            job.result()
    return packed, absmax
