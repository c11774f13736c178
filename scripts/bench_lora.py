"""Benchmark: labkit's LoRA against peft's, and a merged model against the base model.

    python scripts/bench_lora.py [--steps 6] [--batch 8]

Prints, from one run on SmolLM2-135M-Instruct (LoRA r=8, alpha=16 on q,k,v,o; fp32):
  1. forward+backward step time, labkit LoRA / peft LoRA           (aim: <= 1.05)
  2. inference (forward) time, merged labkit model / base model    (aim: 1.0 within noise)
Each figure is the median over repeats, with the two sides interleaved so that drift in the
machine's speed hits both alike. On a CUDA machine it runs there (times after synchronize).
"""
import argparse
import statistics
import time

import torch

import labkit as lk

QKVO = lk.lora.QKVO


def timed(fn, device):
    lk.session.synchronize(device)
    t0 = time.perf_counter()
    fn()
    lk.session.synchronize(device)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed repeats of each side (after one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)

    base, tok = lk.load_model(name, device=device)
    batch = next(lk.text.batches(tok, lk.data.load_task("people")["train"], args.batch, seed=0))
    batch = {k: v.to(device) for k, v in batch.items()}
    print(f"batch: {tuple(batch['input_ids'].shape)} tokens; LoRA r=8, alpha=16 on {QKVO}")

    ours = lk.inject_lora(lk.load_model(name, device=device)[0], QKVO, r=8, alpha=16)
    theirs = lk.to_peft(ours, lk.load_model(name, device=device)[0])
    ours.train(), theirs.train()

    def step(model):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    train_times = {"labkit": [], "peft": []}
    for i in range(args.steps + 1):                         # the first round is a warm-up
        for label, model in (("labkit", ours), ("peft", theirs)):
            t = timed(lambda: step(model), device)
            if i:
                train_times[label].append(t)

    lk.merge_lora(ours.eval())
    del theirs
    infer_times = {"base": [], "merged": []}
    with torch.no_grad():
        for i in range(3 * args.steps + 1):
            for label, model in (("base", base), ("merged", ours)):
                t = timed(lambda: model(**batch), device)
                if i:
                    infer_times[label].append(t)

    med = {k: statistics.median(v) for k, v in {**train_times, **infer_times}.items()}
    print(f"\n{'':<36}{'median s':>10}{'min s':>9}{'max s':>9}")
    for k, v in {**train_times, **infer_times}.items():
        print(f"{k + (' LoRA fwd+bwd' if k in train_times else ' forward'):<36}{med[k]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}")
    print(f"\nstep time, labkit LoRA / peft LoRA:   {med['labkit'] / med['peft']:.3f}   (aim <= 1.05)")
    print(f"inference time, merged / base model:  {med['merged'] / med['base']:.3f}   (aim 1.0 within noise)")


if __name__ == "__main__":
    main()
