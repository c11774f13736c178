"""Train every PEFT method of chapter 8 (and full fine-tuning) on the people task with the same
budget, and cache one row per method in data/results/peft_family.json for the chapter to read.

    python scripts/run_peft_family.py [--steps 12] [--batch 8] [--only lora ia3 ...]

CPU time on 2 cores: about 25 minutes (each method trains 12 steps of 8 examples, then answers
60 test prompts and 26 probe questions, and times 32 generated tokens). Rows are written as each
method finishes, so an interrupted run keeps what it has; --only re-runs some methods and keeps
the others' rows.
"""
import argparse
import json
import platform
from pathlib import Path

import torch

import labkit as lk

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "peft_family.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*", choices=lk.finetune.METHODS, help="methods to (re-)run")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    old = json.loads(args.out.read_text()) if args.out.exists() and args.only else {"rows": []}
    methods = args.only or list(lk.finetune.METHODS)
    kept = [r for r in old["rows"] if r["method"] not in methods]
    result = {"settings": {"model": name, "steps": args.steps, "batch_size": args.batch, "seed": 0,
                           "r": 8, "alpha": 16, "targets": lk.finetune.QKVO,
                           "learning_rates": lk.finetune.LEARNING_RATES, "device": str(device),
                           "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                           "machine": platform.machine()},
              "rows": kept}
    order = list(lk.finetune.METHODS)

    def save(row):
        row = {k: v for k, v in row.items()}
        result["rows"] = sorted([r for r in result["rows"] if r["method"] != row["method"]] + [row],
                                key=lambda r: order.index(r["method"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{row['method']}: exact match {row['exact_match']:.0%}, probe {row['probe']:.0%}, "
              f"{row['s_per_step']:.1f} s/step", flush=True)

    lk.finetune.compare(methods, on_row=save, name=name, device=device, steps=args.steps,
                        batch_size=args.batch, latency=True)
    lk.finetune.table(result["rows"])


if __name__ == "__main__":
    main()
