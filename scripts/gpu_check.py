"""Every GPU path the workbook offers, checked in a few minutes, with one table at the end.

    python scripts/gpu_check.py          # on a GPU: run the checks; on a CPU: say what it would run, exit 0
    python scripts/gpu_check.py --cpu    # the same checks on the CPU at toy size (tests/test_gpu_check.py)

The models have random weights: a GPU machine may have no network and no model files, and speed
and memory do not depend on the values. "SmolLM2-shaped" is SmolLM2-135M's configuration (30
layers, hidden 576); "7B-shaped" is LLaMA-7B's (32 layers, hidden 4096). On the CPU both shrink to
two layers of width 64, so that the run checks the code, not the numbers.

Each check trains a few steps on one fixed batch (half of each row masked, as a prompt is) and
passes when the loss is finite and falls; `generate` must make the same tokens as a reference path;
the latency and memory checks must stay within the bound each prints beside its figures (the
judge_* functions below, tested in tests/test_gpu_check.py). Mixed precision is what lk.amp_dtype
picks: bf16, or fp16 on a GPU without real bf16 (a T4); the first six checks run each of the two
on purpose. A check that fails prints its error in the table; the others still run.
"""
import argparse
import gc
import math
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch

import labkit as lk

QKVO = lk.lora.QKVO
CHECKS = []


def check(title):
    def register(fn):
        CHECKS.append((title, fn))
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# Models and data: random weights, real shapes.

def config(kind, small):
    from transformers import LlamaConfig
    if small:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "smollm2")
    if kind == "smollm2":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                           max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


def random_model(ctx, kind="smollm2", dtype=torch.float32):
    """Built directly in `dtype` on the device: a 7B model made in fp32 and then cast would need
    40 GB of GPU memory on the way."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(ctx.device):
            return LlamaForCausalLM(config(kind, ctx.small)).eval()
    finally:
        torch.set_default_dtype(default)


def fixed_batch(ctx, batch, seq, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100                      # the prompt half: no loss, as in the chapters
    return lk.train.to_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                              ctx.device)


def perturb(model):
    """Non-zero B: the adapters then change the output, so the checks see them."""
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def bnb_quantize(model, compute_dtype):
    """Every linear layer but the head as bitsandbytes' Linear4bit (NF4, double quantization), as
    from_pretrained(quantization_config=...) would make it, without writing the weights to disk."""
    import bitsandbytes as bnb
    device = next(model.parameters()).device
    for name in lk.find_targets(model, "all-linear"):
        lin = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=layer)
        if lin.bias is not None:
            layer.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        lk.lora.replace_module(model, name, layer.to(device))    # .to() quantizes
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True                        # peft then wraps the layers with its 4-bit LoRA
    if device.type == "cpu":
        lk.qlora.bnb_exact_on_cpu(model)                 # the same path on every CPU (chapter 5)
    return model


def peft_lora(model, r=8):
    from peft import LoraConfig, get_peft_model
    return peft_4bit_checked(get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=QKVO,
                                                              lora_dropout=0.0)))


def peft_4bit_checked(peft_model):
    """On a 4-bit base, peft must have put its bitsandbytes LoRA layer there, as from_pretrained gives."""
    if getattr(peft_model.get_base_model(), "is_loaded_in_4bit", False):
        from peft.tuners.lora.bnb import Linear4bit as PeftLoRA4bit
        q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, PeftLoRA4bit), type(q_proj)
    return peft_model


def train_steps(model, batch, amp, steps=4, lr=5e-3):
    return judge_losses(lk.train.train(model, iter(lambda: batch, None), steps=steps, lr=lr, amp=amp,
                                       progress=False))


def amp_name(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------------------------------------
# The judges: each returns (ok, detail), and the detail states the bound it was judged against.

LATENCY_BOUND = 2.0       # an adapter per token at most 2x the base model (toy size on a busy CPU: 1.1 to 1.55 x)
PEAK_TOLERANCE = 0.15     # lk.memory.predict_peak against the measured peak (0.997 at toy size on a CPU)


def judge_losses(losses):
    ok = len(losses) > 1 and all(math.isfinite(l) for l in losses) and losses[-1] < losses[0]
    return ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps (bound: finite, last < first)"


def judge_tokens(outs, reference):
    """outs: {path: generated ids}; every path must make the reference path's tokens."""
    want = outs[reference]
    differ = [name for name, ids in outs.items() if ids.shape != want.shape or not torch.equal(ids, want)]
    detail = (f"{want.shape[-1]} tokens; " + (f"differ from {reference}: {', '.join(differ)}" if differ
                                              else f"all {len(outs)} paths equal") + f" (bound: the same tokens as {reference})")
    return not differ, detail


def judge_latency(ms, bound):
    """ms: {"base": ms per token, adapter: ms per token, ...}; each adapter within `bound` x base."""
    ratios = {k: v / ms["base"] for k, v in ms.items()}
    ok = all(math.isfinite(v) and v > 0 for v in ms.values()) and all(r <= bound for r in ratios.values())
    return ok, (", ".join(f"{k} {v:.2f} ms ({ratios[k]:.2f} x base)" for k, v in ms.items())
                + f" (bound: each <= {bound:.1f} x base)")


def judge_step(ours, theirs, bound):
    """Seconds a step: labkit's within `bound` x bitsandbytes + peft's."""
    ratio = ours / theirs
    ok = math.isfinite(ratio) and 0 < ratio <= bound
    return ok, (f"labkit {1000 * ours:.1f} ms a step, bitsandbytes + peft {1000 * theirs:.1f} ms a step; "
                f"labkit / bitsandbytes + peft {ratio:.2f} (bound: <= {bound:.1f})")


def judge_ratio(measured, predicted, tolerance=PEAK_TOLERANCE):
    ratio = predicted / measured
    return abs(ratio - 1) < tolerance, (f"measured {measured / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB, "
                                        f"ratio {ratio:.3f} (bound: within {tolerance:.0%})")


def judge_between(measured, low, high, what):
    """A measurement that no prediction models exactly, between a floor and a ceiling it must respect."""
    return low <= measured <= high, (f"measured {size(measured)} (bound: between {what[0]}, {size(low)}, "
                                     f"and {what[1]}, {size(high)})")


def size(n_bytes):
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------------------------
# The checks.

for dtype in (torch.bfloat16, torch.float16):
    scaler = " + GradScaler" if dtype == torch.float16 else ""

    @check(f"labkit LoRA, {amp_name(dtype)} autocast{scaler}")
    def _(ctx, dtype=dtype):
        model = perturb(lk.inject_lora(random_model(ctx), QKVO, r=8, alpha=16))
        return train_steps(model, ctx.batch, amp_name(dtype))

    @check(f"labkit QLoRA (NF4, {amp_name(dtype)} compute), {amp_name(dtype)} autocast{scaler}")
    def _(ctx, dtype=dtype):
        model = perturb(lk.inject_qlora(random_model(ctx), QKVO, r=8, alpha=16, compute_dtype=dtype))
        return train_steps(model, ctx.batch, amp_name(dtype))

    @check(f"bitsandbytes + peft QLoRA ({amp_name(dtype)} compute), {amp_name(dtype)} autocast{scaler}")
    def _(ctx, dtype=dtype):
        model = perturb(peft_lora(bnb_quantize(random_model(ctx), dtype)))
        return train_steps(model, ctx.batch, amp_name(dtype))


def step_seconds(ctx, model, amp, warmup=2):
    """A closure that runs one AdamW training step of `model` on ctx.batch under `amp`; warmed up."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    context, scaler = lk.train.autocast(ctx.device, amp)

    def step():
        with context:
            loss = model(**ctx.batch).loss
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    return step


QLORA_STEP_BOUND = 3.0    # labkit's QLoRA step against bitsandbytes + peft's (the CPU aim, 1.0 x, is bench_finetune's)


@check("QLoRA step time, SmolLM2-shaped, batch 4 x 64: labkit against bitsandbytes + peft (NF4, mixed-precision compute)")
def _(ctx):
    """The best of 5 rounds of 5 steps each (2 of 2 on the CPU), the two models taking turns (as best_times does), so that
    a busy moment slows both alike. No .item() inside a round: on CUDA the steps queue up, as they
    would in a training loop, and a host synchronisation in LinearNF4 would show here as lost time."""
    amp = amp_name(ctx.amp)
    steps = {"labkit": step_seconds(ctx, perturb(lk.inject_qlora(random_model(ctx), QKVO, r=8, alpha=16,
                                                                    compute_dtype=ctx.amp)), amp),
             "bitsandbytes + peft": step_seconds(ctx, perturb(peft_lora(bnb_quantize(random_model(ctx), ctx.amp))),
                                                 amp)}
    best = dict.fromkeys(steps, float("inf"))
    rounds = 2 if ctx.small else 5                # on the CPU the check runs the code, it does not time it
    for _ in range(rounds):
        for name, step in steps.items():
            lk.session.synchronize(ctx.device)
            t0 = time.perf_counter()
            for _ in range(rounds):
                loss = step()
            lk.session.synchronize(ctx.device)
            best[name] = min(best[name], (time.perf_counter() - t0) / rounds)
            assert math.isfinite(loss.item()), f"{name}: loss {loss.item()}"
    return judge_step(best["labkit"], best["bitsandbytes + peft"], QLORA_STEP_BOUND)


@check("paged AdamW (bitsandbytes, 32-bit and 8-bit states), mixed precision")
def _(ctx):
    import bitsandbytes as bnb
    details, ok = [], True
    for opt_cls in (bnb.optim.PagedAdamW32bit, bnb.optim.PagedAdamW8bit):
        model = perturb(lk.inject_lora(random_model(ctx), QKVO, r=8, alpha=16)).train()
        opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        context, scaler = lk.train.autocast(ctx.device, amp_name(ctx.amp))
        losses = []
        for _ in range(4):
            with context:
                loss = model(**ctx.batch).loss
            (scaler.scale(loss) if scaler else loss).backward()
            scaler.step(opt) if scaler else opt.step()          # fp16 (a T4): a scaler, as train() uses
            if scaler:
                scaler.update()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        trained, detail = judge_losses(losses)
        ok &= trained
        details.append(f"{opt_cls.__name__} {amp_name(ctx.amp)}: {detail}")
    return ok, "; ".join(details)


@check("generate: labkit LoRA merged = unmerged; labkit QLoRA = bitsandbytes + peft QLoRA (same NF4 weights, same A and B)")
def _(ctx):
    """Greedy tokens of two pairs of paths that compute the same function, in fp32 so that they agree
    to rounding: a LoRA model before and after merging; labkit's QLoRA and bitsandbytes + peft's on
    the same random weights (labkit's NF4 bytes are bitsandbytes', test_quant.py) with the same A, B."""
    prompt = ctx.batch["input_ids"][:1, :8]
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)   # 12 even if EOS comes
    new_tokens = lambda model: model.generate(input_ids=prompt, **greedy)[:, prompt.shape[1]:]
    model = perturb(lk.inject_lora(random_model(ctx), QKVO, r=8, alpha=16))
    unmerged = new_tokens(model)
    lora = judge_tokens({"unmerged": unmerged, "merged": new_tokens(lk.merge_lora(model))}, "unmerged")
    ours = perturb(lk.inject_qlora(random_model(ctx), QKVO, r=8, alpha=16))
    theirs = peft_4bit_checked(lk.to_peft(ours, bnb_quantize(random_model(ctx), torch.float32)))
    qlora = judge_tokens({"labkit QLoRA": new_tokens(ours), "bitsandbytes + peft": new_tokens(theirs)},
                         "bitsandbytes + peft")
    return lora[0] and qlora[0], f"LoRA: {lora[1]}; QLoRA: {qlora[1]}"


@check("labkit prompt methods (prompt tuning, prefix tuning, P-Tuning v2): mixed-precision training; on a model in that dtype, the decoder's first step = re-reading")
def _(ctx):
    details, ok = [], True
    amp = amp_name(ctx.amp)
    for kind in lk.prompts.KINDS:
        torch.manual_seed(0)
        model = lk.prompts.PromptModel(random_model(ctx), kind, 8, init="random")
        trained, detail = train_steps(model, ctx.batch, amp)
        half = lk.prompts.PromptModel(random_model(ctx, dtype=ctx.amp), kind, 8, init="random")
        prompt = {"input_ids": ctx.batch["input_ids"][:2, :12], "attention_mask": ctx.batch["attention_mask"][:2, :12]}
        with torch.no_grad():
            first, _ = lk.prompts.first_pass(half, prompt)
            again = half(**prompt).logits[:, -1]
        same = (first.logits[:, -1].float() - again.float()).abs().max().item()
        ok &= trained and first.logits.dtype == ctx.amp and same < 1e-2 * again.float().abs().max().item()
        details.append(f"{kind} {amp}: {detail}, first step off by {same:.1e} (bound: 1% of the largest logit)")
    return ok, "; ".join(details)


def best_times(ctx, models, prompt, greedy, rounds=5):
    """{name: the best time of `rounds` generate() calls}, the models taking turns, so that a busy
    moment of the machine slows all of them alike."""
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, model in models.items():
            lk.session.synchronize(ctx.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=prompt, **greedy)
            lk.session.synchronize(ctx.device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@check("latency per token, batch 1, SmolLM2-shaped: base, serial adapter, parallel adapter (is the parallel branch hidden?)")
def _(ctx):
    prompt = ctx.batch["input_ids"][:1, :16]
    greedy = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    models = {name: random_model(ctx) if name == "base" else lk.finetune.prepare(random_model(ctx), name)
              for name in ("base", "serial_adapter", "parallel_adapter")}
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu":     # toy sizes gain nothing from threads, and on a busy CPU two threads wait on
        torch.set_num_threads(1)     # each other: 5 to 45 ms a token, ratios 0.2 to 5 (one thread: 1 to 1.5 ms)
    try:
        best = best_times(ctx, models, prompt, greedy)
    finally:
        torch.set_num_threads(threads)
    return judge_latency({k: 1000 * v / 32 for k, v in best.items()}, LATENCY_BOUND)


@check("lk.finetune.trainer_run: Trainer + peft LoRA, mixed precision, paged AdamW on CUDA")
def _(ctx):
    model = perturb(peft_lora(random_model(ctx)))
    ids, labels = ctx.batch["input_ids"].cpu(), ctx.batch["labels"].cpu()
    encoded = [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(ids, labels)]
    optim = "paged_adamw_32bit" if ctx.device.type == "cuda" else "adamw_torch"
    losses, seconds = lk.finetune.trainer_run(model, SimpleNamespace(pad_token_id=0), None, steps=4, lr=5e-3,
                                              batch_size=len(encoded), encoded=encoded, optim=optim,
                                              progress=False)
    ok, detail = judge_losses(losses)
    return ok and len(losses) == 4, f"{optim}: {detail}, {seconds / 4:.2f} s a step"


def measured_peak(ctx, model, batch, amp=None, baseline=0):
    """(peak bytes of a training step after the first, when AdamW's states exist, above `baseline`;
    its loss), as lk.memory predicts it."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    context = lk.train.autocast(ctx.device, amp)[0]
    model.train()

    def step():
        with context:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline, loss
    loss, peak = lk.memory.tracked_peak(step, model, opt)
    return peak["total"], loss


@check("lk.memory.predict_peak against the measured peak (LoRA, fp32, batch 4 x 256)")
def _(ctx):
    baseline = clean_cuda(ctx)                          # what is still allocated from before
    model = lk.inject_lora(random_model(ctx), QKVO, r=8, alpha=16)
    batch = fixed_batch(ctx, 4, 256 if not ctx.small else 32, model.config.vocab_size)
    measured, _ = measured_peak(ctx, model, batch, baseline=baseline)
    predicted = lk.memory.predict_peak(model, *batch["input_ids"].shape, "lora", QKVO, 8,
                                       foreach=ctx.device.type == "cuda")["total"]
    return judge_ratio(measured, predicted)


@check("7B-shaped QLoRA step: bitsandbytes NF4 + peft LoRA r=8 q,k,v,o, gradient checkpointing, mixed precision, batch 1 x 512")
def _(ctx):
    """lk.memory does not model gradient checkpointing, so the peak is judged between what the step
    must hold (the weights and the adapters' states, on paper) and lk.memory's fp32 prediction without
    checkpointing (which saves every layer's activations and keeps 4 bytes per unquantized weight)."""
    baseline = clean_cuda(ctx)
    model = random_model(ctx, "7b", ctx.amp)
    cfg = model.config
    model = bnb_quantize(model, ctx.amp)
    clean_cuda(ctx)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft_lora(model)
    batch = fixed_batch(ctx, 1, 512 if not ctx.small else 32, cfg.vocab_size)
    t0 = time.perf_counter()
    measured, loss = measured_peak(ctx, model, batch, amp=amp_name(ctx.amp), baseline=baseline)
    seconds = (time.perf_counter() - t0) / 2
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for _, m in lk.qlora.bnb_4bit_layers(model)) - sum(
        m.weight.numel() for _, m in lk.qlora.bnb_4bit_layers(model))
    predicted = lk.memory.predict_peak_config(cfg, *batch["input_ids"].shape, "qlora", QKVO, 8, foreach=True)["total"]
    weights = lk.memory.method_bill(n_params, lk.count_parameters(model)[0], "qlora",
                                    n_quantized=sum(m.in_features * m.out_features
                                                    for _, m in lk.qlora.bnb_4bit_layers(model)))
    ok, detail = judge_between(measured, sum(weights.values()), predicted,
                               ("weights + adapter states on paper", "lk.memory's fp32 no-checkpointing prediction"))
    return ok and math.isfinite(loss), (f"{amp_name(ctx.amp)}, loss {loss:.2f}; {n_params / 1e9:.2f}B parameters; "
                                        f"{seconds:.2f} s a step; peak {detail}")


def clean_cuda(ctx):
    """Free what earlier checks left (bitsandbytes' layers and weights refer to each other, so only
    a full collection frees them); returns the bytes still allocated."""
    gc.collect()
    if ctx.device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the checks on the CPU at toy size")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("No CUDA device here, so nothing was run. On a GPU this script runs these checks, each on a model")
        print("with random weights (SmolLM2-135M's shape unless it says 7B), and prints one table:")
        for i, (title, _) in enumerate(CHECKS, 1):
            print(f"  {i:>2}. {title}")
        print("`python scripts/gpu_check.py --cpu` runs the same code on the CPU at toy size.")
        return 0
    device = torch.device("cuda" if cuda and not args.cpu else "cpu")
    lk.session.quiet_machine_noise()
    ctx = SimpleNamespace(device=device, small=device.type == "cpu", amp=lk.amp_dtype(device))
    ctx.batch = fixed_batch(ctx, 4, 64 if not ctx.small else 16, config("smollm2", ctx.small).vocab_size)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (toy sizes)"
    import bitsandbytes
    import peft
    import transformers
    print(f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}; mixed precision (lk.amp_dtype): {amp_name(ctx.amp)}")
    rows = []
    for title, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            ok, detail = fn(ctx)
            verdict = "ok" if ok else "FAIL"
        except Exception as e:                        # one broken path must not hide the others
            verdict, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            traceback.print_exc(limit=3)
        rows.append((title, verdict, f"{time.perf_counter() - t0:.1f}", detail))
        print(f"[{verdict}] {title}: {detail}", flush=True)
        clean_cuda(ctx)
    print()
    print("| check | result | s | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    failed = sum(v == "FAIL" for _, v, _, _ in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
