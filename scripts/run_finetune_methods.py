"""Chapter 6's long runs, made once: the NF4 base model on the forgetting probe, and QLoRA and full
fine-tuning trained and scored with the chapter's budget (12 steps of 8 examples, seed 0), through
the very calls the chapter makes (lk.finetune.run; lk.quantize_model then the probe).

    python scripts/run_finetune_methods.py          # about 4 minutes on 2 CPU cores

Writes data/results/finetune_methods.json: the settings and the machine, the NF4 base's probe
score, and for each method run()'s row without the model (losses, time per step, peak memory of
a measuring step, the test set's 60 answers, exact match and fields, the probe, the checkpoint
size). Chapter 6 reads it on a CPU with SmolLM2, trains the first steps of both methods live and
checks their losses against the cached ones; with LABKIT_RETRAIN=1, on a GPU or with another
model it computes everything itself instead.
"""
import argparse
import platform
from pathlib import Path

import torch

import labkit as lk

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "finetune_methods.json"
STEPS, BATCH = 12, 8                                     # chapter 6's budget


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    if device.type != "cpu" or name != "smollm2":
        raise SystemExit("the chapter reads this cache on a CPU with SmolLM2: run it there (LABKIT_DEVICE=cpu, no LABKIT_MODEL)")
    tok = lk.load_model(name, device=device)[1]
    rows, probe = lk.data.load_task("people"), lk.data.load_probe()
    nf4_base = lk.quantize_model(lk.load_model(name, device=device)[0])
    nf4_probe = lk.data.probe_score(lk.text.generate(nf4_base, tok, [r["prompt"] for r in probe]), probe)
    del nf4_base
    result = {"settings": {"model": name, "steps": STEPS, "batch_size": BATCH, "seed": 0, "device": str(device),
                           "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                           "avx512_bf16": lk.session.cpu_has_avx512_bf16(), "machine": platform.machine()},
              "nf4_base_probe": nf4_probe, "runs": {}}
    for method in ("qlora", "full"):
        row = lk.finetune.run(method, rows, probe, device=device, steps=STEPS, batch_size=BATCH)
        result["runs"][method] = {k: v for k, v in row.items() if k not in ("model", "tok")}
        del row
        print(f"{method}: exact match {result['runs'][method]['exact_match']:.0%}, "
              f"probe {result['runs'][method]['probe']:.0%}", flush=True)
    lk.data.write_json(args.out, result)
    print(f"NF4 base probe {nf4_probe:.0%}; written to {args.out}")


if __name__ == "__main__":
    main()
