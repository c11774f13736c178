"""Chapter 9's three tasks, their adapters and the cached runs (scripts/run_adapters.py): the one
training recipe every adapter follows, the union of the tasks' rows, peft's combinations of the
three adapters that the chapter scores, and where the cached adapters and results are.

lk.serving (the adapters served side by side) re-exports these names (lk.serving.RECIPE, ...).
"""
import torch


TASKS = ("people", "dates", "units")
# One recipe for every task: chapter 3's (r = 8, alpha = 16 on q, k, v, o; AdamW at 2e-3, 20 steps
# of 8 examples). The union adapter sees the three training sets together for 3 x 20 steps.
RECIPE = {"r": 8, "alpha": 16, "lr": 2e-3, "batch_size": 8, "steps": 20, "seed": 0}
# peft's add_weighted_adapter, each with weights [1, 1, 1]: "cat" stacks the three adapters (rank 24,
# exactly the sum of their updates); the others mix the A's and the B's separately ("linear",
# "ties", "dare_linear", "dare_ties": rank 8) or mix the updates and cut them back to rank 8 by SVD ("svd", "ties_svd")
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties")
DENSITY = 0.5                       # the share of entries that TIES and DARE keep
MAX_NEW_TOKENS = 40                 # the longest answer (people) is 35 tokens with its end token


def union_rows(split="train", tasks=TASKS):
    """The rows of every task's `split`, one list (text.batches shuffles it)."""
    from . import data
    return [r for t in tasks for r in data.load_task(t, splits=(split,))[split]]


def train_adapter(model, tok, rows, steps=None, seed=None, progress=True):
    """Inject a LoRA adapter into `model` (RECIPE's settings) and train it on `rows`; returns the losses."""
    from .lora import QKVO, inject_lora
    from .text import batches
    from .train import train
    steps = RECIPE["steps"] if steps is None else steps
    seed = RECIPE["seed"] if seed is None else seed
    torch.manual_seed(seed)
    inject_lora(model, QKVO, r=RECIPE["r"], alpha=RECIPE["alpha"])
    return train(model, batches(tok, rows, RECIPE["batch_size"], seed=seed), steps, lr=RECIPE["lr"],
                 progress=progress)


def folder_bytes(path):
    """Bytes of every file under `path` (a file: its size)."""
    from pathlib import Path
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def results_path():
    from . import data
    return data.data_dir() / "results" / "multi_adapter.json"


def load_results(path=None):
    """The cached runs of scripts/run_adapters.py: settings, losses, sizes, and every adapter's
    answers and exact match on every task's test set."""
    import json
    from pathlib import Path
    path = Path(path) if path is not None else results_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: make it with python scripts/run_adapters.py (about 20 min on 2 cores)")
    return json.loads(path.read_text())


def adapter_dir(name):
    """The cached adapter `name` (a task, or "union"), in peft's layout."""
    from . import data
    return data.data_dir() / "results" / "adapters" / name
