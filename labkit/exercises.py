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


# Chapter 3 · Build it: the injection, against peft ------------------------------------------

def _decoy_qkv(model):
    """Give every attention block one more nn.Linear, named qkv_proj (the name fused-attention
    models such as Phi-3 use), which the forward pass never calls: its name contains "v_proj" as a
    substring but is not v_proj, and peft leaves it alone."""
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.qkv_proj = torch.nn.Linear(attn.q_proj.in_features, 3 * attn.q_proj.out_features, bias=False)
    return model


def _inject_cases():
    """(what, model factory, targets, r, alpha): tiny random Llamas with SmolLM2's module names."""
    from .models import tiny_llama
    return [("2 layers", lambda: tiny_llama(seed=0), ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8),
            ("3 layers, with a decoy qkv_proj", lambda: _decoy_qkv(tiny_llama(seed=1, num_hidden_layers=3)),
             ["q_proj", "v_proj"], 2, 16),
            ("2 layers, 1 key/value head", lambda: tiny_llama(seed=2, num_key_value_heads=1), ["k_proj", "o_proj"], 8, 4)]


def _first_diff(got, want):
    """'[i, j]: yours x, reference y' for the element where |got - want| is largest."""
    where = (got - want).abs().argmax()
    idx = list(torch.unravel_index(where, got.shape)) if got.dim() else []
    i = tuple(int(k) for k in idx)
    return f"{list(i)}: yours {got[i].item():.6g}, reference {want[i].item():.6g}"


def _tol(t):
    return f"{t:.0e}".replace("e-0", "e-")                   # 1e-05 -> 1e-5


def _close(got, want, tol):
    return got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol)


def _check_placement(ours, linears, names_before, want, targets, what):
    """Which of the model's original nn.Linear layers were replaced, against the layers peft adapts
    (`want`). Returns {name: the wrapper now there}."""
    def now(name):
        try:
            return ours.get_submodule(name)
        except AttributeError:
            return None
    replaced = {n: now(n) for n, m in linears.items() if now(n) is not m and now(n) is not None}
    missing = [n for n in want if n not in replaced]
    extra = [n for n in replaced if n not in want]
    strays = [n for n, _ in ours.named_modules() if n not in names_before
              and not any(n.startswith(r + ".") for r in replaced) and n.rsplit(".", 1)[-1] in targets]
    if missing and strays:
        child = strays[0].rsplit(".", 1)[-1]
        lost = next((n for n in missing if n.rsplit(".", 1)[-1] == child), missing[0])
        raise AssertionError(
            f"[{what}] {lost} is still the plain nn.Linear, but a module appeared at {strays[0]!r}: the "
            f"wrapper was set on the wrong parent. Set it on the module that holds the layer, "
            f"setattr(model.get_submodule({lost.rpartition('.')[0]!r}), {child!r}, wrapper)")
    if missing:
        layers = sorted({n.split(".")[2] for n in replaced if n.startswith("model.layers.")})
        hint = (f"only layer {layers[0]} got LoRA; every transformer layer has its own projections: wrap "
                "every module whose name matches, not the first one" if len(layers) == 1
                else "wrap every nn.Linear whose name's last part is in targets")
        raise AssertionError(f"[{what}] no LoRA on {missing[0]} ({len(missing)} of the {len(want)} target modules "
                             f"missed, targets {targets}): {hint}")
    if extra:
        last = extra[0].rsplit(".", 1)[-1]
        inside = [t for t in targets if t in last]
        hint = (f"{last!r} is not {inside[0]!r}: a target names the last part of a module's name whole, as peft "
                f"matches it (name == target or name ends with '.' + target), not a substring of it"
                if inside else f"{last!r} is not in targets {targets}: LoRA goes on the targets only (here not "
                               "on the MLP or the output head)")
        raise AssertionError(f"[{what}] LoRA on {extra[0]} ({len(extra)} modules too many): {hint}")
    for name, wrapper in replaced.items():
        if not any(m is linears[name] for m in wrapper.modules()):
            raise AssertionError(f"[{what}] the wrapper at {name} does not hold the model's own nn.Linear: wrap "
                                 "the module you found (lk.LoRALinear(module, r, alpha)), so that W0 stays the "
                                 "pretrained weight")
    return replaced


def _find_A_B(wrapper, base, r, name, what):
    """The wrapper's trainable A (r, in) and B (out, r)."""
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    A = [p for p in trainable if tuple(p.shape) == (r, base.in_features)]
    B = [p for p in trainable if tuple(p.shape) == (base.out_features, r)]
    assert len(A) == 1 and len(B) == 1 and len(trainable) == 2, (
        f"[{what}] at {name} the trainable tensors have shapes {[tuple(p.shape) for p in trainable]}; expected A "
        f"(r, in) = {(r, base.in_features)} and B (out, r) = {(base.out_features, r)} and nothing else")
    return A[0], B[0]


def check_inject(fn, tol=1e-5):
    """fn(model, targets, r, alpha) -> the model (or None: changed in place) with every nn.Linear whose
    name's last part is in `targets` replaced by a LoRA wrapper, everything else frozen; a target list
    that matches nothing raises ValueError.

    Checked on tiny random Llamas (SmolLM2's module names) against peft's get_peft_model(model,
    LoraConfig(target_modules=targets, r=r, lora_alpha=alpha)) on an identical model: the adapted
    modules and the trainable count must be peft's exactly; with the same A and B copied into both
    (B non-zero), the logits and the gradients of every A and B must agree within `tol` (fp32:
    absolute and relative 1e-5; the two compute the same products, so they differ by about 1e-7)."""
    from peft import LoraConfig, get_peft_model
    with torch.random.fork_rng(devices=[]):                 # the notebook's random state is left as it was
        for kind, make, targets, r, alpha in _inject_cases():
            what = f"tiny Llama, {kind}; targets {targets}, r={r}, alpha={alpha}"
            model = make()
            linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            own = {id(p) for p in model.parameters()}
            names_before = {n for n, _ in model.named_modules()}
            x = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                base_logits = model(input_ids=x).logits
            done, got = _attempt(fn, model, list(targets), r, alpha)
            if not done:
                return _todo("LoRA injection")
            ours = model if got is None else got
            assert isinstance(ours, torch.nn.Module), f"[{what}] return the model (or None), not a {type(got).__name__}"
            theirs = get_peft_model(make(), LoraConfig(target_modules=list(targets), r=r, lora_alpha=alpha,
                                                       lora_dropout=0.0, bias="none"))
            peft_layers = {}                                 # peft's layers, named as in the plain model
            for name, m in theirs.base_model.model.named_modules():
                if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                    peft_layers[name] = m
            trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
            assert trainable, (f"[{what}] nothing trains: freeze the model first, then wrap (LoRALinear's A and B "
                               "are created trainable; freezing after the wrapping freezes them too)")
            unfrozen = [n for n, p in trainable if id(p) in own]
            assert not unfrozen, (f"[{what}] the model's own weights still train: {unfrozen[0]} ({len(unfrozen)} "
                                  "tensors in all). Freeze the whole model (model.requires_grad_(False)) before "
                                  "wrapping: only A and B may train")
            replaced = _check_placement(ours, linears, names_before, list(peft_layers), targets, what)
            n_ours = sum(p.numel() for _, p in trainable)
            n_peft = theirs.get_nb_trainable_parameters()[0]
            AB = {name: _find_A_B(w, linears[name], r, name, what) for name, w in replaced.items()}
            assert n_ours == n_peft, f"[{what}] {n_ours:,} trainable parameters; peft trains {n_peft:,}"
            with torch.no_grad():
                start = ours(input_ids=x).logits
            assert _close(start, base_logits, 1e-6), (
                f"[{what}] straight after injection the logits differ from the base model's (largest at "
                f"{_first_diff(start, base_logits)}): B must start at zero, so that B A = 0 and the adapted model "
                "starts exactly where the pretrained one was")
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():                            # the same non-zero A and B on both sides
                for name, (A, B) in AB.items():
                    A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                    B.copy_(torch.randn(B.shape, generator=g) * 0.3)
                    peft_layers[name].lora_A["default"].weight.copy_(A)
                    peft_layers[name].lora_B["default"].weight.copy_(B)
            out_ours, out_peft = ours(input_ids=x, labels=x), theirs(input_ids=x, labels=x)
            assert _close(out_ours.logits, out_peft.logits, tol), (
                f"[{what}] with the same A and B, the logits differ from peft's beyond {_tol(tol)} (largest at "
                f"{_first_diff(out_ours.logits.detach(), out_peft.logits.detach())}): does each wrapper add "
                f"(alpha / r) B A x = {alpha / r:g} B A x to W0 x, with A (r, in) and B (out, r)?")
            out_ours.loss.backward()
            out_peft.loss.backward()
            for name, (A, B) in AB.items():
                for label, p, q in (("A", A, peft_layers[name].lora_A["default"].weight),
                                    ("B", B, peft_layers[name].lora_B["default"].weight)):
                    assert p.grad is not None, f"[{what}] {label} at {name} got no gradient: is it used in forward?"
                    assert _close(p.grad, q.grad, tol), (
                        f"[{what}] the gradient of {label} at {name} differs from peft's beyond {_tol(tol)} (largest "
                        f"at {_first_diff(p.grad, q.grad)})")
        from .models import tiny_llama
        try:
            done, _ = _attempt(fn, tiny_llama(), ["query", "value"], 4, 8)
        except ValueError:
            done = "refused"
        except Exception as e:                                # noqa: BLE001 (any other error is a bug to report)
            raise AssertionError(f"targets ['query', 'value'] (BERT's names) on a Llama raised {type(e).__name__}: "
                                 f"{e}; raise a ValueError that says they match no module") from e
        if done is False:
            return _todo("LoRA injection")
        assert done == "refused", ("targets ['query', 'value'] (BERT's names) match no module of a Llama, and your "
                                   "function accepted them silently: nothing would train. Raise a ValueError when "
                                   "no module matches")
    n = len(_inject_cases())
    return _ok(f"your injection adapts the modules peft adapts and trains as many parameters ({n} models, {n} target "
               f"lists); logits and the gradients of every A and B equal peft's within {_tol(tol)}; a target that "
               "matches nothing is refused")


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


# Chapter 6 · Build it: prompt-masked labels and one training step ---------------------------

_PAD = 2                                                   # the pad id of the checkers' batches


def _label_batch(lengths, g, pad_id=_PAD, vocab=256):
    """A right-padded batch as lk.text.collate makes it, from random token ids: rows of `lengths`
    (prompt, answer) tokens, each answer ending in the pad id (SmolLM2 pads with its end-of-turn
    token, which ends every answer). Returns (batch with labels, prompt_lengths)."""
    from .text import IGNORE, collate
    examples = []
    for p, a in lengths:
        ids = torch.randint(3, vocab, (p + a,), generator=g).tolist()
        ids[-1] = pad_id
        examples.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return collate(examples, pad_id), torch.tensor([p for p, _ in lengths])


_LABEL_CASES = ([(5, 4)], [(7, 3), (4, 5), (6, 6), (3, 1)], [(9, 2), (2, 9), (8, 3)])


def check_make_labels(fn):
    """fn(input_ids, prompt_lengths, attention_mask) -> labels (B, T), torch.long: each token's own id
    where it is an answer token, IGNORE (-100) over the first prompt_lengths[i] tokens of row i and
    over the padding (attention_mask 0, on the right). Not shifted: transformers shifts inside the loss.
    Compared exactly with the labels lk.text.encode and collate make."""
    from .text import IGNORE
    g = torch.Generator().manual_seed(0)
    for lengths in _LABEL_CASES:
        batch, prompt_lengths = _label_batch(lengths, g)
        ids, mask, want = batch["input_ids"], batch["attention_mask"], batch["labels"]
        ids_before = ids.clone()
        done, got = _attempt(fn, ids, prompt_lengths.clone(), mask.clone())
        if not done:
            return _todo("prompt-masked labels")
        size = f"batch of {len(lengths)} x {ids.shape[1]}"
        assert torch.equal(ids, ids_before), (f"{size}: your function changed input_ids in place (labels = "
                                              "input_ids shares its memory): start from input_ids.clone()")
        assert torch.is_tensor(got), f"{size}: return a tensor, not a {type(got).__name__}"
        assert got.shape == want.shape, f"{size}: labels of shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert got.dtype == torch.long, f"{size}: labels of dtype {got.dtype}; cross-entropy wants torch.long (int64)"
        if torch.equal(got, want):
            continue
        if torch.equal(got[:, :-1], want[:, 1:]) or torch.equal(got[:, 1:], want[:, :-1]):
            raise AssertionError(f"{size}: your labels are shifted by one position. transformers shifts them "
                                 "itself inside the loss (logits at t predict labels at t + 1); give labels "
                                 "aligned with input_ids, or every token is shifted twice")
        i, j = (int(k) for k in (got != want).nonzero()[0])
        p, w, v = int(prompt_lengths[i]), int(want[i, j]), int(got[i, j])
        where = f"{size}, row {i}, column {j}: got {v}, want {w}"
        if j < p:
            raise AssertionError(f"{where}. That is a prompt token (row {i}'s prompt is its first {p} tokens): it "
                                 f"must be IGNORE ({IGNORE}), or the loss trains the model to write the question")
        if mask[i, j] == 0:
            raise AssertionError(f"{where}. That is padding (attention_mask 0): it must be IGNORE ({IGNORE}) too")
        if v == IGNORE and ids[i, j] == _PAD:
            raise AssertionError(f"{where}. That is the answer's end-of-turn token, whose id is also the pad "
                                 "id: find the padding from attention_mask, not from the token id")
        if v == IGNORE:
            raise AssertionError(f"{where}. That is an answer token (the answer starts at column {p}): its label "
                                 "is the token itself; only positions 0 .. prompt_length - 1 are the prompt")
        raise AssertionError(f"{where}. An answer token's label is the token itself, input_ids[{i}, {j}]")
    return _ok("labels: the answer's own token ids, IGNORE over the prompt and the padding, no shift")


_STEP_LR = 0.5


def _step_batches(g):
    """Two right-padded batches of unequal rows, so that a mean per row differs from a mean per token."""
    return [_label_batch(lengths, g)[0] for lengths in ([(6, 9), (8, 2), (3, 5)], [(4, 3), (5, 11)])]


def _reference_step(model, batch, opt, zero=True):
    """One step as chapter 6's loop takes it: the model's own loss (transformers shifts the labels
    and averages over the tokens whose label is not IGNORE), backward, step, gradients cleared."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    if zero:
        opt.zero_grad(set_to_none=True)
    return loss.item()


def _other_losses(model, batch):
    """The losses of typical mistakes on `batch`, for the checker's messages."""
    from .text import IGNORE
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]

    def ce(logits, labels, per_row=False):
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                   reduction="none")
        keep = (labels != IGNORE).float()
        if per_row:
            return ((losses * keep).sum(1) / keep.sum(1)).mean().item()
        return ((losses * keep).sum() / keep.sum()).item()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
    return {
        "per_row": (ce(logits[:, :-1], labels[:, 1:], per_row=True),
                    "a mean per row, then a mean of the rows: transformers averages over all the batch's answer "
                    "tokens, each token weighing the same (a row with few answer tokens does not count more)"),
        "double_shift": (ce(logits[:, :-1], shifted[:, 1:]),
                         "the labels shifted by hand: the model shifts them again inside its loss, so each "
                         "position is scored on the token two places ahead. Pass batch['labels'] as it is"),
        "no_shift": (ce(logits, labels),
                     "logits at t scored against the token at t, not t + 1: shift logits[:, :-1] against "
                     "labels[:, 1:], or let the model do it (model(**batch).loss)"),
        "everything": (ce(logits[:, :-1], ids[:, 1:]),
                       "every position counted, prompt and padding: the labels must be batch['labels'] (IGNORE "
                       "over the prompt and the padding), not the input ids"),
        "prompt": (ce(logits[:, :-1], torch.where(mask == 1, ids, IGNORE)[:, 1:]),
                   "the prompt tokens counted: the labels must be batch['labels'] (IGNORE over the prompt), "
                   "not the input ids"),
    }


def _compare_params(model, ref, what):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad and not torch.allclose(p, q, rtol=1e-5, atol=1e-6):
            return f"{what}: {name} differs from the reference step's at {_first_diff(p.detach(), q.detach())}"
    return None


def check_train_step(fn):
    """fn(model, batch, optimizer) -> the loss of one training step on `batch` (a float or a 0-d tensor):
    the model's loss on the batch, backward, optimizer step, gradients cleared for the next step.

    Two steps on two tiny models (a random Llama with LoRA on q, v, and one trained in full), each with
    two right-padded prompt-masked batches and plain SGD (lr 0.5; with momentum for the second):
    each loss must equal transformers' own model(**batch).loss within 1e-5 (relative), and the
    trainable parameters after each step a reference step's within 1e-5 relative plus 1e-6 absolute."""
    import copy

    from .lora import inject_lora, lora_layers
    from .models import tiny_llama
    with torch.random.fork_rng(devices=[]):                 # the notebook's random state is left as it was
        lora = inject_lora(tiny_llama(seed=3, initializer_range=0.2), ["q_proj", "v_proj"], r=4, alpha=8)
        for _, m in lora_layers(lora):                       # B = 0 would leave A without a gradient
            torch.nn.init.normal_(m.lora_B, std=0.2)
        # weights 10x larger than transformers' default (initializer_range 0.02) make the tokens' losses
        # differ, so that the typical mistakes give losses at least 1% away from the right one
        cases = [("LoRA on q, v", lora, dict(lr=_STEP_LR)),
                 ("full fine-tuning", tiny_llama(seed=4, initializer_range=0.2), dict(lr=_STEP_LR, momentum=0.9))]
        for what, model, sgd in cases:
            model.train()
            ref, no_zero = copy.deepcopy(model), copy.deepcopy(model)
            trained = lambda m: [p for p in m.parameters() if p.requires_grad]     # noqa: E731
            opts = [torch.optim.SGD(trained(m), **sgd) for m in (model, ref, no_zero)]
            for step, batch in enumerate(_step_batches(torch.Generator().manual_seed(5)), 1):
                at = f"[{what}] step {step}"
                others = _other_losses(ref, batch)
                want = _reference_step(ref, batch, opts[1])
                _reference_step(no_zero, batch, opts[2], zero=False)
                before = [p.detach().clone() for p in trained(model)]
                done, got = _attempt(fn, model, {k: v.clone() for k, v in batch.items()}, opts[0])
                if not done:
                    return _todo("one training step")
                assert got is not None, f"{at}: return the loss (loss.item(), or the tensor)"
                assert not torch.is_tensor(got) or got.numel() == 1, (
                    f"{at}: you returned a tensor of shape {tuple(got.shape)}; return one number, the mean loss "
                    "over the batch's answer tokens")
                got = float(got.detach() if torch.is_tensor(got) else got)
                if not math.isclose(got, want, rel_tol=1e-5):
                    why = [hint for value, hint in others.values() if math.isclose(got, value, rel_tol=1e-5)]
                    raise AssertionError(f"{at}: your loss {got:.6f}, transformers' model(**batch).loss "
                                         f"{want:.6f}" + (f": it is {why[0]}" if why else ""))
                wrong = _compare_params(model, ref, at)
                if wrong is None:
                    continue
                if all(torch.equal(p, q) for p, q in zip(trained(model), before)):
                    raise AssertionError(f"{at}: no trainable parameter changed. Call loss.backward(), then "
                                         "optimizer.step(); clear the gradients before the backward or after the "
                                         "step, not between the two")
                if _compare_params(model, no_zero, at) is None:
                    raise AssertionError(f"{at}: the parameters moved by the sum of this step's gradient and the "
                                         "last one's: the gradients were not cleared. Call optimizer.zero_grad() "
                                         "once every step (backward adds to .grad)")
                raise AssertionError(wrong + ". Is it loss.backward(), then optimizer.step(), on the model's loss?")
    return _ok("one step: the model's own loss on the answer tokens, backward, step, gradients cleared; "
               "losses and parameters equal a reference step's")


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
