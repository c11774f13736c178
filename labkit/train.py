"""A small training loop that reads in one screen.

AdamW on the parameters that require grad; optional warm-up and linear or cosine decay, gradient
accumulation and clipping, evaluation every N steps, checkpoints to resume from; batches are moved
to the model's device; on CUDA, autocast in bf16, or in fp16 with a gradient scaler where bf16 is
missing (the T4 of free Colab); on a CPU, bf16 autocast when asked for (amp=True).
With the defaults it is plain AdamW at a constant learning rate, one batch per step, in fp32 on a CPU;
on CUDA the default amp=None autocasts (pass amp=False for plain fp32 AdamW there too).
"""
import math
from contextlib import nullcontext

import torch
from tqdm import tqdm          # text, not a widget: a saved notebook shows the finished bar (scripts/tidy_notebooks.py)


# Checks that later chapters add, each called with the model before training starts and raising on
# a model it must not train (chapter 5's lk.bnb_cpu adds one): the loop itself knows no later chapter.
MODEL_CHECKS = []


def lr_factor(step, steps, warmup=0, schedule="constant"):
    """Multiplier of the learning rate at `step` (0-based): linear warm-up from 0, then constant/linear/
    cosine, as transformers' schedules do (so the first step of a warm-up moves nothing)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")


def input_device(model):
    """Where a model's inputs must be: the device of its input embeddings (or first parameter)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def to_device(batch, device):
    """A batch (dict of tensors) moved to `device`; other values are left as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device, amp=None):
    """(context, GradScaler or None) for mixed precision on `device`.

    amp=None: on CUDA, bf16 where the GPU has it, else fp16 with a gradient scaler (a T4); on a CPU,
    none (fp32). amp=True: the same on CUDA, bf16 on a CPU (a real speed-up where the CPU has bf16
    instructions, emulated and slower where it has not). "bf16" or "fp16" forces the dtype; False: none."""
    from .session import amp_dtype
    device = torch.device(device)
    if amp is False or (amp is None and device.type != "cuda"):
        return nullcontext(), None
    if amp in (None, True):
        dtype = amp_dtype(device)
    elif amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    else:
        raise ValueError(f"amp must be None, True, False, 'bf16' or 'fp16', got {amp!r}")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def train(model, batches, steps, lr=2e-3, weight_decay=0.0, warmup=0, schedule="constant", grad_accum=1,
          max_grad_norm=None, eval_fn=None, eval_every=None, history=None, amp=None, checkpoint=None,
          checkpoint_every=None, progress=True, after_step=None):
    """Train for `steps` optimizer steps, each on `grad_accum` batches from `batches`.

    Returns the loss of each step (mean over its unmasked tokens). With `eval_fn`, calls it every
    `eval_every` steps and appends {"step": ..., **its result} to the list `history`.
    `checkpoint` (a path) is loaded first if it exists, written every `checkpoint_every` steps and at
    the end. A resumed run skips the batches the checkpoint used, so pass the stream a fresh start
    would get (same data, same seed), as a restarted process has.
    `after_step(step)` is called after each optimizer step, before the gradients are cleared
    (AdaLoRA reallocates its ranks there). amp=None autocasts on CUDA only (see autocast())."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    for refuse in MODEL_CHECKS:         # what later chapters refuse to train (chapter 5: lk.bnb_cpu's)
        refuse(model)
    if grad_accum < 1 or steps < 1:
        raise ValueError(f"steps and grad_accum must be >= 1, got {steps} and {grad_accum}")
    if checkpoint_every and checkpoint is None:
        raise ValueError("checkpoint_every needs a checkpoint path to write to (checkpoint=...)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, schedule))
    settings = dict(lr=lr, weight_decay=weight_decay, warmup=warmup, schedule=schedule, grad_accum=grad_accum,
                    max_grad_norm=max_grad_norm)          # a checkpoint records them: a resumed run must match
    history = [] if history is None else history
    start, losses, rng = _resume(checkpoint, model, opt, sched, history, settings)
    for _ in range(start * grad_accum):                  # the batches the checkpoint has already used,
        next(batches)
    _restore_rng(rng)                                    # then the random state as it was at the save
    device = input_device(model)
    amp_context, scaler = autocast(device, amp)
    model.train()
    bar = tqdm(range(start, steps), desc="training", disable=not progress)
    for step in bar:
        micro = [to_device(next(batches), device) for _ in range(grad_accum)]
        shares = token_shares(micro) if grad_accum > 1 else [1]
        total = 0.0
        for batch, share in zip(micro, shares):
            if share == 0:                               # nothing to predict in this batch
                continue
            with amp_context:      # a batch's mean loss, weighted by its share of the step's tokens
                out = model(**batch)
            if out.loss is None:
                raise ValueError("the model returned no loss: training batches need 'labels'")
            loss = out.loss * share
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        if scaler:
            scaler.unscale_(opt)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        sched.step()
        if after_step is not None:
            after_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            history.append({"step": step + 1, **eval_fn(model)})
            model.train()
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save(checkpoint, model, opt, sched, losses, history, settings)
    model.eval()
    if checkpoint is not None:
        _save(checkpoint, model, opt, sched, losses, history, settings)
    return losses


def token_shares(micro):
    """Each batch's share of the tokens a causal LM predicts in one step (labels after the shift that
    are not -100; transformers' Trainer counts the same, as num_items_in_batch). Weighting each batch's
    mean loss by its share gives the mean over all the step's tokens: one large batch's loss."""
    counts = []
    for batch in micro:
        if "labels" not in batch:
            raise ValueError("gradient accumulation needs 'labels' in every batch (-100 where no loss is taken)")
        counts.append(int((batch["labels"][..., 1:] != -100).sum()))
    if sum(counts) == 0:
        raise ValueError("these batches have no token to predict: every label is -100")
    return [n / sum(counts) for n in counts]


def _trainable_state(model):
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _lora_settings(model):
    """What sets each LoRA layer's update besides its A and B: {layer: {r, alpha, scaling, use_rslora}}."""
    from .lora import lora_layers
    return {n: dict(r=m.r, alpha=m.alpha, scaling=m.scaling, use_rslora=m.use_rslora) for n, m in lora_layers(model)}


def _save(path, model, opt, sched, losses, history, settings):
    """Write the checkpoint to a temporary file and move it into place, so a run killed while
    saving leaves the previous checkpoint whole. Tensors, numbers and strings only: weights_only loads it.
    It records the run's settings and LoRA settings, which _resume checks."""
    import os
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    history = [{k: _plain(v) for k, v in h.items()} for h in history]
    tmp = f"{path}.tmp"
    torch.save({"params": _trainable_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "losses": losses, "history": history, "rng": rng, "settings": settings, "lora": _lora_settings(model)},
               tmp)
    os.replace(tmp, path)


def _plain(value):
    """An eval_fn's value as weights_only loading accepts it: numbers and strings as they are,
    numpy or 0-d torch numbers as Python numbers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()                         # one number; more than one raises
        except (ValueError, RuntimeError):
            pass
    raise TypeError(f"an eval_fn returned {type(value).__name__} ({value!r:.60}): a checkpoint keeps numbers and "
                    "strings only; return those")


def _resume(path, model, opt, sched, history, settings):
    """(first step, losses so far) from a checkpoint (its eval history is put into `history`, its RNG
    state restored, so dropout continues where it stopped), or a fresh start."""
    import os
    if path is None or not os.path.exists(path):
        return 0, [], None
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_resume(path, state, model, settings)          # all checks first: a refused resume changes nothing
    own = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["params"].items():
            own[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    history[:0] = state["history"]
    return len(state["losses"]), list(state["losses"]), state.get("rng")   # older checkpoints: no RNG state


def _check_resume(path, state, model, settings):
    """Refuse a checkpoint of another run: other trainable tensors (copy_ would broadcast a rank-1 A
    into a rank-8 one), other LoRA settings, or other settings of train() (loading the optimizer's
    state would silently put the old learning rate back). Older checkpoints record no settings:
    their tensors' names and shapes are still checked."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(state["params"]) - set(own)), sorted(set(own) - set(state["params"]))
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not fit this model: it trains {missing[:3] or 'nothing'} that "
                         f"this model does not, and this model trains {extra[:3] or 'nothing'} that it does not "
                         "(inject the same adapters first)")
    shapes = [f"{n}: checkpoint {tuple(t.shape)} vs model {tuple(own[n].shape)}"
              for n, t in state["params"].items() if t.shape != own[n].shape]
    if shapes:
        raise ValueError(f"checkpoint {path} has other shapes than this model (another rank r?): {shapes[:3]}; "
                         "inject the adapters with the run's settings to resume it")
    now = _lora_settings(model)
    for layer, saved in state.get("lora", {}).items():
        differ = {k: (v, now.get(layer, {}).get(k)) for k, v in saved.items() if now.get(layer, {}).get(k) != v}
        if differ:
            raise ValueError(f"checkpoint {path} was trained with other LoRA settings: {layer} {differ} (checkpoint, "
                             "model); inject with the run's settings to resume it, or use another checkpoint path")
    differ = {k: (v, settings.get(k)) for k, v in state.get("settings", {}).items() if settings.get(k) != v}
    if differ:
        raise ValueError(f"checkpoint {path} was written by a run with other settings: {differ} (checkpoint, now); "
                         "pass the run's settings to resume it, or use another checkpoint path for a new run")


def _restore_rng(rng):
    if rng is None:
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
