"""Chapter 10's cache: where QLoRA starts (B = 0, LoftQ, PiSSA), measured on SmolLM2.

    python scripts/run_qlora_init.py errors      # every projection's start error; ~10 min on 2 cores
    python scripts/run_qlora_init.py start       # the started models' perplexity, task loss, probe; ~5 min
    OMP_NUM_THREADS=1 python scripts/run_qlora_init.py fair --only qlora_loftq   # and qlora_pissa beside it

errors -> data/results/qlora_init.json, "errors": for each of the 30 layers' seven projections (q, k,
    v, o, gate, up, down), ||W - (NF4(base) + s B A)|| / ||W|| for QLoRA's start (B = 0: the plain NF4
    weight), LoftQ with 1 and 5 rounds, and PiSSA, at r = 4, 16 and 64 with alpha = 2r (s = 2, the
    workbook's r = 8, alpha = 16), NF4 with double quantization as the workbook's QLoRA (lk.qinit).
start  -> the same file, "start": the fp32 model, the NF4 model (QLoRA's start) and the models that
    LoftQ (1 and 5 rounds) and PiSSA start, with r = 8, alpha = 16 on q, k, v, o (the workbook's
    QLoRA: every linear layer but the head in NF4): perplexity on chapter 4's 2000 characters of
    model-card text, the answer loss on the 60-row test split, and the forgetting probe (26).
fair   -> data/results/qlora_init_fair.json: QLoRA from LoftQ's and PiSSA's starts trained exactly as
    chapter 8 trains QLoRA (scripts/run_peft_fair.py, whose functions this calls): the five rates of
    lk.finetune.FAIR_GRID["qlora"] with selection seed 100, chosen on the validation task loss,
    then seeds 0, 1 and 2 at the chosen rate, scored on test (60) and test_large (300) and the
    probe. `--only qlora` adds QLoRA from B = 0 to this file too (chapter 8's own QLoRA runs are
    in data/results/peft_fair.json, made on another machine with the code of their day).
Every part resumes: what is in the file is not redone.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_peft_fair as fair  # noqa: E402  (chapter 8's search, selection and scoring)

import labkit as lk  # noqa: E402
from labkit.data import locked_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"
OUT, FAIR_OUT = RESULTS / "qlora_init.json", RESULTS / "qlora_init_fair.json"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS, ROUNDS = (4, 16, 64), (1, 5)
STARTS = {"fp32": None, "nf4 (QLoRA, B = 0)": ("zeros", 1), "LoftQ, 1 round": ("loftq", 1),
          "LoftQ, 5 rounds": ("loftq", 5), "PiSSA": ("pissa", 1)}
FAIR_METHODS = ("qlora", "qlora_loftq", "qlora_pissa")


def settings(device, name):
    return {"model": name, "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": fair.cpu_name(), "blocksize": 64, "double_quant": True}


def errors(model, out, device, name):
    with locked_json(out) as cache:
        cache.setdefault("settings", settings(device, name))
        done = dict(cache.get("errors", {}))
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for proj in PROJECTIONS:
            key = f"{i}.{proj}"
            if key in done:
                continue
            module = layer.self_attn if proj in PROJECTIONS[:4] else layer.mlp
            W = getattr(module, proj).weight.detach()
            t0 = time.perf_counter()
            row = {"shape": list(W.shape), "zeros": lk.qinit.start_error(W, "zeros", 1, 1.0)}
            for r in RANKS:
                s = 2.0                                                  # alpha = 2 r
                row[f"pissa_r{r}"] = lk.qinit.start_error(W, "pissa", r, s)
                for n in ROUNDS:
                    row[f"loftq{n}_r{r}"] = lk.qinit.start_error(W, "loftq", r, s, iters=n)
            row["seconds"] = time.perf_counter() - t0
            done[key] = row
            with locked_json(out) as cache:
                cache.setdefault("errors", {})[key] = row
        print(f"layer {i:>2}: q_proj {done[f'{i}.q_proj']['zeros']:.4f} -> PiSSA r16 "
              f"{done[f'{i}.q_proj']['pissa_r16']:.4f}, LoftQ5 r16 {done[f'{i}.q_proj']['loftq5_r16']:.4f}", flush=True)
    summarise_errors(done)


def summarise_errors(done):
    print(f"\nmean relative start error ||W - (Q + sBA)|| / ||W|| over the {len(done) // len(PROJECTIONS)} layers")
    cols = ["zeros"] + [f"{k}_r{r}" for r in RANKS for k in ("loftq1", "loftq5", "pissa")]
    print(f"{'':<10}" + "".join(f"{c:>13}" for c in cols))
    for proj in PROJECTIONS:
        rows = [v for k, v in done.items() if k.endswith("." + proj)]
        print(f"{proj:<10}" + "".join(f"{sum(r[c] for r in rows) / len(rows):>13.4f}" for c in cols))


def perplexity(model, tok, text):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return math.exp(model(input_ids=enc["input_ids"], labels=enc["input_ids"]).loss.item())


def start(out, device, name):
    with locked_json(out) as cache:
        cache.setdefault("settings", settings(device, name))
        done = dict(cache.get("start", {}))
    data, probe = lk.data.load_task("people", splits=("test",)), lk.data.load_probe()
    text = lk.data.model_card_text(2000)
    for label, how in STARTS.items():
        if label in done:
            continue
        t0 = time.perf_counter()
        model, tok = lk.load_model(name, device=device)
        if how is not None:
            lk.qinit.init_qlora(model, lk.finetune.QKVO, r=8, alpha=16, init=how[0], iters=how[1])
        answers = lk.text.generate(model, tok, [r["prompt"] for r in probe], batch_size=64)
        row = {"init": how, "perplexity": perplexity(model, tok, text),
               "test_loss": lk.text.answer_loss(model, tok, data["test"]),
               "probe": lk.data.probe_score(answers, probe), "probe_answers": answers,
               "seconds": time.perf_counter() - t0}
        done[label] = row
        with locked_json(out) as cache:
            cache.setdefault("start", {})[label] = row
        print(f"{label:<20} perplexity {row['perplexity']:6.1f}  test loss {row['test_loss']:.3f}  "
              f"probe {row['probe']:.1%}  ({row['seconds']:.0f} s)", flush=True)


def fair_runs(args, device, name):
    grids = {m: lk.finetune.FAIR_GRID["qlora"] for m in FAIR_METHODS}     # the same search for each start
    s = {"model": name, "steps": args.steps, "batch_size": 8, "seeds": list(fair.REPORTED_SEEDS),
         "selection_seed": fair.SELECTION_SEED, "budgets": [], "budget_seeds": [], "grids": grids, "r": 8, "alpha": 16,
         "targets": list(lk.finetune.QKVO), "virtual_tokens": None, "bottleneck": None, "prompt_init": None,
         "init_text": None, "splits": {"select": "val (40 rows)", "report": {"test": 60, "test_large": 300}},
         "selection": "as data/results/peft_fair.json (scripts/run_peft_fair.py)",
         "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
         "machine": fair.cpu_name(), "started": time.strftime("%Y-%m-%d")}
    fair.start(args.out, s)
    data = lk.data.load_task("people", splits=("train", "val") + fair.SPLITS)
    train = fair.make_train(data, lk.data.load_probe(), 8, fair.REPORTED_SEEDS[0], name=name, device=device)
    for method in args.only:
        fair.run_method(method, args.out, train, grids[method], args.steps, fair.SELECTION_SEED, fair.REPORTED_SEEDS,
                        budgets=())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("errors", "start", "fair"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="+", choices=FAIR_METHODS, default=list(FAIR_METHODS[1:]))
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    device, name = lk.setup(seed=0)
    if args.part == "fair":
        args.out = args.out or FAIR_OUT
        return fair_runs(args, device, name)
    out = args.out or OUT
    if args.part == "errors":
        model, _ = lk.load_model(name, device=device)
        return errors(model, out, device, name)
    return start(out, device, name)


if __name__ == "__main__":
    main()
