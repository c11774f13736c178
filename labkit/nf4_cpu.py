"""A compiled NF4 decode for the CPU (numba): dequantize_plain's values in one pass over the bytes.

Why it exists. Dequantizing is bound by memory bandwidth: it reads n/2 bytes and writes 4n bytes.
Any decode made of torch operations writes the output at least twice (a gather of the codes, then
the multiplication by each block's absmax, each a pass over 4n bytes). This loop reads each byte
once and writes each value once: the byte's two codes, looked up together in a 256-row table of
pairs, each times its block's absmax, the same single float32 multiplication dequantize_plain does,
so the values are equal to the bit (tests/test_quant.py, for every byte value and codebook).

Threads. The loop releases the GIL (nogil). Below THREADS_FROM values one thread decodes: the
workbook's layers (SmolLM2's largest holds 884,736 weights) take 30 to 400 microseconds, and
starting threads costs about 80 (a thread pool) to 200 (numba's own parallel loop, measured).
Above it the blocks are split between as many threads as torch uses (OMP_NUM_THREADS).

Chapter 4 teaches dequantize_plain; this file is only the engine room. Where numba does not import,
or the tensors are not on the CPU, labkit.quant uses its torch decode instead (same values)."""
import concurrent.futures
import os

import numpy as np
import torch

try:
    import numba
    from numba import njit
except ImportError:                                  # an optional speed-up: labkit works without it
    numba = None

THREADS_FROM = 1 << 21      # values (8 MiB of float32); below this one thread decodes
_POOL = {}                  # (threads, process id) -> a ThreadPoolExecutor of threads - 1 workers (the caller is one)
_PAIRS = {}                 # a codebook's 16 float32 values, as bytes -> its (256, 2) table of pairs


if numba is not None:
    @njit(cache=True, nogil=True, error_model="numpy")
    def _decode_blocks(packed, pairs, absmax, blocksize, b0, b1, out2):
        """Whole blocks b0..b1-1: out2[j] = pairs[packed[j]] * absmax[block of byte j]. Block sizes
        are even, so a block is blocksize / 2 bytes and each byte two values (the high nibble first)."""
        half = blocksize // 2
        for b in range(b0, b1):
            a = absmax[b]
            for j in range(b * half, (b + 1) * half):
                i = np.int64(packed[j])                    # uint8 with int64 would make float64
                out2[j, 0] = pairs[i, 0] * a
                out2[j, 1] = pairs[i, 1] * a


def available():
    """Whether the compiled decode can run here (numba imports)."""
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


def dequantize(flat, code, absmax, blocksize, n):
    """dequantize_plain's flat float32 values from CPU tensors: `flat` uint8 bytes, `code` the
    codebook (16 values or fewer), `absmax` one float32 per block. The first call in a new Python
    compiles the loop (a few seconds; numba caches it on disk for later processes)."""
    if blocksize % 2:
        raise ValueError(f"the compiled decode needs an even block size, got {blocksize}")
    # A new torch tensor, as bitsandbytes' output is: for a large matrix most of this call's time is
    # the kernel faulting its pages in as they are first written (64 MiB: about 17 ms, measured)
    out = torch.empty(n, dtype=torch.float32)
    pairs, packed = _pairs(code), flat.contiguous().numpy()
    absmax = absmax.float().contiguous().numpy()
    full = n // blocksize
    out2 = out[: full * blocksize].numpy().reshape(-1, 2)
    threads = _threads(n)
    if threads == 1:
        _decode_blocks(packed, pairs, absmax, blocksize, 0, full, out2)
    else:
        key = (threads, os.getpid())            # a forked child (a DataLoader worker) has no pool threads
        pool = _POOL.get(key) or _POOL.setdefault(key, concurrent.futures.ThreadPoolExecutor(threads - 1))
        cuts = [full * k // threads for k in range(threads + 1)]
        rest = [pool.submit(_decode_blocks, packed, pairs, absmax, blocksize, cuts[k], cuts[k + 1], out2)
                for k in range(1, threads)]
        _decode_blocks(packed, pairs, absmax, blocksize, cuts[0], cuts[1], out2)
        for job in rest:
            job.result()
    if full * blocksize < n:                                 # the short last block, value by value
        tail = np.arange(full * blocksize, n)
        byte = packed[tail // 2]
        nibble = np.where(tail % 2 == 0, byte >> 4, byte & 15).astype(np.intp)    # 17 x 15 fits uint8, but only just
        out[full * blocksize:] = torch.from_numpy(pairs[nibble * 17, 0]) * torch.from_numpy(absmax[full:])
    return out
