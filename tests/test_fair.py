"""Chapter 8's fair comparison: validation on the task loss alone (AdaLoRA's regulariser kept
out), the five-rate grids, and the selection and resume logic of scripts/run_peft_fair.py run
with a fake trainer (no real training), then once end to end on the toy model.
(lk.stats's interval and summary: tests/test_stats.py.)"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import labkit as lk
from labkit import finetune, stats, text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return lk.load_tokenizer()


@pytest.fixture(scope="module")
def val_rows():
    return lk.data.load_task("people", splits=("val",))["val"][:4]


def tiny(tok, seed=0):
    return lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256, seed=seed)


def returned_loss(model, tok, rows):
    """What answer_loss computed before: the loss the model returns (all rows in one batch, so its
    mean over answer tokens is answer_loss's)."""
    batch = text.collate([text.encode(tok, r["prompt"], r["response"]) for r in rows], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def adalora_regulariser(model):
    """peft's orthogonality term, recomputed: mean over lora_A / lora_B of ||P P^T - I||_F, weighted."""
    terms = []
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0])).item())
    return model.peft_config["default"].orth_reg_weight * sum(terms) / len(terms)


def test_adalora_validation_loss_holds_no_regulariser(tok, val_rows):
    """peft adds AdaLoRA's regulariser to the loss it returns, in eval mode too. The validation
    loss must be the task's cross-entropy: the returned loss minus exactly that regulariser (the
    old answer_loss, which read the returned loss, gave the sum and fails here)."""
    torch.manual_seed(0)
    model = finetune.prepare(tiny(tok), "adalora", r=4, steps=4)
    reg = adalora_regulariser(model)
    assert reg > 1e-3                                   # B starts at zero: ||B^T B - I|| = sqrt(r) per B
    with_reg = returned_loss(model, tok, val_rows)
    ours = text.answer_loss(model, tok, val_rows, batch_size=len(val_rows))
    assert ours == pytest.approx(with_reg - reg, abs=1e-5)
    # the same through run()'s validation (what the learning-rate search selects on)
    people = lk.data.load_task("people", splits=("train",))
    row = finetune.run("adalora", {"train": people["train"][:8], "val": val_rows}, model=tiny(tok), tok=tok, steps=4,
                       batch_size=2, progress=False, scoring="val", measure_peak=False)
    m = row["model"]
    assert row["val_loss"] == pytest.approx(returned_loss(m, tok, val_rows) - adalora_regulariser(m), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "prefix"])
def test_answer_loss_is_unchanged_for_methods_without_a_regulariser(tok, val_rows, method):
    """For the other methods the logits' cross-entropy is the loss the model returns (prompt tuning:
    its logits are longer than the input by its virtual tokens, which answer_loss skips)."""
    torch.manual_seed(0)
    model = finetune.prepare(tiny(tok), method, tok=tok)
    for p in model.parameters():                        # move off the start, where LoRA is the base model
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    by_batch = [text.answer_loss(model, tok, val_rows, batch_size=b) for b in (1, len(val_rows))]
    assert by_batch[1] == pytest.approx(returned_loss(model, tok, val_rows), rel=1e-5)
    assert by_batch[0] == pytest.approx(by_batch[1], rel=1e-5)


# --- the grids --------------------------------------------------------------------------------

def test_fair_grid_gives_every_method_five_rates_around_its_first_grid():
    """Five rates half a decade apart, covering LR_GRID; the first search's best rate
    (peft_family.json, on seed 0's validation loss) lies inside, not on an edge."""
    first = json.loads((ROOT / "data" / "results" / "peft_family.json").read_text())["best_lr"]
    assert set(finetune.FAIR_GRID) == set(finetune.METHODS)
    for method, grid in finetune.FAIR_GRID.items():
        assert len(grid) == 5 and grid == sorted(grid), method
        ratios = [b / a for a, b in zip(grid, grid[1:])]
        assert all(2.99 < q < 3.34 for q in ratios), (method, ratios)              # half a decade apart
        assert grid[0] <= min(finetune.LR_GRID[method]) and max(finetune.LR_GRID[method]) <= grid[-1], method
        assert grid[0] < first[method] < grid[-1], method


# --- scripts/run_peft_fair.py: selection, resumption and the cache, with a fake trainer -------------

def script():
    spec = importlib.util.spec_from_file_location("run_peft_fair", ROOT / "scripts" / "run_peft_fair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRIDS = {"lora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "ia3": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
         "prefix": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}
BEST = {"lora": 3e-3, "ia3": 1e-1, "prefix": 3e-4}          # ia3's: the last rate, an edge


class FakeTrain:
    """Records each call; validation loss lowest at BEST[method]; checks that the cache is valid
    JSON holding every run that finished before this call; can fail after `crash_after` calls."""

    def __init__(self, path, crash_after=None):
        self.path, self.calls, self.crash_after = path, [], crash_after

    def __call__(self, method, lr, seed, steps, stage):
        if self.path.exists():
            cache = json.loads(self.path.read_text())                 # a complete file, never half-written
            assert len(cache["runs"]) == self.finished_before
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise KeyboardInterrupt("the machine went down")
        self.calls.append((method, stage, lr, seed, steps))
        row = {"val_loss": abs(math.log(lr / BEST[method])) + (math.nan if lr == 1e-2 and method == "prefix" else 0),
               "losses": [1.0] * steps}
        if stage != "select":
            row["scores"] = {"test_large": {"correct": [seed % 2 == 0, True], "exact_match": 0.5 + 0.5 * (seed % 2 == 0)}}
        return row

    @property
    def finished_before(self):
        return len(self.calls) + getattr(self, "offset", 0)


def run_all(mod, path, train, methods=("lora", "ia3", "prefix"), **kw):
    mod.start(path, {"seeds": [0, 1, 2], "budgets": [24, 48], "steps": 12, "machine": "x", "cpu_threads": 1,
                     "device": "cpu"})
    return {m: mod.run_method(m, path, train, GRIDS[m], log=lambda *a: None, **kw) for m in methods}


def test_every_method_gets_five_rates_on_the_selection_seed_and_reports_other_seeds(tmp_path):
    mod = script()
    path = tmp_path / "fair.json"
    train = FakeTrain(path)
    chosen = run_all(mod, path, train)
    assert chosen == BEST                                     # lowest validation loss; prefix's NaN never wins
    for m in GRIDS:
        calls = [c for c in train.calls if c[0] == m]
        select = [c for c in calls if c[1] == "select"]
        assert sorted(c[2] for c in select) == GRIDS[m] and {c[3] for c in select} == {100}
        assert sorted(c[3] for c in calls if c[1] == "report") == [0, 1, 2]
        assert sorted((c[3], c[4]) for c in calls if c[1] == "budget") == [(0, 24), (0, 48)]
        assert all(c[2] == BEST[m] and c[3] != 100 for c in calls if c[1] != "select")
        assert all(c[4] == 12 for c in calls if c[1] != "budget")
    cache = json.loads(path.read_text())
    assert cache["chosen_lr"] == BEST and cache["at_edge"] == {"lora": False, "ia3": True, "prefix": False}
    assert len(cache["runs"]) == len(train.calls) == 3 * (5 + 3 + 2)
    rows = stats.method_summary(cache["runs"], cache["chosen_lr"])
    assert [r["seeds"] for r in rows] == [[0, 1, 2]] * 3                  # the selection seed is not among them
    with pytest.raises(ValueError, match="must not be a reported seed"):
        mod.run_method("lora", path, train, GRIDS["lora"], seeds=(0, 100))


def test_a_resumed_run_does_not_redo_finished_runs(tmp_path):
    mod = script()
    path = tmp_path / "fair.json"
    first = FakeTrain(path, crash_after=13)       # lora done (10 runs), ia3 down after 3 of its 5 rates
    with pytest.raises(KeyboardInterrupt):
        run_all(mod, path, first)
    assert len(json.loads(path.read_text())["runs"]) == 13
    assert len(mod.pending(path, list(GRIDS), GRIDS)) == 30 - 13
    second = FakeTrain(path)
    second.offset = 13
    run_all(mod, path, second)
    assert not set(first.calls) & set(second.calls)             # nothing trained twice
    assert len(first.calls) + len(second.calls) == 30 == len(json.loads(path.read_text())["runs"])
    third = FakeTrain(path)
    run_all(mod, path, third)
    assert third.calls == [] and mod.pending(path, list(GRIDS), GRIDS) == []


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    mod = script()
    path = tmp_path / "fair.json"
    base = {"steps": 12, "seeds": [0, 1, 2], "budgets": [24, 48], "machine": "x", "cpu_threads": 1, "device": "cpu",
            "torch": "2.13"}
    mod.start(path, base)
    mod.start(path, {**base, "seeds": [0, 1, 2, 3], "cpu_threads": 2})   # more seeds, another machine: kept
    settings = json.loads(path.read_text())["settings"]
    assert settings["seeds"] == [0, 1, 2, 3] and settings["also_ran_on"] == [{"machine": "x", "cpu_threads": 2,
                                                                              "device": "cpu"}]
    for change in ({"steps": 24}, {"torch": "2.14"}):
        with pytest.raises(SystemExit, match=next(iter(change))):
            mod.start(path, {**base, **change})


def test_choose_needs_every_rate_and_a_finite_loss():
    mod = script()
    runs = [{"method": "lora", "stage": "select", "lr": lr, "seed": 100, "steps": 12, "val_loss": v}
            for lr, v in [(1e-3, 0.3), (3e-3, math.nan), (1e-2, 0.2)]]
    assert mod.choose(runs, "lora", [1e-3, 3e-3, 1e-2], 100, 12) == (1e-2, True)
    with pytest.raises(ValueError, match="no selection run yet"):
        mod.choose(runs, "lora", [1e-3, 3e-3, 1e-2, 3e-2], 100, 12)
    with pytest.raises(ValueError, match="diverged"):
        mod.choose([{**r, "val_loss": math.nan} for r in runs], "lora", [1e-3, 3e-3, 1e-2], 100, 12)


def test_the_real_trainer_on_a_toy_model_writes_a_complete_cache(tmp_path, tok):
    """make_train's lk.finetune.run and scoring, end to end on the toy model and a few rows: every
    scored run keeps a correct/incorrect flag per example of both test sets, the first seed keeps
    its answers and the memory and latency figures, and the file loads into method_summary."""
    mod = script()
    people = lk.data.load_task("people", splits=("train", "val", "test", "test_large"))
    data = {"train": people["train"][:4], "val": people["val"][:2], "test": people["test"][:2],
            "test_large": people["test_large"][:3]}
    probe = lk.data.load_probe()[:2]
    path = tmp_path / "fair.json"
    mod.start(path, {"seeds": [0, 1], "budgets": [3], "steps": 2, "machine": "x", "cpu_threads": 1, "device": "cpu"})
    train = mod.make_train(data, probe, batch_size=2, first_seed=0, load=lambda: (tiny(tok), tok))
    best = mod.run_method("lora", path, train, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], steps=2, seeds=(0, 1), budgets=(3,),
                          log=lambda *a: None)
    cache = json.loads(path.read_text())
    runs = cache["runs"]
    assert len(runs) == 5 + 2 + 1 and cache["chosen_lr"] == {"lora": best}
    assert all("scores" not in r and math.isfinite(r["val_loss"]) for r in runs if r["stage"] == "select")
    for r in (r for r in runs if r["stage"] != "select"):
        assert [len(r["scores"][s]["correct"]) for s in ("test", "test_large")] == [2, 3]
        assert ("answers" in r["scores"]["test_large"]) == (r["seed"] == 0)
    report = {r["seed"]: r for r in runs if r["stage"] == "report"}
    assert report[0]["peak_mib"] > 0 and report[0]["ms_per_token"] > 0 and report[1]["peak_mib"] is None
    assert all(0 <= r["probe"] <= 1 and r["checkpoint_mib"] > 0 for r in report.values())
    assert [r["seeds"] for r in stats.method_summary(runs, cache["chosen_lr"], steps=2)] == [[0, 1]]


def test_main_records_its_settings_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    """The command line end to end with the fake trainer in place of make_train's."""
    import sys
    mod = script()
    path = tmp_path / "fair.json"
    monkeypatch.setattr(lk, "setup", lambda seed=0: ("cpu", "smollm2"))
    monkeypatch.setattr(mod, "make_train", lambda *a, **k: FakeTrain(path))
    monkeypatch.setattr(sys, "argv", ["run_peft_fair.py", "--only", "lora", "--out", str(path)])
    mod.main()
    cache = json.loads(path.read_text())
    s = cache["settings"]
    assert s["grids"] == finetune.FAIR_GRID and s["seeds"] == [0, 1, 2] and s["selection_seed"] == 100
    assert s["budgets"] == [24, 48] and s["torch"] == torch.__version__ and s["machine"] and s["steps"] == 12
    assert len(cache["runs"]) == 10 and cache["chosen_lr"] == {"lora": 3e-3}
    out = capsys.readouterr().out
    assert "chosen rates" in out and "cannot be told apart" in out
    monkeypatch.setattr(sys, "argv", ["run_peft_fair.py", "--out", str(path), "--steps", "24"])
    with pytest.raises(SystemExit, match="other settings"):
        mod.main()
