"""lk.stats (chapter 8): the bootstrap interval of exact match over seeds and test examples, with
cases checkable by hand, and the one-row-per-method summary that says which methods cannot be
told apart."""
import pytest

from labkit import stats


def test_bootstrap_all_right_or_all_wrong_is_a_point():
    assert stats.bootstrap_interval([[True] * 300] * 3) == (1.0, 1.0)
    assert stats.bootstrap_interval([[0] * 60]) == (0.0, 0.0)


def test_bootstrap_of_a_50_50_test_set_matches_the_binomial_width():
    """100 examples, half right, one seed: the interval holds 0.5 and is about 2 x 1.96 x 0.05 wide."""
    lo, hi = stats.bootstrap_interval([[1, 0] * 50])
    assert lo < 0.5 < hi
    assert 0.17 < hi - lo < 0.23, (lo, hi)
    assert (lo + hi) / 2 == pytest.approx(0.5, abs=0.02)


def test_bootstrap_resamples_the_seeds():
    """One seed all right and one all wrong: resampling two seeds gives 0, 0.5 or 1 (1/4, 1/2,
    1/4), so the 95% interval is [0, 1]. Resampling examples alone would give exactly [0.5, 0.5]."""
    assert stats.bootstrap_interval([[1] * 50, [0] * 50]) == (0.0, 1.0)


def test_bootstrap_draws_the_same_examples_for_every_seed():
    """Seeds that agree example by example add no information about the examples: two identical
    seeds give the one seed's interval, not one sqrt(2) narrower (drawing examples apart per seed)."""
    one = stats.bootstrap_interval([[1, 0] * 50])
    two = stats.bootstrap_interval([[1, 0] * 50, [1, 0] * 50])
    assert two == one


def test_bootstrap_is_deterministic_and_checks_its_input():
    import random
    rng = random.Random(0)
    x = [[rng.random() < 0.8 for _ in range(300)] for _ in range(3)]
    a = stats.bootstrap_interval(x)
    assert a == stats.bootstrap_interval(x)
    assert a[0] < sum(map(sum, x)) / 900 < a[1]
    assert stats.bootstrap_interval(x, level=0.5)[1] - stats.bootstrap_interval(x, level=0.5)[0] < a[1] - a[0]
    with pytest.raises(ValueError, match="same examples"):
        stats.bootstrap_interval([[1, 0], [1]])
    with pytest.raises(ValueError, match="no seeds"):
        stats.bootstrap_interval([])
    with pytest.raises(ValueError, match="booleans"):
        stats.bootstrap_interval([[0.5, 1]])


def test_overlap():
    assert stats.overlap((0.1, 0.3), (0.3, 0.5)) and stats.overlap((0.2, 0.4), (0.1, 0.5))
    assert not stats.overlap((0.1, 0.29), (0.3, 0.5)) and not stats.overlap((0.6, 0.7), (0.1, 0.5))


def scored(method, lr, seed, correct, steps=12, stage="report"):
    return {"method": method, "lr": lr, "seed": seed, "steps": steps, "stage": stage,
            "scores": {"test_large": {"correct": correct, "exact_match": sum(correct) / len(correct)}}}


def test_method_summary_rows_and_ties():
    """lora and dora (90% and 88%, 300 examples) cannot be told apart; both are apart from ia3
    (50%). Only the chosen rate's reported runs count: not another rate, budget or selection run."""
    def seeds(method, lr, rights):
        return [scored(method, lr, s, [1] * n + [0] * (300 - n)) for s, n in zip((0, 1, 2), rights)]
    runs = (seeds("lora", 3e-3, [270, 265, 275]) + seeds("dora", 3e-3, [264, 264, 264])
            + seeds("ia3", 1e-2, [150, 150, 150]) + seeds("ia3", 3e-2, [300, 300, 300])         # not chosen
            + [scored("lora", 3e-3, 0, [0] * 300, steps=48, stage="budget"),
               {"method": "lora", "lr": 3e-3, "seed": 100, "steps": 12, "stage": "select", "val_loss": 0.1}])
    rows = stats.method_summary(runs, {"ia3": 1e-2, "dora": 3e-3, "lora": 3e-3, "prefix": 1e-3})   # prefix: no runs
    assert [r["method"] for r in rows] == ["lora", "dora", "ia3"]
    lora, dora, ia3 = rows
    assert lora["exact_match"] == pytest.approx(0.9) and (lora["em_min"], lora["em_max"]) == (265 / 300, 275 / 300)
    assert lora["seeds"] == [0, 1, 2] and lora["n_examples"] == 300
    assert lora["interval"][0] < 0.9 < lora["interval"][1]
    assert lora["ties"] == ["dora"] and dora["ties"] == ["lora"] and ia3["ties"] == []
    assert ia3["interval"][1] < 0.6
    assert "cannot be told apart" in stats.summary_table(rows, show=False)
    budget = stats.method_summary(runs, {"lora": 3e-3}, steps=48)
    assert budget[0]["exact_match"] == 0.0 and budget[0]["seeds"] == [0]


