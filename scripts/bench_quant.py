"""Benchmark: labkit's NF4 quantize / dequantize against bitsandbytes', and the memory of SmolLM2
in fp32, bf16, NF4 and NF4 with double quantization.

    python scripts/bench_quant.py [--size 4096] [--repeats 5]

Prints, from one run on this machine's device: the median time of each side on a size x size
matrix and labkit / bitsandbytes ratios (aim: at most 1.0), the bandwidth bound of the same bytes
(a plain copy of an fp32 tensor of that size: into a new tensor, as both libraries write their
output, and into an existing one), then the memory table (measured bytes of the model's tensors
beside the arithmetic).
"""
import argparse
import statistics
import time

import torch

import labkit as lk
from labkit import quant as q


def median_time(fn, repeats):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn()                                                        # warm-up
    times = []
    for _ in range(repeats):
        lk.session.synchronize(device)
        t0 = time.perf_counter()
        fn()
        lk.session.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(size, repeats, device):
    import bitsandbytes.functional as bnbF
    w = (torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    rows = []
    for dq in (False, True):
        p_l, s_l = q.quantize_nf4(w, 64, double_quant=dq)
        p_b, s_b = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        assert torch.equal(p_l, p_b), "labkit and bitsandbytes disagree on the packed bytes"
        tq_l = median_time(lambda: q.quantize_nf4(w, 64, double_quant=dq), repeats)
        tq_b = median_time(lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq), repeats)
        td_l = median_time(lambda: q.dequantize_nf4(p_l, s_l), repeats)
        td_b = median_time(lambda: bnbF.dequantize_4bit(p_b, s_b), repeats)
        label = "NF4 + double quant" if dq else "NF4"
        rows += [(f"quantize   {label}", tq_l, tq_b), (f"dequantize {label}", td_l, td_b)]
    fresh = median_time(lambda: torch.empty_like(w).copy_(w), repeats)
    into = torch.empty_like(w)
    existing = median_time(lambda: into.copy_(w), repeats)
    print(f"{size} x {size} fp32 matrix on {device}, blocksize 64, {repeats} repeats (median)")
    print(f"{'':<32}{'labkit s':>10}{'bnb s':>10}{'labkit/bnb':>12}   (aim: <= 1.0)")
    for name, a, b in rows:
        print(f"{name:<32}{a:>10.4f}{b:>10.4f}{a / b:>12.2f}")
    mib = w.numel() * 4 / 2**20
    print(f"bandwidth bound, a plain copy of the {mib:.0f} MiB of fp32 values: {fresh:.4f} s into a new tensor, "
          f"{existing:.4f} s into an existing one")
    return rows, fresh, existing


def memory_table():
    rows, n_linear, other = lk.qlora.footprint_table("smollm2")
    print(f"\nSmolLM2-135M-Instruct: {n_linear:,} parameters in linear layers (quantized), {other:,} elsewhere (fp32)")
    print(f"{'':<22}{'arithmetic MiB':>16}{'labkit MiB':>12}{'bnb MiB':>10}")
    for r in rows:
        bnb = "-" if r["bnb"] is None else f"{r['bnb'] / 2**20:.1f}"
        print(f"{r['format']:<22}{r['arithmetic'] / 2**20:>16.1f}{r['labkit'] / 2**20:>12.1f}{bnb:>10}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device, _ = lk.setup(seed=0)
    kernels(args.size, args.repeats, device)
    memory_table()
