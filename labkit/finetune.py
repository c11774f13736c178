"""Fine-tuning runs end to end (chapter 6; chapter 8 adds methods): make a model ready for a
method, train it while measuring time and memory, score it on the task and the forgetting probe,
and put it all in one row per method, so that methods are compared on the same budget."""
import os
import tempfile
import time

import torch

from . import data, text
from .lora import count_parameters, inject_lora, save_adapter
from .memory import tracked_peak
from .session import amp_dtype
from .train import autocast, input_device, to_device, train

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Learning rates for 12 steps of 8 examples on the people task: full fine-tuning and LoRA were tried
# in chapter 6; the others are the usual ranges of their papers (prompts and IA3's vectors need larger
# ones). AdaLoRA learned nothing in 12 steps at LoRA's 2e-3 (exact match 0%, data/results/README.md):
# its update is a product of three factors, one starting at zero, so it grows slowly at first.
LEARNING_RATES = {"full": 5e-5, "lora": 2e-3, "qlora": 2e-3, "dora": 2e-3, "adalora": 1e-2, "ia3": 1e-2,
                  "serial_adapter": 1e-3, "parallel_adapter": 1e-3, "prefix": 1e-2, "ptuning_v2": 1e-2}
METHODS = tuple(LEARNING_RATES)
FROM_SCRATCH = ("full", "lora", "qlora", "ia3", "serial_adapter", "parallel_adapter")     # the rest via peft


def prepare(model, method, targets=QKVO, r=8, alpha=16, steps=12, virtual_tokens=16, bottleneck=16):
    """Make `model` trainable by `method`; returns the model to train (peft methods wrap it).

    labkit's own: "full" (every weight), "lora", "qlora" (NF4 base + LoRA), "ia3" (rescaling
    vectors on keys, values and the MLP), "serial_adapter" and "parallel_adapter" (bottleneck
    adapters on each layer's o_proj and MLP). Through peft: "dora" (LoRA with a learned magnitude),
    "adalora" (rank r on average, starting from 1.5 r and pruned over `steps`), "prefix"
    (prefix tuning: `virtual_tokens` key/value prefixes at every layer made by an MLP) and
    "ptuning_v2" (the same deep prompts learned directly, without the MLP)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "lora":
        return inject_lora(model, targets, r=r, alpha=alpha)
    if method == "qlora":
        from .qlora import inject_qlora
        return inject_qlora(model, targets, r=r, alpha=alpha)
    if method == "ia3":
        from .adapters import inject_ia3
        return inject_ia3(model)
    if method in ("serial_adapter", "parallel_adapter"):
        from .adapters import inject_adapters
        return inject_adapters(model, method.split("_")[0], bottleneck=bottleneck)
    if method in ("dora", "adalora", "prefix", "ptuning_v2"):
        from peft import AdaLoraConfig, LoraConfig, PrefixTuningConfig, get_peft_model
        config = {
            "dora": lambda: LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_dora=True),
            "adalora": lambda: AdaLoraConfig(init_r=r + r // 2, target_r=r, lora_alpha=alpha, target_modules=targets,
                                             total_step=steps, tinit=max(1, steps // 6), tfinal=max(1, steps // 6),
                                             deltaT=1, lora_dropout=0.0, task_type="CAUSAL_LM"),
            "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=virtual_tokens, prefix_projection=True,
                                                 encoder_hidden_size=64, task_type="CAUSAL_LM"),
            "ptuning_v2": lambda: PrefixTuningConfig(num_virtual_tokens=virtual_tokens, prefix_projection=False,
                                                     task_type="CAUSAL_LM"),
        }[method]()
        return get_peft_model(model, config)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def after_step_hook(model, method):
    """What train() must call after each step for `method` (AdaLoRA's rank allocation), or None."""
    if method == "adalora":
        return model.base_model.update_and_allocate
    return None


def adalora_ranks(model):
    """{module name: rank it kept} of a trained peft AdaLoRA model (its budget, spread over layers)."""
    pattern = model.peft_config["default"].rank_pattern
    if not pattern:
        raise ValueError("no rank pattern yet: AdaLoRA allocates ranks during training (after tinit steps)")
    return {name.replace("base_model.model.", "").split(".lora_E")[0]: int(sum(mask))   # "...q_proj.lora_E.default"
            for name, mask in pattern.items()}


def timed_training(model, batches, steps, **train_kwargs):
    """train() with a stopwatch, then one more step under PyTorch's MemTracker to measure peak
    memory: {losses, s_per_step, peak_bytes}. The extra step runs AdamW at learning rate 0, so
    it changes no weight; its peak is that of any step of the run (the states exist at its end).
    MemTracker counts tensors, not the allocator's pages: the figure repeats from run to run and
    is what lk.memory.predict_peak predicts (the process's resident memory is larger and noisier)."""
    device = input_device(model)
    t0 = time.perf_counter()
    losses = train(model, batches, steps, **train_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    batch = to_device(next(batches), device)

    amp_context, scaler = autocast(device, train_kwargs.get("amp"))   # measured as the run was trained

    def step():
        with amp_context:
            loss = model(**batch).loss
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(opt) if scaler else opt.step()          # fp16: a scaler skips a step with inf gradients
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)

    model.train()
    _, peak = tracked_peak(step, model, opt)
    model.eval()
    return {"losses": losses, "s_per_step": seconds, "peak_bytes": peak["total"]}


def score(model, tok, test_rows, probe_rows, batch_size=64):
    """Task exact match, per-field accuracy and loss on `test_rows`, and the forgetting-probe score.
    Large batches: generation on a CPU is cheaper per answer in batches (and a 4-bit model
    dequantizes its weights once per generated token, whatever the batch)."""
    result = text.evaluate(model, tok, test_rows, batch_size=batch_size)
    answers = text.generate(model, tok, [r["prompt"] for r in probe_rows], batch_size=batch_size)
    result.update(probe=data.probe_score(answers, probe_rows), probe_answers=answers)
    return result


def checkpoint_bytes(model, method):
    """Size on disk of what a run must save: the trained parameters (an adapter, prompts,
    vectors) as safetensors, or for full fine-tuning the whole model."""
    from safetensors.torch import save_file, save_model
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.safetensors")
        if method == "full":
            save_model(model, path)
        elif method in ("lora", "qlora"):
            save_adapter(model, path)
        else:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)
        return os.path.getsize(path)


def run(method, rows=None, probe=None, name="smollm2", steps=12, lr=None, batch_size=8, seed=0, device="cpu",
        targets=QKVO, r=8, alpha=16, model=None, tok=None, progress=True, latency=False, **train_kwargs):
    """Fine-tune SmolLM2 (or `model`) with `method` for `steps` steps of `batch_size` examples and
    return one row: trainable parameters, peak memory, time per step, scores, checkpoint size,
    the losses, and the trained model and tokenizer (row["model"], row["tok"]). With `latency`,
    also milliseconds per generated token (batch 1, as trained: adapters unmerged). Other keyword
    arguments go to train() (warmup, schedule, eval_fn, eval_every, history, amp, ...)."""
    from .models import load_model
    rows = data.load_task("people") if rows is None else rows
    probe = data.load_probe() if probe is None else probe
    if model is None:
        model, tok = load_model(name, device=device)
    torch.manual_seed(seed)
    model = prepare(model, method, targets, r, alpha, steps=steps)
    trainable, total = count_parameters(model)
    lr = LEARNING_RATES[method] if lr is None else lr
    fit = timed_training(model, text.batches(tok, rows["train"], batch_size, seed=seed), steps, lr=lr,
                         progress=progress, after_step=after_step_hook(model, method), **train_kwargs)
    scores = score(model, tok, rows["test"], probe)
    # model.generate drops peft's prefixes (see text.generate), so it would time the base model
    ms = (1000 * latency_per_token(model, tok, rows["test"][0]["prompt"])
          if latency and not text._is_prompt_learning(model) else None)
    ranks = adalora_ranks(model) if method == "adalora" else None
    return {"method": method, "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total,
            "peak_mib": fit["peak_bytes"] / 2**20, "s_per_step": fit["s_per_step"],
            "exact_match": scores["exact_match"], "fields": scores["fields"], "test_loss": scores["loss"],
            "probe": scores["probe"], "checkpoint_mib": checkpoint_bytes(model, method) / 2**20,
            "ms_per_token": ms, "ranks": ranks, "losses": fit["losses"], "answers": scores["answers"],
            "model": model, "tok": tok}


def compare(methods, on_row=None, **kwargs):
    """run() each method on a freshly loaded model with the same budget (kwargs); one row each,
    without the model. `on_row(row)` is called as each finishes (e.g. to save it)."""
    import gc
    rows = []
    for method in methods:
        row = run(method, **kwargs)
        del row["model"], row["tok"]
        gc.collect()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


COLUMNS = [("method", "{:<16}"), ("trainable", "{:>12,}"), ("trainable_pct", "{:>8.2f}"), ("exact_match", "{:>7.0%}"),
           ("probe", "{:>7.0%}"), ("peak_mib", "{:>9.0f}"), ("s_per_step", "{:>7.1f}"), ("checkpoint_mib", "{:>10.1f}")]
HEADERS = ["method", "trainable", "% of all", "task", "probe", "peak MiB", "s/step", "ckpt MiB"]


def table(rows, show=True):
    """The comparison as text, one line per row (a row may leave out columns it has no value for)."""
    widths = [len(f.format(0 if k != "method" else "")) for k, f in COLUMNS]
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths)))]
    for row in rows:
        lines.append(" ".join(f.format(row[k]) if row.get(k) is not None else "-".rjust(w)
                             for (k, f), w in zip(COLUMNS, widths)))
    out = "\n".join(lines)
    if show:
        print(out)
    return out


@torch.no_grad()
def latency_per_token(model, tok, prompt, new_tokens=32, repeats=3):
    """Seconds per generated token, greedy, batch 1 (the best of `repeats`; exactly `new_tokens` made)."""
    model.eval()
    device = next(model.parameters()).device
    enc = tok(text.chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False).to(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best / new_tokens


def trainer_run(model, tok, train_rows, steps, lr=2e-3, batch_size=8, seed=0, max_grad_norm=None, progress=True,
                encoded=None, optim="adamw_torch"):
    """The production route: transformers' Trainer on `model` (e.g. a peft model), with labkit's
    prompt-masking collator and the settings of train(): AdamW, constant learning rate, no warm-up,
    no weight decay; on CUDA bf16 (fp16 where bf16 is missing). `encoded` (already encoded
    examples) replaces `train_rows` when given; `optim` is Trainer's optimizer name (on a GPU,
    "paged_adamw_32bit" or "paged_adamw_8bit" for QLoRA). Returns (losses per step, seconds in train())."""
    from transformers import PrinterCallback, Trainer, TrainingArguments
    cuda = next(model.parameters()).is_cuda
    bf16 = cuda and amp_dtype("cuda") == torch.bfloat16      # a T4 reports bf16 only through emulation
    if encoded is None:
        encoded = [text.encode(tok, r["prompt"], r["response"]) for r in train_rows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim=optim,
            max_grad_norm=max_grad_norm if max_grad_norm is not None else 0.0,   # 0: no clipping
            logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            use_cpu=not cuda, bf16=bf16, fp16=cuda and not bf16, remove_unused_columns=False,
            dataloader_num_workers=0, disable_tqdm=not progress)
        trainer = Trainer(model=model, args=args, train_dataset=encoded,
                          data_collator=lambda examples: text.collate(examples, tok.pad_token_id))
        trainer.remove_callback(PrinterCallback)              # it prints every step's log when tqdm is off
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return losses, seconds
