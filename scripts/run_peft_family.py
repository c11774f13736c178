"""Train every PEFT method of chapter 8 (and full fine-tuning) on the people task with the same
budget: a small learning-rate search per method, then 3 seeds at the best rate. Every run is
kept in data/results/peft_family.json for the chapter to read.

    python scripts/run_peft_family.py [--only lora ia3 ...] [--seeds 0 1 2] [--steps 12] [--batch 8]

1. Search (seed 0): each method trains 12 steps of 8 examples at each rate of its grid
   (lk.finetune.LR_GRID). The best rate has the lowest loss on the 40 validation examples. When it
   sits on an edge of the grid, one more rate beyond that edge is tried (at most two extra). The
   best run's model is kept and scored in full (test set, probe, checkpoint size).
2. Seeds: the best rate again with seeds 1 and 2, scored in full. Peak memory and latency per
   token are measured once per method, on its seed-1 run (the figures do not depend on the rate).
3. `--longer METHOD ...`: a method that stays below 80% exact match trains once more at its best
   rate, seed 0, for 3 times the steps, to tell a short budget from a method that cannot learn
   the task (kept as a run with its own `steps`).

Only the validation set chooses; the test set is reported.

CPU time on 2 cores: about 2 hours in one process (about 60 trainings of 1 to 2 minutes, and 36
full scorings of about a minute). Two processes can share the work (`--only` with different
methods, OMP_NUM_THREADS=1 each; they take turns writing the file); the cache was made that way. A run already in the file is not redone, so an
interrupted run resumes.
"""
import argparse
import gc
import math
import platform
from pathlib import Path

import torch

import labkit as lk

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "peft_family.json"
MAX_EXTRA = 2


def best_lr(runs, method):
    """The searched rate with the lowest validation loss (a diverged run, NaN, never wins)."""
    tried = [r for r in runs if r["method"] == method and r["seed"] == 0]
    return min(tried, key=lambda r: finite(r["val_loss"]))["lr"]


def finite(loss):
    return loss if math.isfinite(loss) else math.inf




def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", choices=lk.finetune.METHODS, help="methods to run (the others' runs are kept)")
    ap.add_argument("--longer", nargs="*", choices=lk.finetune.METHODS, default=[],
                    help="after the search, train these at their best rate for 3 x steps")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    settings = {"model": name, "steps": args.steps, "batch_size": args.batch, "seeds": args.seeds,
                "r": 8, "alpha": 16, "targets": lk.finetune.QKVO, "virtual_tokens": 16, "bottleneck": 16,
                "prompt_init": "text", "init_text": lk.finetune.INIT_TEXT, "lr_grid": lk.finetune.LR_GRID,
                "selection": "lowest validation loss of the seed-0 runs",
                "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                "machine": platform.machine()}
    with lk.data.locked_json(args.out) as result:
        if result.get("settings", {}).get("steps") != args.steps or "runs" not in result:
            result.clear()                                  # another budget, or the old format: start anew
            result.update(settings=settings, runs=[], best_lr={})
    data = lk.data.load_task("people")
    probe = lk.data.load_probe()

    def runs(steps=args.steps):
        with lk.data.locked_json(args.out) as result:
            return [r for r in result["runs"] if r.get("steps", args.steps) == steps]

    def save(row):
        row = {k: v for k, v in row.items() if k not in ("model", "tok")}
        if row["seed"] != 0:
            row.pop("answers", None)
        with lk.data.locked_json(args.out) as result:
            key = lambda r: (r["method"], r["lr"], r["seed"], r.get("steps", args.steps))
            result["runs"] = [r for r in result["runs"] if key(r) != key(row)] + [row]
        done = f", test {row['exact_match']:.0%}, probe {row['probe']:.0%}" if "exact_match" in row else ""
        print(f"{row['method']:<17} lr {row['lr']:.0e} seed {row['seed']}: val loss {row['val_loss']:.3f}"
              f"{done}, {row['s_per_step']:.1f} s/step", flush=True)

    def train(method, lr, seed, steps=args.steps, **kw):
        return lk.finetune.run(method, rows=data, probe=probe, name=name, device=device, steps=steps,
                               batch_size=args.batch, lr=lr, seed=seed, progress=False, **kw)

    for method in args.longer:                                  # 3. a longer run where the budget may be short
        with lk.data.locked_json(args.out) as result:
            best = result["best_lr"][method]
        if not any(r["method"] == method for r in runs(3 * args.steps)):
            row = train(method, best, 0, steps=3 * args.steps, scoring="val", measure_peak=False)
            save(lk.finetune.finish(row, data, probe))
            del row
    for method in ([] if args.longer and args.only is None else args.only or list(lk.finetune.METHODS)):
        mine = [r for r in runs() if r["method"] == method]
        best_row = None                                     # 1. the search, keeping the best model
        tried = {r["lr"] for r in mine if r["seed"] == 0}
        grid = sorted(lk.finetune.LR_GRID[method])
        for extra in range(MAX_EXTRA + 1):
            for lr in grid:
                if lr in tried:
                    continue
                row = train(method, lr, 0, scoring="val", measure_peak=False)
                save(row)
                tried.add(lr)
                if best_row is None or finite(row["val_loss"]) < finite(best_row["val_loss"]):
                    best_row = row
                else:
                    del row
                gc.collect()
            best = best_lr(runs(), method)
            order = sorted(tried)
            if extra == MAX_EXTRA or order[0] < best < order[-1]:
                break
            grid = [float(f"{order[0] ** 2 / order[1]:.0e}")] if best == order[0] else \
                   [float(f"{order[-1] ** 2 / order[-2]:.0e}")]
        with lk.data.locked_json(args.out) as result:
            result["best_lr"][method] = best
        done = next(r for r in runs() if r["method"] == method and r["lr"] == best and r["seed"] == 0)
        if "exact_match" not in done:
            if best_row is None or best_row["lr"] != best:  # an earlier, interrupted search found it
                best_row = train(method, best, 0, scoring="val", measure_peak=False)
            save(lk.finetune.finish(best_row, data, probe))
        del best_row
        gc.collect()
        for seed in args.seeds:                             # 2. more seeds at the best rate
            if seed != 0 and not any(r["method"] == method and r["lr"] == best and r["seed"] == seed for r in runs()):
                row = train(method, best, seed, scoring="val", measure_peak=seed == 1)
                save(lk.finetune.finish(row, data, probe, latency=seed == 1))
                del row
                gc.collect()
    with lk.data.locked_json(args.out) as result:
        print("best learning rates:", result["best_lr"])


if __name__ == "__main__":
    main()
