"""Checkers for the chapters' exercises. Each takes the reader's function or answer, compares it
with labkit's reference on several inputs, and prints what is right or raises with a hint.
A function that still raises NotImplementedError is reported as not attempted (no error)."""
import math

import torch

from . import lowrank
from .lora import count_parameters, inject_lora


def _attempt(fn, *args):
    try:
        return True, fn(*args)
    except NotImplementedError:
        return False, None


def _ok(msg):
    print(f"✓ {msg}")


def _todo(name):
    print(f"… {name}: not attempted yet (replace the NotImplementedError with your code)")


# Chapter 0 ----------------------------------------------------------------------------------

def check_full_finetune_bytes(fn):
    """fn(n_params) -> bytes of weights + gradients + AdamW's two states, all fp32."""
    for n in (1, 135_000_000, 7_000_000_000):
        done, got = _attempt(fn, n)
        if not done:
            return _todo("full fine-tuning bytes")
        want = 16 * n
        assert got == want, (f"for {n:,} parameters you gave {got:,} bytes; expected {want:,}: "
                             "4 bytes each for the weight, its gradient, and AdamW's m and v")
    return _ok("16 bytes per parameter: weight, gradient, and AdamW's m and v in fp32")


# Chapter 1 ----------------------------------------------------------------------------------

def check_low_rank_approx(fn):
    """fn(W, r) -> the best rank-r approximation of W."""
    g = torch.Generator().manual_seed(0)
    for shape, r in (((12, 8), 3), ((30, 50), 1), ((20, 20), 20)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        done, got = _attempt(fn, W, r)
        if not done:
            return _todo("rank-r approximation")
        want = lowrank.low_rank_approx(W, r)
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = (got - want).abs().max().item()
        assert err < 1e-8, f"for a {shape} matrix at r={r} your approximation is off by {err:.2e} (max abs)"
    return _ok("your truncated SVD is the Eckart-Young optimum (to 1e-8)")


def check_lora_savings(fn):
    """fn(d, k, r) -> fraction of W's d*k parameters that B and A need: r*(d+k) / (d*k)."""
    for d, k, r in ((576, 576, 8), (4096, 11008, 16), (10, 10, 5)):
        done, got = _attempt(fn, d, k, r)
        if not done:
            return _todo("LoRA parameter fraction")
        full, low = lowrank.lora_param_count(d, k, r)
        assert math.isclose(got, low / full, rel_tol=1e-9), \
            f"for d={d}, k={k}, r={r} you gave {got}; B (d x r) and A (r x k) hold r*(d+k) = {low:,} of {full:,}"
    return _ok("r*(d+k) / (d*k): the fraction of parameters LoRA trains")


# Chapter 2 ----------------------------------------------------------------------------------

def check_lora_forward(fn):
    """fn(x, W0, b, A, B, alpha, r) -> h = x W0^T + b + (alpha/r) x A^T B^T."""
    g = torch.Generator().manual_seed(0)
    for batch, d_in, d_out, r, alpha in (((3,), 8, 6, 2, 4.0), ((2, 5), 16, 12, 4, 8.0)):
        x = torch.randn(*batch, d_in, generator=g)
        W0, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
        A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        done, got = _attempt(fn, x, W0, b, A, B, alpha, r)
        if not done:
            return _todo("LoRA forward")
        want = x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"off by {err:.2e}: is the update scaled by alpha / r, and are A, B transposed?"
    return _ok("h = W0 x + b + (alpha/r) B A x, for batched inputs too")


def check_rslora_scaling(fn):
    """fn(alpha, r) -> rsLoRA's scaling alpha / sqrt(r)."""
    for alpha, r in ((16, 16), (8, 2), (1, 64)):
        done, got = _attempt(fn, alpha, r)
        if not done:
            return _todo("rsLoRA scaling")
        assert math.isclose(got, alpha / math.sqrt(r)), f"for alpha={alpha}, r={r}: got {got}, want alpha/sqrt(r)"
    return _ok("rsLoRA scales by alpha / sqrt(r)")


# Chapter 3 ----------------------------------------------------------------------------------

def check_trainable_count(fn, config, targets, r):
    """fn(config, targets, r) -> the LoRA parameters for `targets` in a model of this config.
    The reference injects into a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM
    done, got = _attempt(fn, config, targets, r)
    if not done:
        return _todo("trainable parameter count")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = count_parameters(inject_lora(model, targets, r=r, alpha=2 * r))[0]
    assert got == want, f"you counted {got:,}; injecting into {targets} at r={r} gives {want:,}"
    return _ok(f"{want:,} trainable parameters for {targets} at r={r}")


# Chapter 4 ----------------------------------------------------------------------------------

def check_nf4_codebook(fn):
    """fn() -> the 16 NF4 values (any float dtype), sorted."""
    from .quant import nf4_codebook
    done, got = _attempt(fn)
    if not done:
        return _todo("NF4 codebook")
    got = torch.as_tensor(got, dtype=torch.float64).reshape(-1)
    assert got.numel() == 16, f"NF4 has 16 values, you gave {got.numel()}"
    err = (got - nf4_codebook().double()).abs().max().item()
    assert err < 1e-6, (f"off by up to {err:.2e}: 8 positive quantiles on linspace(offset, 0.5, 9)[:-1], "
                        "7 negative on linspace(offset, 0.5, 8)[:-1], a zero, then divide by the max")
    _ok(f"your 16 NF4 values match bitsandbytes' table (max difference {err:.1e})")


def check_pack(fn):
    """fn(idx) -> uint8 bytes with idx[2j] in the high nibble and idx[2j+1] in the low one."""
    from .quant import pack_nibbles
    g = torch.Generator().manual_seed(0)
    for n in (2, 16, 64):
        idx = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        done, got = _attempt(fn, idx)
        if not done:
            return _todo("nibble packing")
        got = torch.as_tensor(got).reshape(-1)
        want = pack_nibbles(idx).reshape(-1)
        assert got.dtype == torch.uint8, f"bytes should be uint8, got {got.dtype}"
        assert torch.equal(got, want), (f"for indices {idx[:4].tolist()}... you gave bytes {got[:2].tolist()}, "
                                        f"expected {want[:2].tolist()}: element 2j goes in the HIGH nibble")
    _ok("two 4-bit codes per byte, in bitsandbytes' order")


def check_bits_per_parameter(fn):
    """fn(blocksize, double_quant) -> bits stored per parameter for NF4 with fp32 absmax
    (and, with double quantization, 8-bit absmax plus an fp32 absmax per 256 of them)."""
    for bs in (64, 128, 256):
        for dq in (False, True):
            done, got = _attempt(fn, bs, dq)
            if not done:
                return _todo("bits per parameter")
            want = 4 + (8 / bs + 32 / (bs * 256) if dq else 32 / bs)
            assert math.isclose(got, want, rel_tol=1e-9), f"blocksize {bs}, double_quant={dq}: got {got}, want {want}"
    _ok("4 + 32/blocksize bits, or 4 + 8/blocksize + 32/(256*blocksize) with double quantization")


# Chapter 5 ----------------------------------------------------------------------------------

def check_qlora_weight_bytes(fn):
    """fn(n_params, double_quant) -> bytes of NF4 weights in blocks of 64."""
    for n in (64 * 256, 7_000_000_000, 65_000_000_000):
        for dq in (False, True):
            done, got = _attempt(fn, n, dq)
            if not done:
                return _todo("NF4 weight bytes")
            bits = 4 + (8 / 64 + 32 / (64 * 256) if dq else 32 / 64)
            assert math.isclose(got, n * bits / 8, rel_tol=1e-6), \
                f"for {n:,} parameters (double_quant={dq}) you gave {got:,.0f} bytes; expected {n * bits / 8:,.0f}"
    _ok("NF4 weights: n x 4.5 / 8 bytes, or n x 4.127 / 8 with double quantization")


def check_lora_grad_flow(model):
    """After a backward pass, only LoRA A and B may hold gradients; every A and B must have one."""
    from .lora import lora_layers
    others = [n for n, p in model.named_parameters() if p.grad is not None and not n.endswith((".lora_A", ".lora_B"))]
    assert not others, f"these frozen parameters received gradients: {others[:3]}"
    missing = [n for n, m in lora_layers(model) if m.lora_B.grad is None]
    assert not missing, f"these LoRA layers got no gradient on B: {missing[:3]}"
    _ok(f"gradients reached the {2 * len(lora_layers(model))} LoRA tensors and nothing else")


# Chapter 6 ----------------------------------------------------------------------------------

def check_answer_fraction(fn, tok, rows):
    """fn(batch) -> fraction of label positions that are not IGNORE."""
    from .text import IGNORE, batches
    for size, seed in ((1, 0), (4, 1), (8, 2)):
        batch = next(batches(tok, rows, size, seed=seed))
        done, got = _attempt(fn, batch)
        if not done:
            return _todo("answer fraction")
        want = (batch["labels"] != IGNORE).sum().item() / batch["labels"].numel()
        assert got is not None and abs(float(got) - want) < 1e-6, (
            f"for a batch of {size} you gave {got}; expected {want:.4f}: count the labels that are not "
            f"IGNORE ({IGNORE}), over all positions, padding included")
    return _ok("answer fraction: the loss sees only the answer tokens (prompt and padding are IGNORE)")


def check_adapter_mib(fn):
    """fn(n_layers, d_model, d_kv, r, targets) -> MiB of an fp32 LoRA adapter on attention."""
    from .models import tiny_llama
    cases = [(30, 576, 192, 8, ("q_proj", "k_proj", "v_proj", "o_proj")), (30, 576, 192, 16, ("q_proj", "v_proj")),
             (2, 64, 32, 4, ("k_proj", "o_proj"))]
    for n_layers, d, d_kv, r, targets in cases:
        done, got = _attempt(fn, n_layers, d, d_kv, r, list(targets))
        if not done:
            return _todo("adapter size")
        if n_layers == 2:                                   # count a real model, not a formula
            m = inject_lora(tiny_llama(hidden_size=d, num_attention_heads=4, num_key_value_heads=2), list(targets), r=r,
                            alpha=2 * r)
            want = 4 * count_parameters(m)[0] / 2**20
        else:
            shapes = {"q_proj": (d, d), "k_proj": (d, d_kv), "v_proj": (d, d_kv), "o_proj": (d, d)}
            want = 4 * n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) / 2**20
        assert got is not None and abs(got - want) < 1e-6 * max(1, want), (
            f"for {n_layers} layers, r={r}, {list(targets)} you gave {got} MiB; expected {want:.4f}: each adapted "
            "layer has A (r x in) and B (out x r), 4 bytes a number, 2**20 bytes a MiB")
    return _ok("adapter size: r x (in + out) numbers per adapted layer, 4 bytes each")


def check_largest_batch(fn):
    """fn(method, limit_bytes, seq) -> the largest batch whose predicted peak fits under the limit."""
    from .finetune import prepare
    from .memory import predict_peak
    from .models import load_model
    model = None
    for method, limit, seq in (("lora", 2 * 2**30, 96), ("full", 3 * 2**30, 96), ("lora", 1.5 * 2**30, 64)):
        done, got = _attempt(fn, method, limit, seq)
        if not done:
            return _todo("largest batch")
        model = prepare(load_model()[0], method)
        fits = [b for b in range(1, 257) if predict_peak(model, b, seq, method, foreach=False)["total"] <= limit]
        want = max(fits) if fits else 0
        assert got == want, (f"{method}, under {limit / 2**30:.1f} GiB at length {seq}: you gave {got}, expected "
                             f"{want}. Use lk.memory.predict_peak(model, batch, {seq}, '{method}', foreach=False) (a CPU's "
                             f"AdamW) on a model prepared with lk.finetune.prepare(model, '{method}')")
    return _ok("largest batch: activations grow with batch x length; full fine-tuning's fixed cost leaves less room")


# Chapter 8 ----------------------------------------------------------------------------------

def check_bottleneck_params(fn):
    """fn(d, m, n_layers, per_layer) -> trainable parameters of bottleneck adapters with biases."""
    from .adapters import inject_adapters
    from .models import tiny_llama
    for d, m, n_layers, per_layer in ((64, 8, 2, 2), (64, 4, 3, 1), (576, 16, 30, 2)):
        done, got = _attempt(fn, d, m, n_layers, per_layer)
        if not done:
            return _todo("bottleneck adapter parameters")
        if d == 64:                                         # count a real model
            targets = ("o_proj", "mlp") if per_layer == 2 else ("mlp",)
            model = inject_adapters(tiny_llama(num_hidden_layers=n_layers), "serial", bottleneck=m, targets=targets)
            want = count_parameters(model)[0]
        else:
            want = n_layers * per_layer * (d * m + m + m * d + d)
        assert got == want, (f"d={d}, m={m}, {n_layers} layers x {per_layer}: you gave {got:,}, expected {want:,}: "
                             "down is d x m plus m biases, up is m x d plus d biases")
    return _ok("bottleneck adapters: 2dm + m + d per adapter")


def check_ia3_params(fn):
    """fn(config) -> entries of IA3's vectors: keys, values (kv heads x head dim) and MLP width, per layer."""
    from .adapters import inject_ia3
    from .models import tiny_llama
    for kv_heads, layers in ((2, 2), (4, 3), (1, 2)):
        model = inject_ia3(tiny_llama(num_key_value_heads=kv_heads, num_hidden_layers=layers))
        done, got = _attempt(fn, model.config)
        if not done:
            return _todo("IA3 parameters")
        want = count_parameters(model)[0]
        assert got == want, (f"{layers} layers, {kv_heads} key/value heads: you gave {got}, expected {want}. Keys "
                             "and values have num_key_value_heads x head_dim entries (grouped-query attention), "
                             "the MLP's inner activation intermediate_size")
    return _ok("IA3: 2 x kv_heads x head_dim + intermediate_size per layer")


def check_prompt_params(fn):
    """fn(config, n, kind) -> trainable parameters of a prompt method with n virtual tokens:
    kind "prompt_tuning" (input embeddings), "ptuning_v2" (keys and values of every layer) or
    "prefix" (an n x kv-width table and a 2-layer MLP of width 64 that makes those keys and values)."""
    from .models import tiny_llama
    from .prompts import PromptModel
    for kv_heads, layers, n in ((2, 2, 4), (4, 3, 8), (1, 2, 16)):
        config_model = tiny_llama(num_key_value_heads=kv_heads, num_hidden_layers=layers)
        for kind in ("prompt_tuning", "ptuning_v2", "prefix"):
            done, got = _attempt(fn, config_model.config, n, kind)
            if not done:
                return _todo("prompt method parameters")
            want = count_parameters(PromptModel(config_model, kind, n, init="zero"))[0]
            assert got == want, (f"{kind}, {n} virtual tokens, {layers} layers, {kv_heads} key/value heads: you gave "
                                 f"{got}, expected {want}. Prompt tuning learns n x hidden_size; the prefix methods "
                                 "learn keys and values (num_key_value_heads x head_dim each) in every layer; prefix "
                                 "tuning makes them with embedding (n x kv width) -> Linear(kv width, 64) -> tanh -> "
                                 "Linear(64, layers x 2 x kv width), biases included")
    return _ok("prompt tuning n*d; P-Tuning v2 n*L*2*kv; prefix tuning n*kv + (kv*64 + 64) + (64*L*2*kv + L*2*kv)")


# Chapter 7 ----------------------------------------------------------------------------------

def check_lora_params(fn):
    """fn(config, targets, r) -> trainable LoRA parameters of the whole model (every layer)."""
    from .models import tiny_llama
    cases = ((2, ["q_proj", "v_proj"], 4), (4, ["q_proj", "k_proj", "v_proj", "o_proj"], 2),
             (1, ["gate_proj", "up_proj", "down_proj"], 3), (2, ["k_proj"], 8))
    for kv_heads, targets, r in cases:
        model = tiny_llama(num_key_value_heads=kv_heads, num_hidden_layers=2)
        done, got = _attempt(fn, model.config, targets, r)
        if not done:
            return _todo("LoRA parameters of a model")
        want = count_parameters(inject_lora(model, targets, r=r, alpha=r))[0]
        assert got == want, (f"{targets} at r={r} with {kv_heads} key/value heads: you gave {got:,}, the injected "
                             f"model has {want:,}: each target adds r x (in + out), and k/v are "
                             "num_key_value_heads x head_dim wide")
    return _ok("LoRA parameters: r (in + out) per target per layer; k and v are narrower with grouped-query attention")


def check_subspace_similarity(fn):
    """fn(A1, A2) -> the LoRA paper's phi(i, j) for every i <= r1, j <= r2, as an (r1, r2) tensor."""
    from .lab import subspace_similarity
    g = torch.Generator().manual_seed(7)
    for r1, r2, d in ((2, 3, 10), (8, 64, 200), (5, 5, 50)):
        A1, A2 = torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g)
        done, got = _attempt(fn, A1, A2)
        if not done:
            return _todo("subspace similarity")
        want = subspace_similarity(A1, A2)
        got = torch.as_tensor(got, dtype=torch.float32)
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)} (one value per i, j)"
        err = (got - want).abs().max().item()
        assert err < 1e-4, (f"({r1}, {r2}): off by up to {err:.3g}. Use the right-singular vectors of A (rows of "
                            "Vh, best first), sum squared cosines over the top i and top j, divide by min(i, j)")
    return _ok("phi matches lk.lab.subspace_similarity to 1e-4")


def check_same_step_scale(fn, results):
    """fn(results, key) -> the keys of the other cached q,v runs whose scaling x r x lr equals that of `key`."""
    from .lab import step_scale
    runs = results["runs"]
    for key in ("q,v r=8 a=16 lr=0.002", "q,v r=8 a=8 lr=0.001"):
        done, got = _attempt(fn, results, key)
        if not done:
            return _todo("runs with the same step scale")
        x = runs[key]
        target = step_scale(x["r"], x["alpha"], x["lr"], x["rslora"])
        want = {k for k, y in runs.items() if k != key and y["targets"] == "q,v"
                and math.isclose(step_scale(y["r"], y["alpha"], y["lr"], y["rslora"]), target, rel_tol=1e-9)}
        assert set(got) == want, (f"for {key}: you gave {sorted(got)}, expected {sorted(want)} "
                                  "(scaling is alpha / r, or alpha / sqrt(r) with rsLoRA; then times r and lr)")
    return _ok("same scaling x r x lr: compare their final losses in the cache")


def check_rank_under_budget(fn):
    """fn(config, targets, limit_bytes) -> the largest r whose adapters (fp32 weights, gradients and
    AdamW's two states: 16 bytes per parameter) fit in limit_bytes."""
    from .memory import config_counts
    from .widgets import model_configs
    configs = model_configs()
    for name, targets, limit in (("Llama-2-7B", ["q_proj", "v_proj"], 2**30),
                                 ("Llama-2-7B", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], 2**30),
                                 ("SmolLM2-135M", ["q_proj", "k_proj", "v_proj", "o_proj"], 50 * 2**20)):
        done, got = _attempt(fn, configs[name], targets, limit)
        if not done:
            return _todo("largest rank under a memory budget")
        per_rank = config_counts(configs[name], "lora", targets, 1)["trainable"]
        want = limit // (16 * per_rank)
        assert got == want, (f"{name}, {targets}, {limit / 2**20:.0f} MiB: you gave r={got}, expected r={want} "
                             f"({per_rank:,} parameters per unit of rank, 16 bytes each)")
    return _ok("the adapters' bill grows linearly in r: 16 bytes x r x sum(in + out) over targets and layers")


# Chapter 9 ----------------------------------------------------------------------------------

def check_router(fn, need=0.95):
    """fn(text) -> "people", "dates" or "units", for the text part of a prompt (its lines after the
    first, the instruction). Scored on the three tasks' test sets (never seen in training)."""
    from .data import load_task
    from .serving import TASKS
    right, total, wrong = 0, 0, []
    for task in TASKS:
        for row in load_task(task, splits=("test",))["test"]:
            text = row["prompt"].split("\n", 1)[1]
            done, got = _attempt(fn, text)
            if not done:
                return _todo("routing a prompt to an adapter")
            assert got in TASKS, f"route({text!r}) gave {got!r}: return one of {TASKS}"
            right += got == task
            total += 1
            if got != task and len(wrong) < 3:
                wrong.append(f"{text!r} -> {got} (it is {task})")
    assert right / total >= need, (f"{right}/{total} routed right ({right / total:.0%}), below {need:.0%}; for "
                                   f"example: {'; '.join(wrong)}. Look at which words only one task's training "
                                   "texts use (month names, units, ages and jobs)")
    return _ok(f"{right}/{total} test prompts routed to their task's adapter ({right / total:.0%})")


def check_best_other(fn, scores):
    """fn(scores) -> {task: (adapter, score)}: the best adapter on each task other than the task's own and the base."""
    from .serving import TASKS
    done, got = _attempt(fn, scores)
    if not done:
        return _todo("the best other adapter per task")
    assert set(got) == set(TASKS), f"give one entry per task {TASKS}, got keys {sorted(got)}"
    for task in TASKS:
        others = {n: s[task] for n, s in scores.items() if n not in (task, "base")}
        best = max(others.values())
        name, score = got[task]
        assert name in others, f"{task}: {name!r} is not an adapter other than {task!r} and the base"
        assert math.isclose(score, others[name]) and math.isclose(score, best), (
            f"{task}: you gave {name} at {score:.0%}; the best other adapter scores {best:.0%} "
            f"({', '.join(n for n, s in others.items() if s == best)})")
    return _ok("the best stand-in for each task's own adapter")


def check_fsdp_bytes(fn):
    """fn(n_params, n_trainable, gpus, param_bytes) -> bytes on each GPU under FSDP (ZeRO-3),
    mixed-precision AdamW: weights, 2-byte gradients and 12 bytes of states, all sharded."""
    from .memory import per_device_bill
    cases = ((6_738_415_616, 6_738_415_616, 8, 2), (68_976_648_192, 16_384_000, 2, 0.5),
             (135_000_000, 460_800, 1, 2), (1000, 10, 4, 2))
    for n, trainable, gpus, param_bytes in cases:
        done, got = _attempt(fn, n, trainable, gpus, param_bytes)
        if not done:
            return _todo("the FSDP bill per GPU")
        want = sum(per_device_bill(n, trainable, gpus, 3, param_bytes=param_bytes).values())
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"{n:,} parameters ({trainable:,} trained) on {gpus} GPUs at {param_bytes} bytes a weight: you gave "
            f"{got:,.0f} bytes, expected {want:,.0f}. Under FSDP everything is divided by the GPUs: weights, "
            "2-byte gradients and 12 bytes of AdamW states per trained parameter")
    return _ok("FSDP: (weights + 2 + 12 bytes per trained parameter) / GPUs")
