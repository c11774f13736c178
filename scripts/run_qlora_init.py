"""Chapter 10's cache: where QLoRA starts (B = 0, LoftQ, PiSSA), measured on SmolLM2.

    python scripts/run_qlora_init.py errors      # every projection's start error; ~10 min on 2 cores
    python scripts/run_qlora_init.py start       # the started models' perplexity, task loss, probe; ~5 min
    OMP_NUM_THREADS=1 python scripts/run_qlora_init.py fair --only qlora_loftq   # and qlora_pissa beside it
    python scripts/run_qlora_init.py summary     # the three parts' tables, from the files

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
    in data/results/peft_fair.json, made on another machine with the code of their day). The
    runs' checkpoint_mib counts the adapter alone: a LoftQ or PiSSA start also needs its base saved.
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


# what the started models and the fair runs' starts are (lk.finetune.prepare: LoftQ with one round)
START_SETTINGS = {"r": 8, "alpha": 16, "targets": list(lk.finetune.QKVO), "quantize": "all-linear",
                  "blocksize": 64, "double_quant": True, "qlora_loftq": "LoftQ, 1 round", "qlora_pissa": "PiSSA"}
IDENTITY = ("model", "torch", "ranks", "rounds", "alpha_over_r", "blocksize", "double_quant", "start")


def settings(device, name):
    return {"model": name, "device": str(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": fair.cpu_name(), "blocksize": 64, "double_quant": True, "ranks": list(RANKS),
            "rounds": list(ROUNDS), "alpha_over_r": 2, "start": START_SETTINGS}


def open_cache(out, device, name):
    """The settings go in a new file; an existing one must have been made with the same ones (IDENTITY),
    else the rows would mix; another machine is noted."""
    new = settings(device, name)
    with locked_json(out) as cache:
        old = cache.setdefault("settings", new)
        changed = [k for k in IDENTITY if old.get(k) != new.get(k)]
        if changed:
            raise SystemExit(f"{out} was made with other settings ({', '.join(changed)}): use --out for a new file")
        here = {k: new[k] for k in ("machine", "cpu_threads", "device")}
        if all(here != {k: m.get(k) for k in here} for m in [old] + old.get("also_ran_on", [])):
            old.setdefault("also_ran_on", []).append(here)


def errors(model, out, device, name):
    open_cache(out, device, name)
    done = dict(fair.read(out).get("errors", {}))
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
    enc = tok(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        return math.exp(model(input_ids=enc["input_ids"], labels=enc["input_ids"]).loss.item())


def start(out, device, name):
    open_cache(out, device, name)
    done = dict(fair.read(out).get("start", {}))
    data, probe = lk.data.load_task("people", splits=("test",)), lk.data.load_probe()
    text = lk.data.model_card_text(2000)
    for label, how in STARTS.items():
        if label in done:
            continue
        t0 = time.perf_counter()
        model, tok = lk.load_model(name, device=device)
        if how is not None:
            lk.qinit.init_qlora(model, lk.finetune.QKVO, r=8, alpha=16, init=how[0], iters=how[1])   # START_SETTINGS
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
    fair.start(args.fair_out, s)
    with locked_json(args.fair_out) as cache:          # not in run_peft_fair's IDENTITY: checked here
        old = cache["settings"].setdefault("start", START_SETTINGS)
        if old != START_SETTINGS:
            raise SystemExit(f"{args.fair_out} was made with other starts ({old}): use --fair-out for a new file")
    data = lk.data.load_task("people", splits=("train", "val") + fair.SPLITS)
    train = fair.make_train(data, lk.data.load_probe(), 8, fair.REPORTED_SEEDS[0], name=name, device=device)
    for method in args.only:
        fair.run_method(method, args.fair_out, train, grids[method], args.steps, fair.SELECTION_SEED, fair.REPORTED_SEEDS,
                        budgets=())


def summary(out, fair_out, steps):
    cache = fair.read(out)
    if cache.get("errors"):
        summarise_errors(cache["errors"])
    if cache.get("start"):
        print(f"\nthe started models (r = 8, alpha = 16 on q, k, v, o; every other linear layer plain NF4); "
              f"probe: 26 questions, 95% bootstrap interval over them")
        probe = lk.data.load_probe()
        for label, row in cache["start"].items():
            lo, hi = lk.stats.bootstrap_interval([lk.data.probe_correct(row["probe_answers"], probe)])
            print(f"{label:<20} perplexity {row['perplexity']:6.1f}  test loss {row['test_loss']:.3f}  "
                  f"probe {row['probe']:.1%} [{lo:.1%}, {hi:.1%}]")
    runs = fair.read(fair_out)
    if runs.get("runs"):
        print(f"\ntrained, {steps} steps of 8 ({fair_out.name}); chosen rate per start: {runs['chosen_lr']}, "
              f"on an edge: {[m for m, e in runs['at_edge'].items() if e]}")
        for m in FAIR_METHODS:
            sel = sorted((r["lr"], r["val_loss"]) for r in runs["runs"]
                         if r["method"] == m and r["stage"] == "select" and r["steps"] == steps)
            print(f"  {m:<12} selection val loss: " + ", ".join(f"{lr:.0e} {v:.4f}" for lr, v in sel))
        for split in fair.SPLITS:
            print(f"\n{split}:")
            rows = lk.stats.method_summary(runs["runs"], runs["chosen_lr"], split=split, steps=steps)
            lk.stats.summary_table(rows)
        for m in FAIR_METHODS:
            probes = [r["probe"] for r in runs["runs"] if r["method"] == m and r["stage"] == "report" and r["steps"] == steps]
            if probes:
                print(f"  {m:<12} probe over seeds: " + ", ".join(f"{p:.1%}" for p in probes)
                      + f" (mean {sum(probes) / len(probes):.1%})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("errors", "start", "fair", "summary"))
    ap.add_argument("--out", type=Path, default=OUT, help="errors' and start's file")
    ap.add_argument("--fair-out", type=Path, default=FAIR_OUT, help="fair's file")
    ap.add_argument("--only", nargs="+", choices=FAIR_METHODS, default=list(FAIR_METHODS[1:]))
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    if args.part == "summary":
        return summary(args.out, args.fair_out, args.steps)
    device, name = lk.setup(seed=0)
    if args.part == "fair":
        return fair_runs(args, device, name)
    out = args.out
    if args.part == "errors":
        model, _ = lk.load_model(name, device=device)
        return errors(model, out, device, name)
    return start(out, device, name)


if __name__ == "__main__":
    main()
