"""LoRA trained with data parallelism through accelerate: every process holds the whole model,
reads its share of each global batch, and DDP averages the gradients before each AdamW step.

    accelerate launch --multi_gpu --num_processes 2 scripts/ddp_lora.py --out run2   # 2 processes (gloo on a CPU)
    python scripts/ddp_lora.py --out run1                                        # 1 process, same batches

With every token in the loss and equal shares, the mean of the shares' mean losses is the global
batch's mean loss, so both runs take the same steps: tests/test_ddp.py checks the losses and the
adapter weights against each other. A toy Llama (random weights) keeps it to seconds on a CPU;
--model smollm2 trains the real one.
"""
import argparse
import json
from pathlib import Path

import torch

import labkit as lk


def global_batch(step, size, seq, vocab):
    """The step's whole batch, the same in every process: every token counts in the loss."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (size, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def main():
    try:
        from accelerate import Accelerator
    except ImportError:
        raise SystemExit("this route needs accelerate: pip install accelerate (the workbook's set-up installs it)")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for losses.json and adapter.safetensors")
    ap.add_argument("--model", default="tiny", help="'tiny' (a toy Llama) or 'smollm2'")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="the global batch, split over the processes")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    if args.batch % world:
        raise SystemExit(f"a global batch of {args.batch} does not split evenly over {world} processes")
    model = lk.tiny_llama(seed=0) if args.model == "tiny" else lk.load_model(args.model)[0]
    torch.manual_seed(0)                                      # the same A in every process
    lk.inject_lora(model, lk.lora.QKVO, r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, opt = acc.prepare(model, opt)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = global_batch(step, args.batch, args.seq, model.config.vocab_size if world == 1
                             else acc.unwrap_model(model).config.vocab_size)
        share = {k: v[rank::world].to(acc.device) for k, v in batch.items()}   # this process's rows
        loss = model(**share).loss
        acc.backward(loss)                                     # DDP: the gradients are averaged here
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(acc.reduce(loss.detach(), reduction="mean").item())
    if acc.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(json.dumps({"processes": world, "losses": losses}))
        lk.save_adapter(acc.unwrap_model(model), args.out / "adapter.safetensors")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
