"""Chapter 9's cache: one LoRA adapter per task (people, dates, units) and one on their union,
trained on SmolLM2 with one recipe (lk.serving.RECIPE), saved in peft's layout under
data/results/adapters/, and every adapter, peft's combinations of the three, and the base model
scored on every task's test set through peft (PeftModel.load_adapter / set_adapter).

    python scripts/run_adapters.py            # about 20 minutes on 2 CPU cores

Writes data/results/multi_adapter.json: the settings, each adapter's losses and seconds per step,
and for every (adapter, task) pair the 60 answers and their exact match. Chapter 9 reads it,
re-trains the units adapter live and checks it against the cache.
"""
import argparse
import contextlib
import gc
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import labkit as lk
from labkit import serving


def train_one(name, rows, steps):
    model, tok = lk.load_model("smollm2")
    t0 = time.perf_counter()
    losses = serving.train_adapter(model, tok, rows, steps=steps)
    seconds = (time.perf_counter() - t0) / steps
    folder = serving.adapter_dir(name)
    shutil.rmtree(folder, ignore_errors=True)
    lk.save_adapter(model, folder, format="peft")        # names the base "HuggingFaceTB/SmolLM2-135M-Instruct"
    del model
    gc.collect()
    return {"losses": losses, "s_per_step": seconds, "steps": steps, "examples": len(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or serving.results_path()
    device, name = lk.setup(seed=0)
    tasks = {t: lk.data.load_task(t) for t in serving.TASKS}
    result = {"settings": {"model": name, "recipe": serving.RECIPE, "targets": list(lk.lora.QKVO),
                           "union_steps": 3 * serving.RECIPE["steps"], "combinations": serving.COMBINATIONS,
                           "weights": [1.0, 1.0, 1.0], "density": serving.DENSITY,
                           "max_new_tokens": serving.MAX_NEW_TOKENS, "torch": torch.__version__,
                           "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
                           "avx512_bf16": lk.session.cpu_has_avx512_bf16()},
              "training": {}, "scores": {}, "answers": {}}

    # 1. one adapter per task, and one on the union of the three training sets (as many steps in all)
    for t in serving.TASKS:
        print(f"training {t}", flush=True)
        result["training"][t] = train_one(t, tasks[t]["train"], serving.RECIPE["steps"])
    print("training union", flush=True)
    result["training"]["union"] = train_one("union", serving.union_rows(), 3 * serving.RECIPE["steps"])

    # 2. every adapter on every task, through peft: load them all on one base, switch with set_adapter
    from peft import PeftModel
    base, tok = lk.load_model("smollm2")
    model = PeftModel.from_pretrained(base, serving.adapter_dir("people"), adapter_name="people")
    for n in ("dates", "units", "union"):
        model.load_adapter(serving.adapter_dir(n), adapter_name=n)
    torch.manual_seed(0)                                   # DARE drops entries at random
    for c in serving.COMBINATIONS:
        model.add_weighted_adapter(list(serving.TASKS), [1.0, 1.0, 1.0], adapter_name=c, combination_type=c,
                                   density=serving.DENSITY if "ties" in c or "dare" in c else None)
    names = ["base", *serving.TASKS, "union", *serving.COMBINATIONS]
    for n in names:
        result["scores"][n], result["answers"][n] = {}, {}
        for t in serving.TASKS:
            rows = tasks[t]["test"]
            prompts = [r["prompt"] for r in rows]
            if n != "base":
                model.set_adapter(n)
            with model.disable_adapter() if n == "base" else contextlib.nullcontext():
                answers = lk.text.generate(model, tok, prompts, serving.MAX_NEW_TOKENS, batch_size=64)
            result["answers"][n][t] = answers
            result["scores"][n][t] = lk.data.exact_match(answers, [r["response"] for r in rows])
            print(f"{n:>12} on {t:<7} {result['scores'][n][t]:.0%}", flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
