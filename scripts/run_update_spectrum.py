"""Chapter 1's exercise 2, made once: chapter 1's full fine-tune (SmolLM2, the `people` task, 4
examples a step, seed 0, AdamW at 1e-5) run for 40 steps instead of 10, with the spectrum of
every layer's q_proj update measured after 10, 20 and 40 steps, on the way.

    python scripts/run_update_spectrum.py          # about 2.5 minutes on 2 CPU cores

Writes data/results/update_spectrum.json: the settings and the machine, the loss of every step,
and for each measured step the top-8 energy and the rank for 90% of the energy of layer 10's
q_proj update, and the top-8 energy of all 30 layers' q_proj updates. Its 10-step row is chapter
1's own measurement (the same calls, the same run), so chapter 1's printed 0.60 and 80 check it.
Chapter 1's solutions read it instead of training again (LABKIT_RETRAIN=1 trains live instead).
"""
import argparse
import platform
from pathlib import Path

import torch

import labkit as lk
from labkit import lowrank

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "update_spectrum.json"
STEPS, MEASURE_AT, BATCH, LR = 40, (10, 20, 40), 4, 1e-5        # chapter 1's run, four times as long


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    if device.type != "cpu" or name != "smollm2":
        raise SystemExit("chapter 1's solutions read this cache on a CPU with SmolLM2: run it there "
                         "(LABKIT_DEVICE=cpu, no LABKIT_MODEL)")
    model, tok = lk.load_model(name, device=device)
    q = {i: layer.self_attn.q_proj.weight for i, layer in enumerate(model.model.layers)}
    W0 = {i: w.detach().clone() for i, w in q.items()}
    rows = lk.data.load_task("people")["train"]
    measured = {}

    def measure(step):
        if step + 1 in MEASURE_AT:
            S = {i: lowrank.singular_values((w.detach() - W0[i]).cpu()) for i, w in q.items()}
            measured[step + 1] = {"layer10_top8": lowrank.energy_captured(S[10], 8),
                                  "layer10_rank90": lowrank.rank_for_energy(S[10], 0.9),
                                  "top8_by_layer": [lowrank.energy_captured(S[i], 8) for i in sorted(S)]}

    torch.manual_seed(0)                                          # chapter 1's section 5, to the call
    losses = lk.train.train(model, lk.text.batches(tok, rows, batch_size=BATCH, seed=0), steps=STEPS, lr=LR,
                            after_step=measure)
    result = {"settings": {"model": name, "steps": STEPS, "batch_size": BATCH, "lr": LR, "seed": 0,
                           "layer": 10, "device": str(device), "torch": torch.__version__,
                           "cpu_threads": torch.get_num_threads(), "avx512_bf16": lk.session.cpu_has_avx512_bf16(),
                           "machine": platform.machine()},
              "losses": [float(x) for x in losses], "measured": {str(k): v for k, v in measured.items()}}
    lk.data.write_json(args.out, result)
    for k, v in measured.items():
        print(f"after {k:>2} steps: top-8 energy {v['layer10_top8']:.2f}, r for 90% {v['layer10_rank90']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
