"""Run chapter 7's rank and alpha sweeps with LoRA on SmolLM2 and the people task of chapter 6, and
cache every run in data/results/rank_lab.json for the chapter and its widgets to read.

    python scripts/run_rank_lab.py [--steps 12] [--only rank alpha ...] [--no-score]

CPU time on 2 cores: about 55 minutes for the 39 runs (60 to 120 s each: 12 steps of 8 examples,
then the answer loss on the 60 test rows and their greedy answers). The cache was made in two
passes: 41 min for 30 runs, then 13 min for the 9 of `alpha_rs`.
Runs are written as each finishes and a run already in the file is not repeated, so an interrupted
sweep resumes where it stopped (delete the file, or pass --fresh, to start over).

The sweeps (learning rate 2e-3 unless said; LoRA on q_proj and v_proj unless said):
  rank      r = 1, 2, 4, 8, 16, 64 with alpha = 2r (a fixed alpha / r = 2), as the LoRA paper's Table 6
  fixed     r = 1, 2, 4, 8, 16, 64 with alpha = 16 fixed: LoRA's alpha / r shrinks as r grows
  rslora    the same with rsLoRA's alpha / sqrt(r)
  alpha     r = 8, alpha = 2 ... 128
  lr        r = 8, alpha in {8, 16, 32} x learning rate in {1e-3, 2e-3, 4e-3}
  alpha_rs  alpha in {4, 16, 64} at r = 2, 8 and 64, with and without rsLoRA
  targets   q,v at r = 16, q,k,v,o at r = 8 and all seven linear layers at r = 3: equal budgets
and the subspace similarity (the paper's phi) between the adapters of the rank sweep's r = 8 and
r = 64 runs, for A (the paper's measure) and for B, in every layer.
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

import labkit as lk
from labkit.lab import run_key

SWEEPS = {
    "rank": [dict(r=r, alpha=2 * r) for r in (1, 2, 4, 8, 16, 64)],
    "targets": [dict(r=8, alpha=16, targets="q,k,v,o"), dict(r=3, alpha=6, targets="all")],
    "rslora": [dict(r=r, alpha=16, rslora=True) for r in (1, 2, 4, 8, 16, 64)],
    "fixed": [dict(r=r, alpha=16) for r in (1, 2, 4, 8, 16, 64)],
    "alpha": [dict(r=8, alpha=a) for a in (2, 4, 8, 16, 32, 64, 128)],
    "lr": [dict(r=8, alpha=a, lr=lr) for a in (8, 16, 32) for lr in (1e-3, 2e-3, 4e-3)],
    "alpha_rs": [dict(r=r, alpha=a, rslora=rs) for r in (2, 8, 64) for a in (4, 16, 64) for rs in (False, True)],
}
DEFAULTS = dict(lr=2e-3, rslora=False, targets="q,v")


def configs(names):
    seen, out = set(), []
    for name in names:
        for c in SWEEPS[name]:
            c = {**DEFAULTS, **c}
            key = run_key(c["r"], c["alpha"], c["lr"], c["rslora"], c["targets"])
            if key not in seen:
                seen.add(key)
                out.append((key, c))
    return out


def rounded(t, digits=4):
    return [[round(x, digits) for x in row] for row in t.tolist()]


def similarity(f8, f64):
    """phi between the r = 8 and r = 64 adapters, per module, for A and for B (B's columns are
    its directions in the output space, so B^T plays the part of A)."""
    out = {}
    for name in f8:
        (a8, b8), (a64, b64) = f8[name], f64[name]
        out[name] = {"A": rounded(lk.lab.subspace_similarity(a8, a64)),
                     "B": rounded(lk.lab.subspace_similarity(b8.T, b64.T))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*", choices=list(SWEEPS), help="sweeps to run (default: all)")
    ap.add_argument("--no-score", action="store_true", help="skip exact match (the greedy answers)")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the file")
    ap.add_argument("--out", type=Path, default=lk.lab.RESULTS)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    result = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {"runs": {}}
    result["settings"] = {"model": name, "task": "people", "steps": args.steps, "batch_size": args.batch, "seed": 0,
                          "sweeps": {k: [{**DEFAULTS, **c} for c in v] for k, v in SWEEPS.items()},
                          "device": str(device), "torch": torch.__version__,
                          "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    rows = lk.data.load_task("people")
    todo = configs(args.only or list(SWEEPS))
    factors = {}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=None, separators=(",", ":")) + "\n")

    for n, (key, c) in enumerate(todo, 1):
        need_factors = key in (run_key(8, 16, 2e-3), run_key(64, 128, 2e-3)) and "similarity" not in result
        if key in result["runs"] and not need_factors:
            continue
        t0 = time.perf_counter()
        model, tok = lk.load_model(name, device=device)
        run, model = lk.lab.lora_run(model, tok, rows, steps=args.steps, batch_size=args.batch,
                                     score=not args.no_score, **c)
        run["seconds"] = round(time.perf_counter() - t0, 1)
        result["runs"][key] = run
        if need_factors:
            factors[c["r"]] = lk.lab.adapter_factors(model)
            if len(factors) == 2:
                result["similarity"] = {"pair": [run_key(8, 16, 2e-3), run_key(64, 128, 2e-3)],
                                        "modules": similarity(factors[8], factors[64])}
        save()
        em = f", exact match {run['exact_match']:.0%}" if "exact_match" in run else ""
        print(f"[{n}/{len(todo)}] {key}: final loss {run['losses'][-1]:.3f}, test loss {run['test_loss']:.3f}"
              f"{em} ({run['seconds']:.0f} s)", flush=True)
        del model


if __name__ == "__main__":
    main()
