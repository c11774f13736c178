"""Chapter 8's comparison of PEFT methods, made fair: the same search for every method, a
selection seed kept out of the reported scores, a larger test set, intervals, and longer budgets.
Every run goes to data/results/peft_fair.json (peft_family.json is left as it is).

    OMP_NUM_THREADS=1 python scripts/run_peft_fair.py [--only lora ia3 ...] [--seeds 0 1 2]
        [--selection-seed 100] [--steps 12] [--batch 8] [--budgets 24 48] [--plan]

For each method (lk.finetune.METHODS, or those named by --only):
1. Selection, seed 100 only: 12 steps of 8 examples at each of the five rates of
   lk.finetune.FAIR_GRID[method] (half a decade apart, the same count for every method, no edge
   extension: a rate chosen on an edge is recorded in `at_edge`, not searched past). The chosen
   rate has the lowest validation loss on the 40 validation examples, the task's cross-entropy
   alone (lk.text.answer_loss from the logits: AdaLoRA's orthogonality regulariser is not in it).
   A diverged run (NaN) never wins. These runs are not scored on the test sets.
2. Reported runs: the chosen rate with seeds 0, 1 and 2 (never the selection seed), each scored
   on the 60-row test split (chapters 3 and 6's, for continuity) and on test_large (300 rows,
   the held-out templates 8-9, data/people/make_people.py): exact match, per-field accuracy and
   the per-example correct/incorrect list that lk.stats.bootstrap_interval resamples; plus the
   forgetting probe and the checkpoint size. Peak memory and latency per token are measured on
   the first reported seed's run only (they do not depend on the seed).
3. Budgets: the chosen rate trained for 24 and 48 steps, seed 0 only (one seed: these runs show
   whether a method below 80% is short of steps, not a ranking; their exact match has an
   interval over test examples only), scored like the reported runs but without probe or memory.
   The 12-step point of that curve is the seed-0 reported run.
Only the validation set chooses; the test sets are reported. lk.stats.method_summary turns the
file into one row per method (mean over seeds, 95% interval over seeds and examples, min/max,
the methods it cannot be told apart from).

Runs: 12 methods x 5 rates = 60 selection runs (720 steps), 12 x 3 seeds = 36 reported runs (432
steps), 12 x 2 budgets = 24 budget runs (12 x (24 + 48) = 864 steps): 120 trainings, 2016 steps.
CPU time at one thread per process, estimated from the first cache (peft_family.json: 6.6 to
24.5 s per step of 8 examples, mean 9.9; its scoring of 60 test answers, 26 probe answers and a
test loss took about a minute, so about 1.4 answers a second at batch 64):
  training      2016 steps x 10 s                              about 5.6 h  (3.9 to 11 h)
  validation    120 validation losses of 40 rows, ~10 s each   about 0.3 h
  scoring       60 scored runs x 360 answers (test + test_large), 36 x 26 probe answers:
                about 4.3 min a run                            about 4.5 h  (3 to 6 h)
  in all        about 10.5 hours of one-thread CPU (7 to 17), so about 5 to 6 hours with two
                processes on a 2-core machine that nothing else uses (3.5 to 8.5).
Not measured here: the machine was shared while this script was written. Every run records
its own `train_s` and `score_s` (and `wall_s`), so redo the estimate from the first few runs;
`--plan` prints what is left.

Two processes can share the work: `--only` with different methods, OMP_NUM_THREADS=1 each; they
take turns writing the file (a lock, an atomic replace: the file is valid JSON after every run;
data/results/README.md gives two --only groups of about equal time).
A run already in the file is not redone, so an interrupted run resumes where it stopped. The
settings (grids, seeds, budgets, model, torch version, machine) are recorded in the file; a rerun
with other settings that change results (steps, batch, grids, selection seed, torch) is refused
rather than mixed in.
"""
import argparse
import gc
import json
import math
import os
import platform
import time
from pathlib import Path

from labkit.data import locked_json

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "peft_fair.json"
SELECTION_SEED = 100
REPORTED_SEEDS = (0, 1, 2)
BUDGETS = (24, 48)
SPLITS = ("test", "test_large")
# settings that change the results: a rerun that differs in one of them is refused
IDENTITY = ("model", "steps", "batch_size", "selection_seed", "grids", "r", "alpha", "targets", "virtual_tokens",
            "bottleneck", "prompt_init", "init_text", "splits", "torch")




def start(path, settings):
    """Create the cache with `settings`, or check an existing one was made with the same ones
    (IDENTITY); seeds and budgets may grow, and another machine is noted, not refused."""
    with locked_json(path) as cache:
        if not cache:
            cache.update(settings=settings, chosen_lr={}, at_edge={}, runs=[])
            return
        old = cache["settings"]
        changed = [k for k in IDENTITY if old.get(k) != settings.get(k)]
        if changed:
            raise SystemExit(f"{path} was made with other settings ({', '.join(changed)}: "
                             f"{[old.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} now); "
                             "use --out for a new file, or delete it to start again")
        old["seeds"] = sorted(set(old["seeds"]) | set(settings["seeds"]))
        old["budgets"] = sorted(set(old["budgets"]) | set(settings["budgets"]))
        here = {k: settings[k] for k in ("machine", "cpu_threads", "device")}
        if all(here != {k: m.get(k) for k in here} for m in [old] + old.get("also_ran_on", [])):
            old.setdefault("also_ran_on", []).append(here)


def key(row):
    return (row["method"], row["stage"], row["lr"], row["seed"], row["steps"])


def read(path):
    """The file as it is ({} if there is none yet): no lock needed, a writer replaces it whole."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def cached(path, **match):
    """The run in the file with these method, stage, lr, seed and steps, or None."""
    want = tuple(match[k] for k in ("method", "stage", "lr", "seed", "steps"))
    return next((r for r in read(path).get("runs", []) if key(r) == want), None)


def save(path, row):
    with locked_json(path) as cache:
        cache["runs"] = [r for r in cache["runs"] if key(r) != key(row)] + [row]


def finite(loss):
    return loss if loss is not None and math.isfinite(loss) else math.inf


def choose(runs, method, grid, seed, steps):
    """(rate, at_edge): the rate of `grid` whose selection run (seed `seed`) has the lowest
    validation loss, and whether it is the grid's first or last. Every rate must have its run."""
    losses = {}
    for r in runs:
        if r["method"] == method and r["stage"] == "select" and r["seed"] == seed and r["steps"] == steps:
            losses[r["lr"]] = finite(r["val_loss"])
    missing = [lr for lr in grid if lr not in losses]
    if missing:
        raise ValueError(f"{method}: no selection run yet at {missing}")
    if all(math.isinf(losses[lr]) for lr in grid):
        raise ValueError(f"{method}: every selection run diverged; widen its grid downwards")
    best = min(grid, key=lambda lr: losses[lr])
    order = sorted(grid)
    return best, best in (order[0], order[-1])


def run_method(method, path, train, grid, steps=12, selection_seed=SELECTION_SEED, seeds=REPORTED_SEEDS,
               budgets=BUDGETS, log=print):
    """Selection, reported seeds and budgets for one method (see the module docstring), skipping
    every run already in the file at `path` and saving each new one as it finishes.
    `train(method, lr, seed, steps, stage)` trains and scores one run and returns its row (JSON:
    val_loss; scored stages also scores); run_method adds the run's key to it."""
    if selection_seed in seeds:
        raise ValueError(f"the selection seed {selection_seed} must not be a reported seed {list(seeds)}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"{method}: the grid repeats a rate: {grid}")

    def do(stage, lr, seed, n):
        if cached(path, method=method, stage=stage, lr=lr, seed=seed, steps=n) is not None:
            return False
        t0 = time.perf_counter()
        row = train(method, lr, seed, n, stage)
        row.update(method=method, stage=stage, lr=lr, seed=seed, steps=n, wall_s=time.perf_counter() - t0)
        if "val_loss" not in row or (stage != "select" and "scores" not in row):
            raise ValueError(f"train() returned no {'val_loss' if 'val_loss' not in row else 'scores'} for {key(row)}")
        save(path, row)
        em = ", ".join(f"{s} {v['exact_match']:.1%}" for s, v in row.get("scores", {}).items())
        log(f"{method:<17} {stage:<6} lr {lr:.0e} seed {seed:>3} steps {n:>2}: val loss {row['val_loss']:.4f}"
            + (f", {em}" if em else ""))
        gc.collect()
        return True

    for lr in grid:                                                # 1. selection
        do("select", lr, selection_seed, steps)
    with locked_json(path) as cache:
        best, edge = choose(cache["runs"], method, grid, selection_seed, steps)
        cache["chosen_lr"][method], cache["at_edge"][method] = best, edge
    if edge:
        log(f"{method}: the chosen rate {best:.0e} is on an edge of its grid {grid} (kept: every method gets 5)")
    for seed in seeds:                                             # 2. reported seeds at the chosen rate
        do("report", best, seed, steps)
    for n in budgets:                                              # 3. longer budgets, the first seed only
        do("budget", best, seeds[0], n)
    return best


def pending(path, methods, grids, steps=12, selection_seed=SELECTION_SEED, seeds=REPORTED_SEEDS, budgets=BUDGETS):
    """[(method, stage, lr or None, seed, steps)] not in the file yet (lr None: not chosen yet)."""
    cache = read(path)
    have, chosen = {key(r) for r in cache.get("runs", [])}, cache.get("chosen_lr", {})
    todo = []
    for m in methods:
        todo += [(m, "select", lr, selection_seed, steps) for lr in grids[m]
                 if (m, "select", lr, selection_seed, steps) not in have]
        lr = chosen.get(m)
        todo += [(m, "report", lr, s, steps) for s in seeds if (m, "report", lr, s, steps) not in have]
        todo += [(m, "budget", lr, seeds[0], n) for n in budgets if (m, "budget", lr, seeds[0], n) not in have]
    return todo


def scores(model, tok, splits, keep_answers):
    """{split: exact_match, fields, correct (a boolean per example), and (keep_answers) answers}."""
    import labkit as lk
    out = {}
    for split, rows in splits.items():
        answers = lk.text.generate(model, tok, [r["prompt"] for r in rows], batch_size=64)
        refs = [r["response"] for r in rows]
        correct = [a.strip() == r.strip() for a, r in zip(answers, refs)]      # lk.data.exact_match, per example
        out[split] = {"exact_match": sum(correct) / len(correct), "fields": lk.data.field_accuracy(answers, refs),
                      "correct": correct}
        if keep_answers:
            out[split]["answers"] = answers
    return out


def make_train(data, probe, batch_size, first_seed, name="smollm2", device="cpu", load=None):
    """The `train` that run_method calls: lk.finetune.run on `data` ({split: rows}: train, val and
    SPLITS), validation loss always; scored stages add scores(), reported ones the probe and the
    checkpoint size, and the first reported seed's run peak memory and latency. `load()`, if given,
    returns a fresh (model, tok) for each run (a test passes a toy model); else SmolLM2 by `name`."""
    import labkit as lk

    def train(method, lr, seed, steps, stage):
        measure = stage == "report" and seed == first_seed           # peak memory and latency: once
        model, tok = load() if load is not None else (None, None)
        t0 = time.perf_counter()
        row = lk.finetune.run(method, rows=data, probe=probe, name=name, device=device, steps=steps,
                              batch_size=batch_size, lr=lr, seed=seed, progress=False, scoring="val",
                              measure_peak=measure, model=model, tok=tok)
        model, tok = row.pop("model"), row.pop("tok")
        row["train_s"] = time.perf_counter() - t0
        if stage != "select":
            t0 = time.perf_counter()
            row["scores"] = scores(model, tok, {s: data[s] for s in SPLITS}, keep_answers=seed == first_seed)
            if stage == "report":
                answers = lk.text.generate(model, tok, [r["prompt"] for r in probe], batch_size=64)
                row["probe"] = lk.data.probe_score(answers, probe)
                row["checkpoint_mib"] = lk.finetune.checkpoint_bytes(model, method) / 2**20
                if measure:
                    row["ms_per_token"] = 1000 * lk.finetune.latency_per_token(model, tok, data["test"][0]["prompt"])
            row["score_s"] = time.perf_counter() - t0
        del model, tok
        return row

    return train


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{platform.machine()} {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(REPORTED_SEEDS), help="reported seeds")
    ap.add_argument("--selection-seed", type=int, default=SELECTION_SEED)
    ap.add_argument("--budgets", type=int, nargs="*", default=list(BUDGETS), help="longer budgets, first seed only")
    ap.add_argument("--out", type=Path, default=OUT)
    import labkit as lk
    ap.add_argument("--only", nargs="+", choices=lk.finetune.METHODS, help="methods to run (the others' runs are kept)")
    ap.add_argument("--plan", action="store_true", help="print the runs not yet in the file, and stop")
    args = ap.parse_args()
    if args.selection_seed in args.seeds:
        ap.error(f"--selection-seed {args.selection_seed} must not be one of --seeds {args.seeds}")
    methods = args.only or list(lk.finetune.METHODS)
    grids = lk.finetune.FAIR_GRID
    if args.plan:
        todo = pending(args.out, methods, grids, args.steps, args.selection_seed, args.seeds, args.budgets)
        for t in todo:
            print(*t)
        print(f"{len(todo)} runs left, {sum(t[4] for t in todo)} training steps")
        return
    import torch
    device, name = lk.setup(seed=0)
    settings = {"model": name, "steps": args.steps, "batch_size": args.batch, "seeds": args.seeds,
                "selection_seed": args.selection_seed, "budgets": args.budgets, "budget_seeds": args.seeds[:1],
                "grids": grids, "r": 8, "alpha": 16, "targets": list(lk.finetune.QKVO), "virtual_tokens": 16,
                "bottleneck": 16, "prompt_init": "text", "init_text": lk.finetune.INIT_TEXT,
                "splits": {"select": "val (40 rows)", "report": {s: n for s, n in zip(SPLITS, (60, 300))}},
                "selection": "lowest validation task loss (answer tokens' cross-entropy from the logits) of the "
                             "selection-seed runs; no edge extension",
                "interval": "lk.stats.bootstrap_interval: 95%, seeds then examples, 10000 replicates, seed 0",
                "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                "machine": cpu_name(), "cores": os.cpu_count(),
                "python": platform.python_version(), "started": time.strftime("%Y-%m-%d")}
    start(args.out, settings)
    data = lk.data.load_task("people", splits=("train", "val") + SPLITS)
    probe = lk.data.load_probe()

    train = make_train(data, probe, args.batch, args.seeds[0], name=name, device=device)
    for method in methods:
        run_method(method, args.out, train, grids[method], args.steps, args.selection_seed, args.seeds, args.budgets)
    with locked_json(args.out) as cache:
        print("chosen rates:", cache["chosen_lr"], "on an edge:", [m for m, e in cache["at_edge"].items() if e])
        runs, chosen = cache["runs"], cache["chosen_lr"]
    lk.stats.summary_table(lk.stats.method_summary(runs, chosen, steps=args.steps))


if __name__ == "__main__":
    main()
