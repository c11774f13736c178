"""Fine-tuning runs end to end (chapter 6; chapter 8 adds methods): make a model ready for a
method, train it while measuring time and memory, score it on the task and the forgetting probe,
and put it all in one row per method, so that methods are compared on the same budget."""
import contextlib
import os
import tempfile
import time

import torch

from . import data, text
from .adapter_files import save_adapter
from .lora import QKVO, count_parameters, inject_lora
from .memory import tracked_peak
from .session import amp_dtype, synchronize
from .train import autocast, input_device, to_device, train

# The learning rate each method trains with by default. Full fine-tuning, LoRA and QLoRA keep the
# rates chapter 6 trains with; the others are the best of chapter 8's search (12 steps of 8
# examples on the people task, chosen on the validation loss; data/results/peft_family.json,
# "best_lr", where full fine-tuning's best is 2e-4, LoRA's and QLoRA's 5e-3: faster, and they
# forget more of the probe).
LEARNING_RATES = {"full": 5e-5, "lora": 2e-3, "qlora": 2e-3, "dora": 5e-3, "adalora": 1e-2, "ia3": 3e-2,
                  "serial_adapter": 1e-3, "parallel_adapter": 1e-2, "parallel_ffn_s4": 9e-3, "prefix": 1e-3,
                  "ptuning_v2": 3e-2, "prompt_tuning": 3e-2}
METHODS = tuple(LEARNING_RATES)
# Chapter 10's QLoRA starts (lk.qinit), trained like "qlora" but kept out of METHODS and chapter 8's
# comparison: scripts/run_qlora_init.py searches them with chapter 8's QLoRA grid.
QLORA_STARTS = ("qlora_loftq", "qlora_pissa")
# The search: three rates per method on a half-decade grid around its papers' usual range; the
# script adds a point beyond an edge whenever the best rate sits on that edge.
# Prefix tuning's grid is lower than P-Tuning v2's: its MLP multiplies each step (a 2-step pilot
# from text init reached validation loss 0.16 at 3e-3 and 6.2 at 1e-2).
LR_GRID = {"full": [2e-5, 5e-5, 1e-4], "lora": [1e-3, 2e-3, 5e-3], "qlora": [1e-3, 2e-3, 5e-3],
           "dora": [1e-3, 2e-3, 5e-3], "adalora": [5e-3, 1e-2, 2e-2], "ia3": [3e-3, 1e-2, 3e-2],
           "serial_adapter": [3e-4, 1e-3, 3e-3], "parallel_adapter": [1e-3, 3e-3, 1e-2],
           "parallel_ffn_s4": [3e-4, 1e-3, 3e-3], "prefix": [3e-4, 1e-3, 3e-3],
           "ptuning_v2": [1e-2, 3e-2, 1e-1], "prompt_tuning": [3e-3, 1e-2, 3e-2]}
# Chapter 8's fair comparison (scripts/run_peft_fair.py): five rates for every method, no edge
# extensions, half a decade apart (x sqrt(10), written 1-3-10), centred on the half-decade rate
# nearest the geometric middle of the rates the search above tried (LR_GRID and its extensions,
# data/results/peft_family.json). Each covers every rate that search tried, and that search's best
# lies inside, not on an edge (tests/test_fair.py).
FAIR_GRID = {"full": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "lora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
             "qlora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "dora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
             "adalora": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "ia3": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
             "serial_adapter": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "parallel_adapter": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
             "parallel_ffn_s4": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "prefix": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
             "ptuning_v2": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "prompt_tuning": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
FROM_SCRATCH = ("full", "lora", "qlora", "ia3", "serial_adapter", "parallel_adapter", "parallel_ffn_s4",
                "prefix", "ptuning_v2", "prompt_tuning")                    # the rest via peft
PROMPT_METHODS = ("prefix", "ptuning_v2", "prompt_tuning")
# What the prompt methods' virtual tokens start as (init="text"): the model's own embeddings, or
# keys and values, of this text (9 tokens, repeated to fill 16 virtual tokens)
INIT_TEXT = "Extract the person from the text as JSON."


def prepare(model, method, targets=QKVO, r=8, alpha=16, steps=12, virtual_tokens=16, bottleneck=16, tok=None,
            prompt_init="text"):
    """Make `model` trainable by `method`; returns the model to train (peft methods wrap it).

    labkit's own: "full" (every weight), "lora", "qlora" (NF4 base + LoRA), "ia3" (rescaling
    vectors on keys, values and the MLP), "serial_adapter" and "parallel_adapter" (bottleneck
    adapters on each layer's o_proj and MLP), "parallel_ffn_s4" (He et al.'s best setting: one
    parallel adapter beside each MLP, scale 4, twice as wide so that it trains as many
    parameters), and the prompt methods with `virtual_tokens` virtual tokens (lk.prompts):
    "prefix" (prefix tuning, an MLP makes every layer's keys and values), "ptuning_v2" (the same,
    learned directly) and "prompt_tuning" (input embeddings). They start as `prompt_init` says
    ("text": from INIT_TEXT, which needs `tok`; "zero"; "random").
    Through peft: "dora" (LoRA with a learned magnitude) and "adalora" (rank r on average, starting
    from 1.5 r, pruned after the first quarter of `steps` and fixed for the last quarter)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "lora":
        return inject_lora(model, targets, r=r, alpha=alpha)
    if method == "qlora":
        from .qlora import inject_qlora
        return inject_qlora(model, targets, r=r, alpha=alpha)
    if method in QLORA_STARTS:                     # chapter 10: QLoRA started by LoftQ or PiSSA
        from .qinit import init_qlora
        return init_qlora(model, targets, r, alpha, init=method.removeprefix("qlora_"))
    if method == "ia3":
        from .adapters import inject_ia3
        return inject_ia3(model)
    if method in ("serial_adapter", "parallel_adapter"):
        from .adapters import inject_adapters
        return inject_adapters(model, method.split("_")[0], bottleneck=bottleneck)
    if method == "parallel_ffn_s4":
        from .adapters import inject_adapters
        return inject_adapters(model, "parallel", bottleneck=2 * bottleneck, scale=4.0, targets=("mlp",))
    if method in PROMPT_METHODS:
        from .prompts import PromptModel
        kind = "prompt_tuning" if method == "prompt_tuning" else method
        return PromptModel(model, kind, virtual_tokens, init=prompt_init, tok=tok, text=INIT_TEXT)
    if method in ("dora", "adalora"):
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
        if method == "dora":
            config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_dora=True)
        else:
            config = AdaLoraConfig(init_r=r + r // 2, target_r=r, lora_alpha=alpha, target_modules=targets,
                                   total_step=steps, tinit=max(1, steps // 4), tfinal=max(1, steps // 4),
                                   deltaT=1, lora_dropout=0.0, task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    # (chapter 10's QLORA_STARTS are accepted above but not listed: chapter 8 prints this message)
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


def timed_training(model, batches, steps, measure_peak=True, **train_kwargs):
    """train() with a stopwatch, then one more step under PyTorch's MemTracker to measure peak
    memory: {losses, s_per_step, peak_bytes}. The extra step runs a fresh AdamW at learning rate 0,
    so it changes no weight; AdamW's states appear only at its update, so its peak is that of a
    first step, not of a steady one, whose states are in memory throughout (chapter 7 predicts both).
    MemTracker counts tensors, not the allocator's pages: the figure repeats from run to run
    (the process's resident memory is larger and noisier); chapter 7 predicts it with
    lk.memory.predict_peak_config(..., fresh_optimizer=True).
    The time per step leaves out the time an `eval_fn` took."""
    device = input_device(model)
    eval_fn, evaluating = train_kwargs.get("eval_fn"), [0.0]
    if eval_fn is not None:
        def timed_eval(m):
            synchronize(device)                              # the training step's kernels are not eval's
            t = time.perf_counter()
            result = eval_fn(m)
            synchronize(device)
            evaluating[0] += time.perf_counter() - t
            return result
        train_kwargs = {**train_kwargs, "eval_fn": timed_eval}
    t0 = time.perf_counter()
    losses = train(model, batches, steps, **train_kwargs)
    synchronize(device)
    seconds = (time.perf_counter() - t0 - evaluating[0]) / steps
    if not measure_peak:
        model.eval()
        return {"losses": losses, "s_per_step": seconds, "peak_bytes": None}
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
        from .prompts import PromptModel
        if method == "full":
            save_model(model, path)
        elif isinstance(model, PromptModel):         # what inference needs: the virtual tokens themselves
            save_file({"virtual_tokens": model.prompt().detach().contiguous()}, path)
        elif method in ("lora", "qlora") + QLORA_STARTS:     # the adapter alone (LoftQ's and PiSSA's assume a changed base, not counted)
            save_adapter(model, path)
        else:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)
        return os.path.getsize(path)


def run(method, rows=None, probe=None, name="smollm2", steps=12, lr=None, batch_size=8, seed=0, device="cpu",
        targets=QKVO, r=8, alpha=16, model=None, tok=None, progress=True, latency=False, scoring="full",
        validate=False, measure_peak=True, **train_kwargs):
    """Fine-tune SmolLM2 (or `model`) with `method` for `steps` steps of `batch_size` examples and
    return one row: trainable parameters, peak memory, time per step, the losses (the task's), scores
    and the trained model and tokenizer (row["model"], row["tok"]). `scoring="full"`: held-out test
    set, probe and checkpoint size (see finish()); "val": only the validation loss (a learning-rate
    search; finish() adds the rest later). `validate`: the validation set's loss and exact match too. With `latency`, also milliseconds per
    generated token (batch 1, as trained: adapters unmerged, prompt methods through labkit's
    decoder). Other keyword arguments go to train() (warmup, schedule, eval_fn, history, amp, ...)."""
    from .models import load_model
    rows = data.load_task("people") if rows is None else rows
    if model is None:
        model, tok = load_model(name, device=device)
    torch.manual_seed(seed)
    model = prepare(model, method, targets, r, alpha, steps=steps, tok=tok)
    trainable, total = count_parameters(model)
    lr = LEARNING_RATES[method] if lr is None else lr
    recording = _record_task_loss(model) if method == "adalora" else contextlib.nullcontext()
    with recording as task_losses:
        fit = timed_training(model, text.batches(tok, rows["train"], batch_size, seed=seed), steps, lr=lr,
                             progress=progress, after_step=after_step_hook(model, method),
                             measure_peak=measure_peak, **train_kwargs)
    row = {"method": method, "lr": lr, "seed": seed, "steps": steps, "trainable": trainable, "total": total,
           "trainable_pct": 100 * trainable / total, "s_per_step": fit["s_per_step"], "losses": fit["losses"],
           "peak_mib": fit["peak_bytes"] / 2**20 if measure_peak else None,
           "val_loss": text.answer_loss(model, tok, rows["val"]) if validate or scoring == "val" else None,
           "ranks": adalora_ranks(model) if method == "adalora" else None, "model": model, "tok": tok}
    if task_losses is not None:               # what train() logged includes AdaLoRA's regulariser
        row["losses_with_regulariser"], row["losses"] = row["losses"], task_losses[:steps]
    if scoring == "full":
        finish(row, rows, probe, latency, validate)
    elif scoring != "val":
        raise ValueError(f"scoring must be 'full' or 'val', got {scoring!r}")
    return row


def finish(row, rows=None, probe=None, latency=False, validate=False):
    """Add to a run() row what its trained model scores: exact match, per-field accuracy and loss
    on the test set, the probe, the checkpoint size, (`latency`) milliseconds per generated token
    and (`validate`) the validation set's exact match."""
    model, tok = row["model"], row["tok"]
    rows = data.load_task("people") if rows is None else rows
    probe = data.load_probe() if probe is None else probe
    scores = score(model, tok, rows["test"], probe)
    row.update(exact_match=scores["exact_match"], fields=scores["fields"], test_loss=scores["loss"],
               probe=scores["probe"], answers=scores["answers"],
               checkpoint_mib=checkpoint_bytes(model, row["method"]) / 2**20,
               ms_per_token=1000 * latency_per_token(model, tok, rows["test"][0]["prompt"]) if latency else None)
    if validate:
        row["val_exact_match"] = exact_match_only(model, tok, rows["val"])
    return row


def exact_match_only(model, tok, rows, batch_size=64):
    answers = text.generate(model, tok, [r["prompt"] for r in rows], batch_size=batch_size)
    return data.exact_match(answers, [r["response"] for r in rows])


@contextlib.contextmanager
def _record_task_loss(model):
    """`with _record_task_loss(model) as losses:` a list that fills, inside the block, with the task
    loss of each training forward pass of a peft AdaLoRA model: the cross-entropy of its logits,
    without the orthogonality regulariser that AdaLoraModel.forward adds to the loss it returns
    (and that train() logs)."""
    losses = []
    inner = model.base_model.model                      # the transformers model and its loss function

    def hook(module, args, kwargs, output):
        if module.training and kwargs.get("labels") is not None:
            loss = inner.loss_function(logits=output.logits, labels=kwargs["labels"],
                                       vocab_size=inner.config.vocab_size)
            losses.append(loss.item())

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield losses
    finally:
        handle.remove()                 # else the returned model would go on recording in later training


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


def seed_summary(runs, best_lr, steps=12):
    """One row per method from a cache of runs (scripts/run_peft_family.py): its runs at its best
    learning rate, the mean and spread over their seeds of the scores and times, and the figures
    measured once (peak memory, latency: from whichever run measured them). A method whose best
    run is not scored yet (an interrupted cache) is left out, and so are runs of another budget
    than `steps` (a run without a "steps" entry counts as `steps`)."""
    import statistics
    out = []
    for method in METHODS:
        if method not in best_lr:
            continue
        rs = sorted((r for r in runs if r["method"] == method and r["lr"] == best_lr[method] and "exact_match" in r
                     and r.get("steps", steps) == steps), key=lambda r: r["seed"])
        if not rs:
            continue                                  # searched, but its best run not yet scored
        em = [r["exact_match"] for r in rs]
        once = lambda key: next((r[key] for r in rs if r.get(key) is not None), None)
        out.append({"method": method, "lr": best_lr[method], "seeds": [r["seed"] for r in rs],
                    "exact_match": statistics.mean(em), "em_sd": statistics.stdev(em) if len(em) > 1 else 0.0,
                    "em_min": min(em), "em_max": max(em), "probe": statistics.mean(r["probe"] for r in rs),
                    "trainable": rs[0]["trainable"], "trainable_pct": rs[0]["trainable_pct"],
                    "peak_mib": once("peak_mib"), "s_per_step": statistics.mean(r["s_per_step"] for r in rs),
                    "checkpoint_mib": rs[0]["checkpoint_mib"], "ms_per_token": once("ms_per_token"),
                    "val_loss": rs[0]["val_loss"]})
    return out


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
    """Seconds per decoding step, greedy (the best of `repeats`; exactly `new_tokens` made): for one
    prompt, seconds per generated token at batch 1; for a list of prompts, per step of that batch
    (left-padded), each step making one token per row. A prompt method (lk.prompts.PromptModel) is
    timed through labkit's decoder, with its prefix."""
    from .prompts import PromptModel, greedy
    model.eval()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    device = next(model.parameters()).device
    with text.left_padded(tok):
        enc = tok([text.chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        if isinstance(model, PromptModel):            # all prompts in one batch, as generate() takes them
            greedy(model, tok, prompts, max_new_tokens=new_tokens, batch_size=len(prompts), stop_at_eos=False)
        else:
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best / new_tokens


def trainer_run(model, tok, train_rows, steps, lr=2e-3, batch_size=8, seed=0, max_grad_norm=1.0, progress=True,
                encoded=None, optim="adamw_torch"):
    """The production route: transformers' Trainer on `model` (e.g. a peft model), with labkit's
    prompt-masking collator and train()'s defaults: AdamW, constant learning rate, no warm-up, no
    weight decay; but Trainer's own clipping (gradient norm 1.0, where train() does not clip by
    default; None turns it off); on CUDA bf16
    (fp16 where bf16 is missing). `encoded` (already encoded
    examples) replaces `train_rows` when given; `optim` is Trainer's optimizer name (on a GPU,
    "paged_adamw_32bit" or "paged_adamw_8bit" for QLoRA). Returns (losses per step, seconds in train())."""
    from transformers import PrinterCallback, Trainer, TrainingArguments
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    bf16 = cuda and amp_dtype("cuda") == torch.bfloat16      # a T4 reports bf16 only through emulation
    if encoded is None:
        encoded = [text.encode(tok, r["prompt"], r["response"]) for r in train_rows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim=optim,
            max_grad_norm=max_grad_norm if max_grad_norm is not None else 0.0,   # 0: no clipping
            logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            use_cpu=device.type == "cpu", bf16=bf16, fp16=cuda and not bf16, remove_unused_columns=False,
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
