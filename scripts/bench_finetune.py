"""Benchmark: full fine-tuning, LoRA and QLoRA on SmolLM2 at one batch shape, and labkit's
training loop against transformers' Trainer.

    python scripts/bench_finetune.py [--batch 4] [--seq 96] [--steps 3]

Prints, from one run (fp32; random tokens, every one in the loss: a step's cost depends only on
the shapes):
  1. per method: seconds per step (median of --steps, after one warm-up step), peak memory as
     PyTorch's MemTracker counts it (every tensor, repeatable) and as the process's resident
     memory (CPU) or CUDA's allocator reports it, and the peak predicted by
     lk.memory.predict_peak from parameter counts and the model's shape;
  2. ratios to full fine-tuning                       (aim: LoRA peak memory <= 0.6 of full's)
  3. predicted / measured peak                        (aim: within 1%)
  4. a QLoRA step of labkit's against a LoRA step    (aim: <= 1.15)
     and against bitsandbytes' Linear4bit + peft's LoRA on the same model, the same NF4 settings
     (double quantization, fp32 compute) and batch     (aim: <= 1.0)
  5. throughput of lk.train.train / Trainer, same peft LoRA model, data and settings
                                                      (aim: >= 0.95)
On a CUDA machine it runs there. With --json PATH it also writes these figures there (chapter 6
reads data/results/bench_finetune.json, made by `python scripts/bench_finetune.py --json
data/results/bench_finetune.json` on a quiet machine).
"""
import argparse
import itertools
import platform
import statistics
import time

import torch

import labkit as lk

QKVO = lk.lora.QKVO


sync = lk.session.synchronize


def held(device):
    """Memory the process holds now: resident (CPU, after giving freed heap back) or allocated (CUDA)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    return lk.memory.held_memory()


def training_step(model, batch):
    """(optimizer, step): one AdamW step of `model` on `batch`, the model in training mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt, step


def step_times(step, device, steps):
    """Seconds of each of `steps` calls of step(), the device waited for on both sides."""
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(method, name, device, batch, steps):
    start = held(device)
    model, _ = lk.load_model(name, device=device)
    torch.manual_seed(0)
    lk.finetune.prepare(model, method, QKVO, r=8, alpha=16)
    opt, step = training_step(model, batch)
    step()                                               # warm-up; AdamW's states now exist
    # timed alone: peak_memory's sampling thread shares the cores (it slowed a step by up to 20%),
    # and bitsandbytes' step below is timed without it
    times = step_times(step, device, steps)
    before = held(device)                                # the model and AdamW's states
    _, extra = lk.memory.peak_memory(step, device)       # one more step, for the process's peak
    _, tracked = lk.memory.tracked_peak(step, model, opt)
    B, T = batch["input_ids"].shape
    predicted = lk.memory.predict_peak(model, B, T, method, QKVO, r=8)
    trainable, _ = lk.count_parameters(model)
    return {"method": method, "trainable": trainable, "s_per_step": statistics.median(times),
            "tracked": tracked["total"], "process": before - start + extra, "predicted": predicted["total"],
            "phase": predicted["phase"]}


def bnb_qlora_step(name, device, batch, steps):
    """Median seconds per step of bitsandbytes + peft's QLoRA: every linear layer but the head in
    NF4 with double quantization, fp32 compute, LoRA r=8 on q,k,v,o, AdamW; on a CPU kept on
    bitsandbytes' dequantize-then-matmul path (lk.qlora.bnb_exact_on_cpu), the path labkit takes."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    where = {"": 0} if device.type == "cuda" else "cpu"
    model = lk.load_model(name, quantization_config=cfg, device_map=where)[0]
    if device.type == "cpu":
        lk.qlora.bnb_exact_on_cpu(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=QKVO, lora_dropout=0.0))
    _, step = training_step(model, batch)
    step()                                               # warm-up
    return statistics.median(step_times(step, device, steps))


def throughput(name, device, batch_size, seq, steps, rounds):
    """Seconds for `steps` steps of lk.train.train and of Trainer.train on twin peft LoRA models."""
    from peft import LoraConfig, get_peft_model
    _, tok = lk.load_model(name)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids}                       # fixed-shape examples
                for ids in torch.randint(0, 49152, (batch_size * steps, seq), generator=g).tolist()]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=QKVO, lora_dropout=0.0)
    times = {"labkit": [], "Trainer": []}
    for _ in range(rounds):
        torch.manual_seed(0)
        model = get_peft_model(lk.load_model(name, device=device)[0], config)
        stream = (lk.text.collate(examples[i:i + batch_size], tok.pad_token_id)
                  for i in itertools.cycle(range(0, len(examples), batch_size)))
        batches = ({k: v.to(device) for k, v in b.items()} for b in stream)
        sync(device)
        t0 = time.perf_counter()
        lk.train.train(model, batches, steps, lr=2e-3, max_grad_norm=1.0, progress=False)
        sync(device)
        times["labkit"].append(time.perf_counter() - t0)
        torch.manual_seed(0)
        model = get_peft_model(lk.load_model(name, device=device)[0], config)
        _, seconds = lk.finetune.trainer_run(model, tok, [], steps, lr=2e-3, batch_size=batch_size,
                                             max_grad_norm=1.0, progress=False, encoded=examples)
        times["Trainer"].append(seconds)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method, after one warm-up")
    ap.add_argument("--trainer-steps", type=int, default=6, help="steps per run in the Trainer comparison")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of labkit and Trainer")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    print(f"batch {args.batch} x {args.seq} tokens, fp32; LoRA and QLoRA: r=8, alpha=16 on {QKVO}; "
          f"QLoRA: NF4 + double quantization on every linear layer but the head\n")

    rows = [measure(m, name, device, batch, args.steps) for m in ("full", "lora", "qlora")]
    full = rows[0]
    mib = 2 ** 20
    print(f"{'method':<7}{'trainable':>13}{'s/step':>8}{'peak MiB':>10}{'process MiB':>13}{'predicted':>11}"
          f"{'pred/peak':>11}{'time/full':>11}{'peak/full':>11}")
    for r in rows:
        print(f"{r['method']:<7}{r['trainable']:>13,}{r['s_per_step']:>8.2f}{r['tracked'] / mib:>10.1f}"
              f"{r['process'] / mib:>13.1f}{r['predicted'] / mib:>11.1f}{r['predicted'] / r['tracked']:>11.3f}"
              f"{r['s_per_step'] / full['s_per_step']:>11.3f}{r['tracked'] / full['tracked']:>11.3f}")
    print("\n(peak MiB: MemTracker's count of every tensor at the peak of one step; process MiB: what the "
          "process held after warm-up above what it held before loading the model, plus its peak extra "
          "during one more step, run after the timed ones (resident memory on a CPU, allocated on CUDA); predicted: lk.memory.predict_peak; the predicted peak "
          "falls in: " + ", ".join(f"{r['method']} {r['phase']}" for r in rows) + ")")
    lora = rows[1]
    worst = max(abs(r["predicted"] / r["tracked"] - 1) for r in rows)
    print(f"\nLoRA peak / full peak: {lora['tracked'] / full['tracked']:.3f}  (aim <= 0.6)")
    print(f"largest |predicted / measured - 1|: {worst:.4f}  (aim <= 0.01)")
    qlora = rows[2]
    bnb_s = bnb_qlora_step(name, device, batch, args.steps)
    print(f"\nQLoRA step: labkit {qlora['s_per_step']:.2f} s, bitsandbytes + peft {bnb_s:.2f} s, "
          f"labkit LoRA {lora['s_per_step']:.2f} s")
    print(f"labkit QLoRA / labkit LoRA: {qlora['s_per_step'] / lora['s_per_step']:.3f}  (aim <= 1.15)")
    print(f"labkit QLoRA / bitsandbytes + peft QLoRA: {qlora['s_per_step'] / bnb_s:.3f}  (aim <= 1.0)")

    t = throughput(name, device, args.batch, args.seq, args.trainer_steps, args.rounds)
    print(f"\n{args.trainer_steps} LoRA steps (peft model, batch {args.batch} x {args.seq}, clipping at 1.0), "
          f"median of {args.rounds}: lk.train.train {t['labkit']:.1f} s, Trainer {t['Trainer']:.1f} s")
    print(f"throughput, labkit loop / Trainer: {t['Trainer'] / t['labkit']:.3f}  (aim >= 0.95)")
    if args.json:
        settings = {**vars(args), "model": name, "device": str(device), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
                    "avx512_bf16": lk.session.cpu_has_avx512_bf16(), "date": time.strftime("%Y-%m-%d")}
        result = {"settings": settings, "methods": {r["method"]: r for r in rows},
                  "ratios": {"lora_time": lora["s_per_step"] / full["s_per_step"],
                             "qlora_time": rows[2]["s_per_step"] / full["s_per_step"],
                             "lora_peak": lora["tracked"] / full["tracked"],
                             "qlora_peak": rows[2]["tracked"] / full["tracked"],
                             "qlora_over_lora_time": qlora["s_per_step"] / lora["s_per_step"],
                             "qlora_over_bnb_peft_time": qlora["s_per_step"] / bnb_s,
                             "worst_prediction_error": worst,
                             "labkit_over_trainer_throughput": t["Trainer"] / t["labkit"]},
                  "trainer_seconds": t, "bnb_peft_qlora_s_per_step": bnb_s}
        lk.data.write_json(args.json, result)
        print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
