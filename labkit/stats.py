"""How sure a comparison of exact-match scores can be (chapter 8): a bootstrap interval over test
examples and training seeds, and one row per method that says which methods cannot be told apart.

With 60 test examples one example is 1.7 points of exact match, and a seed can move a score as
much: a difference between two methods means something only when it is larger than what
resampling the examples and the seeds makes of one method's score."""
import numpy as np


def bootstrap_interval(correct, level=0.95, n_boot=10_000, seed=0):
    """A `level` percentile interval of exact match, bootstrapped over seeds and test examples.

    `correct`: one list per training seed of per-example booleans (1 = the answer matched), all
    on the same test examples in the same order. Each of the `n_boot` replicates draws the seeds
    with replacement, then the examples with replacement, and scores the mean of the drawn seeds
    on the drawn examples. The examples are drawn once per replicate and used for every drawn
    seed, because every seed answered the same examples: an easy example is easy for all of them,
    and drawing examples apart per seed would count 3 x 300 answers as 900 independent ones (an
    interval about sqrt(3) too narrow when the seeds agree). With one seed it is the plain
    bootstrap over examples. A fixed `seed` makes the interval the same on every call.
    Returns (low, high)."""
    x = _matrix(correct)
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    S, N = x.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // (S * N))                 # replicates per batch: bounded memory
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        seeds = rng.integers(0, S, size=(b, S))
        examples = rng.integers(0, N, size=(b, N))
        drawn = x[seeds[:, :, None], examples[:, None, :]]           # (b, S, N)
        means[start:start + b] = drawn.mean(axis=(1, 2))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _matrix(correct):
    rows = [list(c) for c in correct]
    if not rows or not rows[0]:
        raise ValueError("no seeds or no examples to bootstrap over")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"every seed must be scored on the same examples; got lengths {[len(r) for r in rows]}")
    if any(v not in (0, 1, True, False) for r in rows for v in r):
        raise ValueError("correct must hold booleans (or 0 and 1): one per test example")
    return np.asarray(rows, dtype=float)


def overlap(a, b):
    """Whether two intervals (low, high) share a point: the two scores cannot be told apart.
    (Intervals that do not overlap mean a real difference; overlapping ones are the cautious
    reading: two methods can differ a little even when their intervals touch.)"""
    return a[0] <= b[1] and b[0] <= a[1]


def method_summary(runs, chosen, split="test_large", steps=12, level=0.95, n_boot=10_000, seed=0):
    """One row per method of `chosen` ({method: learning rate}): its scored runs at that rate and
    budget (`runs`: dicts with method, lr, seed, steps and scores[split]["correct"], as
    scripts/run_peft_fair.py writes them; selection runs have no scores and are skipped; `steps`
    keeps one budget: 12, the reported seeds; 24 or 48, the one-seed budget runs), with the mean
    exact match over seeds, the bootstrap interval
    over seeds and examples, the lowest and highest seed, and `ties`: the other methods whose
    interval overlaps this one's (it cannot be told apart from them). Rows are sorted best first.
    A method with no scored run yet is left out."""
    out = []
    for method, lr in chosen.items():
        rs = sorted((r for r in runs if r["method"] == method and r["lr"] == lr and split in r.get("scores", {})
                     and r.get("steps") == steps), key=lambda r: r["seed"])
        if not rs:
            continue
        correct = [r["scores"][split]["correct"] for r in rs]
        per_seed = [sum(c) / len(c) for c in correct]
        out.append({"method": method, "lr": lr, "seeds": [r["seed"] for r in rs], "n_examples": len(correct[0]),
                    "exact_match": sum(per_seed) / len(per_seed), "em_min": min(per_seed), "em_max": max(per_seed),
                    "interval": bootstrap_interval(correct, level, n_boot, seed)})
    out.sort(key=lambda row: -row["exact_match"])
    for row in out:
        row["ties"] = [o["method"] for o in out if o is not row and overlap(row["interval"], o["interval"])]
    return out


def summary_table(rows, show=True):
    """method_summary's rows as text: mean, interval, range over seeds and the methods tied with it."""
    lines = [f"{'method':<17}{'lr':>8}{'EM':>7}{'95% interval':>16}{'seeds min-max':>15}  cannot be told apart from"]
    for r in rows:
        interval = "[{:.1%}, {:.1%}]".format(*r["interval"])
        spread = "{:.0%}-{:.0%}".format(r["em_min"], r["em_max"])
        lines.append(f"{r['method']:<17}{r['lr']:>8.0e}{r['exact_match']:>7.1%}{interval:>16}{spread:>15}  "
                     f"{', '.join(r['ties']) or '-'}")
    out = "\n".join(lines)
    if show:
        print(out)
    return out
