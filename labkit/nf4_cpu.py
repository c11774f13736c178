"""A compiled NF4 decode for the CPU (numba): dequantize_plain's values in one pass over the bytes.

Why it exists. Dequantizing is bound by memory bandwidth: it reads n/2 bytes and writes 4n bytes.
Any decode made of torch operations writes the output at least twice (a gather of the codes, then
the multiplication by each block's absmax, each a pass over 4n bytes), so on a CPU it runs at about
2.5 x bitsandbytes' compiled kernel (README, Performance). This loop reads each byte once and writes
each value once: code[index] * absmax, the same single float32 multiplication dequantize_plain does,
so the values are equal to the bit (tests/test_quant.py, for every byte value and codebook).

Chapter 4 teaches dequantize_plain; this file is only the engine room. Where numba does not import,
or the tensors are not on the CPU, labkit.quant uses its torch decode instead (same values)."""
import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:                                  # an optional speed-up: labkit works without it
    numba = None
else:
    import os
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool, not OpenMP: its OpenMP layer shares torch's libgomp and, when it
        # starts, sets OpenMP's thread count to all the cores, so torch.get_num_threads() would
        # change under the caller (measured: 1 became 2 after the first call)
        numba.config.THREADING_LAYER = "workqueue"

SERIAL_BELOW = 1 << 18      # values; below this one thread decodes (starting threads costs more than it saves)


if numba is not None:
    @njit(parallel=True, cache=True, nogil=True)
    def _decode(packed, code, absmax, blocksize, n, out):
        """out[i] = code[nibble i of packed] * absmax[i // blocksize], element 2j in the HIGH nibble.
        A whole block is blocksize / 2 bytes (block sizes are even): two values a byte, no branch."""
        half = blocksize // 2
        full = n // blocksize
        for b in prange(full):
            a = absmax[b]
            for j in range(half):
                byte = np.int64(packed[b * half + j])          # uint8 with int64 would make float64
                out[b * blocksize + 2 * j] = code[byte >> 4] * a
                out[b * blocksize + 2 * j + 1] = code[byte & 15] * a
        for i in range(full * blocksize, n):                 # the short last block, value by value
            byte = np.int64(packed[i >> 1])
            out[i] = code[(byte >> 4) if (i & 1) == 0 else (byte & 15)] * absmax[full]


def available():
    """Whether the compiled decode can run here (numba imports)."""
    return numba is not None


def dequantize(flat, code, absmax, blocksize, n):
    """dequantize_plain's flat float32 values from CPU tensors: `flat` uint8 bytes, `code` the
    codebook (16 values or fewer), `absmax` one float32 per block. The first call compiles the loop
    (a few seconds; numba caches it on disk for later processes)."""
    if blocksize % 2:
        raise ValueError(f"the compiled decode needs an even block size, got {blocksize}")
    # A new torch tensor: its pages are faulted in as the loop first writes them, most of this call's
    # time for a large matrix (a new 64 MiB tensor filled: 17.9 ms, an existing one 2.3 ms, measured).
    # Taking the memory from numpy's heap instead was 3x faster there, but MemTracker's counts (chapters
    # 5 to 7) were not checked against it, so it is not done.
    out = torch.empty(n, dtype=torch.float32)
    code16 = torch.zeros(16, dtype=torch.float32)
    code16[: code.numel()] = code.float()                    # on the CPU already: the caller checks
    threads = 1 if n < SERIAL_BELOW else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:                  # as many threads as torch uses (OMP_NUM_THREADS)
        numba.set_num_threads(threads)
    _decode(flat.contiguous().numpy(), code16.numpy(), absmax.float().contiguous().numpy(), int(blocksize), int(n),
            out.numpy())
    return out
