"""LoRA trained with data parallelism through accelerate: every process holds the whole model,
reads its share of each global batch, and DDP averages the gradients before each AdamW step.

    accelerate launch --multi_gpu --num_processes 2 scripts/ddp_lora.py --out run2   # 2 processes (gloo on a CPU)
    python scripts/ddp_lora.py --out run1                                        # 1 process, same batches

With every token in the loss and equal shares, the mean of the shares' mean losses is the global
batch's mean loss, so both runs take the same steps: tests/test_ddp.py checks the losses and the
adapter weights against each other. A toy Llama (random weights) keeps it to seconds on a CPU;
--model smollm2 trains the real one.

    accelerate launch --multi_gpu --num_processes 2 scripts/ddp_lora.py --fsdp --out run3   # sharded (FSDP2)

--fsdp shards every decoder layer and the rest of the model over the processes with torch's
fully_shard (FSDP2: each process keeps 1/N of every weight, gathers a layer whole only while it
computes, and reduce-scatters the gradients). The script calls fully_shard itself, because
accelerate 1.15 and 1.16 run their FSDP plugin on GPUs only: on a CPU, `accelerate launch --use_fsdp` falls
back to DDP. The losses file records the bytes of weights each process holds. Either way the
adapter is saved with lk.save_adapter, so lk.load_adapter loads it.
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


def build(name):
    """The model with LoRA on q, k, v and o, with the same A in every process."""
    model = lk.tiny_llama(seed=0) if name == "tiny" else lk.load_model(name)[0]
    torch.manual_seed(0)
    return lk.inject_lora(model, lk.lora.QKVO, r=4, alpha=8)


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
    ap.add_argument("--fsdp", action="store_true", help="shard the model with torch's fully_shard instead of DDP")
    args = ap.parse_args()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    if args.batch % world:
        raise SystemExit(f"a global batch of {args.batch} does not split evenly over {world} processes")
    # On a fresh cache, lk.load_model converts the weights into it: the main process does that first,
    # then the others read its files (instead of every process writing the same files at once).
    with acc.main_process_first():
        model = build(args.model)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sharded = args.fsdp and world > 1
    if sharded:                                               # before the optimizer: it must see the shards
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:                      # each decoder layer gathered on its own
            fully_shard(layer)
        fully_shard(model)                                    # the embeddings, final norm and head
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if not sharded:
        model, opt = acc.prepare(model, opt)
    held_bytes = sum(local(p).numel() * p.element_size() for p in model.parameters())
    model.train()
    losses = []
    for step in range(args.steps):
        batch = global_batch(step, args.batch, args.seq, model.config.vocab_size if world == 1
                             else acc.unwrap_model(model).config.vocab_size)
        share = {k: v[rank::world].to(acc.device) for k, v in batch.items()}   # this process's rows
        loss = model(**share).loss
        acc.backward(loss)                    # DDP: gradients averaged here; FSDP: averaged and scattered
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(acc.reduce(loss.detach(), reduction="mean").item())
    if sharded:                           # every process takes part in gathering each A and B whole
        adapter = {k: v.full_tensor() for k, v in lk.lora_state_dict(model).items()}
    if acc.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(json.dumps({"processes": world, "losses": losses, "sharded": sharded,
                                                          "held_bytes": held_bytes, "full_bytes": full_bytes}))
        if sharded:       # the whole A and B into an unsharded twin (smollm2: loaded once more, here only)
            trained = build(args.model)
            trained.load_state_dict(adapter, strict=False)
        else:
            trained = acc.unwrap_model(model)
        lk.save_adapter(trained, args.out / "adapter.safetensors")
    acc.wait_for_everyone()
    acc.end_training()                    # destroys the process group


def local(p):
    """The part of a parameter this process holds (its shard under FSDP)."""
    return p.to_local() if hasattr(p, "to_local") else p


if __name__ == "__main__":
    main()
