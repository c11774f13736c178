"""The rank and alpha laboratory (chapter 7): short LoRA runs at chosen (r, alpha, learning rate,
rsLoRA, targets), the sweeps that reproduce the LoRA paper's findings at small scale, and the
paper's subspace similarity. The sweeps are cached in data/results/rank_lab.json by
scripts/run_rank_lab.py; the chapter and its widgets read that file."""
import json
from pathlib import Path

import torch

from . import data, text
from .lora import QKVO, count_parameters, inject_lora, lora_layers, lora_scaling
from .memory import LLAMA_LINEARS, config_counts
from .train import train

QV = ["q_proj", "v_proj"]
ALL = list(LLAMA_LINEARS)
TARGET_SETS = {"q,v": QV, "q,k,v,o": QKVO, "all": ALL}


def __getattr__(name):                    # lab.RESULTS: the cache's path, found with the data folder
    if name == "RESULTS":
        from .data import data_dir
        return data_dir() / "results" / "rank_lab.json"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def scaling(r, alpha, rslora=False):
    """The factor LoRA multiplies B A by: alpha / r, or rsLoRA's alpha / sqrt(r)."""
    if r < 1:
        raise ValueError(f"rank r must be >= 1, got {r}")
    return lora_scaling(alpha, r, rslora)


def step_scale(r, alpha, lr, rslora=False):
    """scaling x r x lr: the size of LoRA's early updates. Adam moves each of B's r columns by about
    lr per step, so B A grows by about r lr per step, times the scaling: alpha lr for plain LoRA,
    whatever r; alpha sqrt(r) lr with rsLoRA."""
    return scaling(r, alpha, rslora) * r * lr


def lora_params_per_layer(config, targets, r):
    """Trainable LoRA parameters in one decoder layer: r (in + out) for each target projection."""
    return config_counts(config, "lora", targets, r)["trainable"] // config.num_hidden_layers


def equal_budget_rank(config, targets, budget):
    """The rank whose LoRA on `targets` comes closest to `budget` parameters per layer (at least 1)."""
    per_rank = lora_params_per_layer(config, targets, 1)
    return max(1, round(budget / per_rank))


def run_key(r, alpha, lr, rslora=False, targets="q,v"):
    """The name of one configuration in the cache, e.g. 'q,v r=8 a=16 lr=0.002'. rsLoRA at r = 1
    scales exactly as LoRA does, so it is the same run."""
    rs = " rs" if rslora and r != 1 else ""
    return f"{targets} r={r} a={alpha:g} lr={lr:g}{rs}"


def lora_run(model, tok, rows, r=8, alpha=16, lr=2e-3, targets="q,v", rslora=False, steps=12, batch_size=8,
             seed=0, score=True, progress=False, on_step=None):
    """Inject LoRA into `model` (in place), train it on rows["train"] and measure: the loss of every
    step, the teacher-forced answer loss on rows["test"] and, with `score`, exact match of greedy
    answers to rows["test"]. The batches follow `seed`, the adapters' random start `seed + r`, so two
    runs with the same settings give the same losses, and two ranks do not start from the same
    rows (with one seed, the first module's A at r = 8 would be the first 8 rows of its A at r = 64,
    and the subspaces would overlap by construction). Returns (result dict, model)."""
    names = TARGET_SETS[targets] if isinstance(targets, str) else list(targets)
    label = targets if isinstance(targets, str) else ",".join(t.replace("_proj", "") for t in names)
    torch.manual_seed(seed + r)
    model = inject_lora(model, names, r=r, alpha=alpha, use_rslora=rslora)
    trainable, _ = count_parameters(model)
    losses = train(model, text.batches(tok, rows["train"], batch_size, seed=seed), steps, lr=lr, progress=progress,
                   after_step=None if on_step is None else lambda step: on_step(step + 1, steps))
    result = {"key": run_key(r, alpha, lr, rslora, label), "r": r, "alpha": alpha, "lr": lr, "rslora": rslora,
              "targets": label, "scaling": scaling(r, alpha, rslora), "trainable": trainable, "steps": steps,
              "losses": losses, "test_loss": text.answer_loss(model, tok, rows["test"], batch_size=32)}
    if score:
        answers = text.generate(model, tok, [x["prompt"] for x in rows["test"]], batch_size=64)
        result["exact_match"] = data.exact_match(answers, [x["response"] for x in rows["test"]])
    return result, model


def subspace_similarity(A1, A2):
    """The LoRA paper's normalised subspace similarity (section 7.2), for every i <= r1, j <= r2:

        phi(i, j) = || U1[:, :i]^T U2[:, :j] ||_F^2 / min(i, j)

    where U1, U2 are the right-singular vectors of A1 (r1 x d) and A2 (r2 x d), best first.
    1 means the top-i directions of one lie inside the top-j directions of the other; 0 means
    they are orthogonal. Returns an (r1, r2) tensor."""
    if A1.dim() != 2 or A2.dim() != 2 or A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 must be (r, d) with the same d, got {tuple(A1.shape)} and {tuple(A2.shape)}")
    V1 = torch.linalg.svd(A1.detach().cpu().double(), full_matrices=False).Vh   # (r1, d), rows are directions
    V2 = torch.linalg.svd(A2.detach().cpu().double(), full_matrices=False).Vh
    overlap = (V1 @ V2.T) ** 2                                      # (r1, r2): squared cosines
    cum = overlap.cumsum(0).cumsum(1)                                # sum over the top-i and top-j
    i = torch.arange(1, A1.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, A2.shape[0] + 1, dtype=torch.float64)[None, :]
    return (cum / torch.minimum(i, j)).float()


def random_similarity(r1, r2, d, seed=0):
    """subspace_similarity of two random Gaussian (r, d) matrices: what 'no shared direction' looks
    like (about max(i, j) / d)."""
    g = torch.Generator().manual_seed(seed)
    return subspace_similarity(torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g))


def adapter_factors(model):
    """{module name: (A, B)} of a LoRA model, detached copies."""
    return {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in lora_layers(model)}


def load_results(path=None):
    """The cached sweeps: {"settings": ..., "runs": {key: result}, "similarity": ...}."""
    path = Path(path) if path is not None else __getattr__("RESULTS")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: make it with python scripts/run_rank_lab.py (about 55 min on 2 cores)")
    return json.loads(path.read_text())
