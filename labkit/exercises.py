"""Checkers for the chapters' exercises. Each takes the reader's function or answer, compares it
with labkit's reference on several inputs, and prints what is right or raises with a hint.
A function that still raises NotImplementedError is reported as not attempted (no error)."""
import contextlib
import math

import torch

from . import lowrank
from .lora import count_parameters, inject_lora


def _attempt(fn, *args):
    try:
        return True, fn(*args)
    except NotImplementedError:
        return False, None


_VERDICTS = []     # while a `graded()` block runs: one "ok" or "todo" per line a checker prints


def _ok(msg):
    _VERDICTS.append("ok")
    print(f"✓ {msg}")


def _todo(name):
    _VERDICTS.append("todo")
    print(f"… {name}: not attempted yet (replace the NotImplementedError with your code)")


@contextlib.contextmanager
def graded():
    """For a grading tool (scripts/build_assignments.py, nbgrader): the checkers run inside this block
    count only if every one of them passed. A checker already raises AssertionError on a wrong
    answer; this block also raises when a part was not attempted, or when nothing was checked.

        with lk.exercises.graded():
            lk.exercises.check_lora_linear(MyLoRALinear)
    """
    start = len(_VERDICTS)
    try:
        yield
        got = _VERDICTS[start:]
        if "todo" in got:
            raise AssertionError(f"{got.count('todo')} part(s) not attempted yet: no marks for this check")
        if not got:
            raise AssertionError("no checker ran inside graded(): nothing to give marks for")
    finally:
        del _VERDICTS[start:]


def _first_wrong(got, want, atol, rtol=0.0):
    """None if got and want agree elementwise within atol + rtol * |want|; otherwise a sentence that
    names how many elements differ and the first of them: its index and both values."""
    bad = ~torch.isclose(got.double(), want.double(), rtol=rtol, atol=atol)
    if not bad.any():
        return None
    i = tuple(int(v) for v in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} elements differ; the first at index {list(i)}: "
            f"yours {got[i].item():.6g}, expected {want[i].item():.6g}")


def _ratio(got, want):
    """k if got is k * want (to 1e-4 of want's norm), else None: an update scaled wrongly shows up as k != 1."""
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    if want.norm() == 0:
        return None
    k = (got @ want / (want @ want)).item()
    return k if (got - k * want).norm() <= 1e-4 * want.norm() else None



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
    """fn(W, r) -> W_r, the best rank-r approximation of W (d x k, float64): the top r singular
    triplets of its SVD, W_r = U[:, :r] diag(s[:r]) Vh[:r, :]. Checked to 1e-8 (max abs) against
    labkit's truncated SVD on matrices you do not see, square and not, with a diagnosis when wrong."""
    g = torch.Generator().manual_seed(0)
    for shape, r in (((12, 8), 3), ((30, 50), 1), ((20, 20), 20), ((40, 16), 5)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        done, got = _attempt(fn, W.clone(), r)
        if not done:
            return _todo("rank-r approximation")
        want = lowrank.low_rank_approx(W, r)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, (
            f"for a {shape} matrix you returned {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}, "
            f"expected {tuple(want.shape)}: W_r has W's shape")
        assert got.dtype == W.dtype, f"you returned {got.dtype} for a {W.dtype} matrix: keep W's dtype"
        err = (got - want).abs().max().item()
        if err < 1e-8:
            continue
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        rank = int(torch.linalg.matrix_rank(got, rtol=1e-5).item())       # float32 round-off is not rank
        hints = [(rank > r, f"your matrix has rank {rank}, more than r = {r}: keep only r singular triplets"),
                 ((got - U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]).abs().max() < 1e-8,
                  "you kept the r SMALLEST singular values: torch.linalg.svd returns them largest first"),
                 ((got - U[:, :r] @ Vh[:r]).abs().max() < 1e-8, "the singular values are missing: U_r diag(s_r) Vh_r"),
                 (err < 1e-4, "close, but not to 1e-8: compute in W's dtype (float64 here), not float32")]
        hint = next((h for cond, h in hints if cond), "the top-r triplets of torch.linalg.svd(W, full_matrices=False)")
        raise AssertionError(f"for a {shape} matrix at r={r} your approximation is off by {err:.2e} (max abs): {hint}")
    return _ok("your truncated SVD is the Eckart-Young optimum (to 1e-8)")


def check_eckart_young_error(fn):
    """fn(S, r) -> ||W - W_r||_F predicted from the singular values S alone (1-D, largest first):
    sqrt(s_{r+1}^2 + ... + s_n^2). Checked to 1e-9 relative, against the error of the truncated SVD
    measured on the matrix itself, with a diagnosis when wrong."""
    g = torch.Generator().manual_seed(1)
    for shape, r in (((12, 8), 3), ((30, 50), 1), ((20, 20), 20), ((16, 40), 0), ((9, 9), 8)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        S = lowrank.singular_values(W)
        done, got = _attempt(fn, S.clone(), r)
        if not done:
            return _todo("the Eckart-Young error")
        want = torch.linalg.norm(W - lowrank.low_rank_approx(W, r)).item()     # measured, not a formula
        got = float(got)
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9):
            continue
        dropped = S[r:]
        near = lambda x: math.isclose(got, float(x), rel_tol=1e-9, abs_tol=1e-9)   # noqa: E731
        hints = [(near(dropped.pow(2).sum()), "that is the squared error: take the square root"),
                 (near(dropped.sum()), "the singular values must be squared before they are added (energy is s^2)"),
                 (near(S[:r].pow(2).sum().sqrt()), "that is what the approximation keeps: the error is what it drops"),
                 (near(S[r + 1:].pow(2).sum().sqrt()) or (r > 0 and near(S[r - 1:].pow(2).sum().sqrt())),
                  "off by one: the dropped values are s_{r+1} ... s_n, that is S[r:] in Python")]
        hint = next((h for cond, h in hints if cond), "sqrt of the sum of the squared singular values after the r-th")
        raise AssertionError(f"for a {shape} matrix at r={r} you predicted {got:.6g}; the truncated SVD's error "
                             f"is {want:.6g}: {hint}")
    return _ok("your prediction from the singular values alone equals the measured error (Eckart-Young)")


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


# Build it (chapter 2): a LoRA layer of your own, checked against peft's lora.Linear. The hidden
# cases: (in, out, r, alpha, bias, batch shape of x). Every scaling alpha / r differs from 1, so a
# forgotten scaling shows; the shapes are small, so the whole check takes well under a second once
# peft is imported.
LORA_CASES = ((16, 12, 4, 8, True, (5,)), (8, 20, 2, 1, False, (2, 3)), (24, 24, 3, 12, True, (4,)))
LORA_TOL = dict(rtol=1e-5, atol=1e-5)        # outputs and gradients, fp32 (as tests/test_peft_parity.py)
MERGE_TOL = dict(rtol=1e-6, atol=1e-6)       # merged and restored weights


def _peft_twin(W0, b, A, B, r, alpha):
    """peft's lora.Linear around a fresh nn.Linear holding W0 and b, with A and B copied in."""
    import torch.nn as nn
    from peft import LoraConfig, inject_adapter_in_model

    class Holder(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(W0)
        if b is not None:
            lin.bias.copy_(b)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, bias="none")
    twin = inject_adapter_in_model(config, Holder(lin)).lin
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(A)
        twin.lora_B["default"].weight.copy_(B)
    return twin


def _check_factor(layer, name, shape, where):
    t = getattr(layer, name, None)
    assert isinstance(t, torch.Tensor), (f"{where}: your layer has no tensor {name}; the lab's interface names the "
                                         "factors lora_A (r x in) and lora_B (out x r), as nn.Parameter")
    assert isinstance(t, torch.nn.Parameter), (f"{where}: {name} is a plain tensor; make it an nn.Parameter, so "
                                               "that layer.parameters() (and so the optimizer) sees it")
    if tuple(t.shape) == shape[::-1] and shape[0] != shape[1]:
        role = "r x in: A maps an input of in values down to r" if name == "lora_A" else \
            "out x r: B maps the r values up to out"
        raise AssertionError(f"{where}: {name} has shape {tuple(t.shape)}, transposed: expected {shape} ({role})")
    assert tuple(t.shape) == shape, f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}"
    assert t.dtype == torch.float32, f"{where}: {name} is {t.dtype}, expected torch.float32 (the base layer's dtype)"
    return t


def _check_lora_start(layer, base, r, alpha, where):
    A = _check_factor(layer, "lora_A", (r, base.in_features), where)
    B = _check_factor(layer, "lora_B", (base.out_features, r), where)
    assert B.abs().max() == 0, (f"{where}: lora_B starts at max |B| = {B.abs().max().item():.3g}, not 0. With B = 0, "
                                "B A = 0 and the layer starts exactly as the pretrained W0; a random B starts "
                                "from a damaged model (section 3's `random` init)")
    assert A.abs().max() > 0, (f"{where}: lora_A is all zeros. With A = 0 and B = 0 neither factor ever gets a "
                               "gradient (section 3's `zeros` init): initialise A at random, as peft does with "
                               "nn.init.kaiming_uniform_(A, a=math.sqrt(5))")
    trains = [n for n, p in layer.named_parameters() if p.requires_grad]
    extra = [n for n, p in layer.named_parameters() if p.requires_grad and p is not A and p is not B]
    assert not extra, (f"{where}: these parameters train too: {extra}. Freeze the wrapped layer "
                       "(base.requires_grad_(False)): only lora_A and lora_B train")
    assert len(trains) == 2, f"{where}: lora_A and lora_B must both require grad; trainable: {trains}"
    scaling = getattr(layer, "scaling", None)
    assert scaling is not None, f"{where}: your layer has no attribute `scaling` (alpha / r = {alpha / r:g})"
    assert math.isclose(float(scaling), alpha / r, rel_tol=1e-6), \
        f"{where}: scaling is {float(scaling):g}; expected alpha / r = {alpha} / {r} = {alpha / r:g}"
    return A, B


def _diagnose_update(got, want, base_out, scaling, when):
    """What is wrong with an output that differs from peft's: the update missing, scaled, or else."""
    k = _ratio(got - base_out, want - base_out)
    if k is not None and abs(k) < 1e-6:
        return f"{when} your output is W0 x + b alone: the update scaling * B A x is missing"
    if k is not None and math.isclose(k, 1 / scaling, rel_tol=1e-3):
        return (f"{when} your update B A x is {k:.3g} times peft's: multiply it by scaling = alpha / r = {scaling:g}")
    if k is not None and math.isclose(k, 2, rel_tol=1e-3):
        return f"{when} your output adds the update twice (2 x scaling * B A x)"
    if k is not None:
        return f"{when} your update is {k:.4g} times peft's scaling * B A x (scaling = alpha / r = {scaling:g})"
    return f"{when} your output differs from peft's: " + _first_wrong(got, want, **LORA_TOL)


def check_lora_linear(cls):
    """Build it, chapter 2. cls(base: nn.Linear, r, alpha) -> your LoRA layer, with lora_A (r, in) and
    lora_B (out, r) as nn.Parameter, scaling = alpha / r, forward(x: (..., in)) -> (..., out),
    merge() (W0 += scaling * B A) and unmerge() (W0 back). Checked against peft's lora.Linear with the
    same W0, A and B: outputs and the gradients of A and B within 1e-5 (fp32, absolute + relative),
    merged weights within 1e-6 of peft's merge(), W0 restored within 1e-6 by unmerge()."""
    import torch.nn as nn
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    passed = []
    for d_in, d_out, r, alpha, bias, batch in LORA_CASES:
        where = f"in={d_in}, out={d_out}, r={r}, alpha={alpha}"
        base = nn.Linear(d_in, d_out, bias=bias)
        with torch.no_grad():
            base.weight.copy_(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))
            if bias:
                base.bias.copy_(torch.randn(d_out, generator=g))
        W0, b = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
        x = torch.randn(*batch, d_in, generator=g)
        base_out = F.linear(x, W0, b)
        done, layer = _attempt(cls, base, r, alpha)
        if not done:
            return _todo("your LoRA layer")
        A, B = _check_lora_start(layer, base, r, alpha, where)

        done, h = _attempt(layer, x)                                     # 1. it starts at W0
        if not done:
            return _todo("your LoRA layer's forward")
        assert isinstance(h, torch.Tensor), f"{where}: forward returned {type(h).__name__}, not a tensor"
        assert tuple(h.shape) == (*batch, d_out), (f"{where}: for x of shape {tuple(x.shape)} your output has shape "
                                                   f"{tuple(h.shape)}, expected {(*batch, d_out)}")
        assert h.dtype == torch.float32, f"{where}: your output is {h.dtype}, expected torch.float32"
        wrong = _first_wrong(h.detach(), base_out, **LORA_TOL)
        assert wrong is None, f"{where}: with B = 0 your layer should give W0 x + b, the base layer's output: {wrong}"

        with torch.no_grad():                                            # as if trained: B != 0
            B.copy_(torch.randn(d_out, r, generator=g) * 0.5)
        twin = _peft_twin(W0, b, A.detach(), B.detach(), r, alpha)
        scaling = alpha / r
        probe = torch.randn(*batch, d_out, generator=g)                  # loss = sum(h * probe)
        h, want = layer(x), twin(x)
        assert h.shape == want.shape, f"{where}: output shape {tuple(h.shape)}, peft's {tuple(want.shape)}"
        if _first_wrong(h.detach(), want.detach(), **LORA_TOL):          # 2. outputs, as peft's
            raise AssertionError(f"{where}, B != 0: " + _diagnose_update(h.detach(), want.detach(), base_out, scaling,
                                                                          "before merging,"))
        (h * probe).sum().backward()                                     # 3. gradients, as peft's
        (want * probe).sum().backward()
        for name, mine, theirs in (("lora_A", A, twin.lora_A["default"].weight),
                                   ("lora_B", B, twin.lora_B["default"].weight)):
            assert mine.grad is not None, (f"{where}: {name} received no gradient: use it in forward as it is "
                                           "(not detached, not through .data)")
            wrong = _first_wrong(mine.grad, theirs.grad, **LORA_TOL)
            if wrong:
                k = _ratio(mine.grad, theirs.grad)
                hint = f" (yours is {k:.4g} times peft's)" if k is not None else ""
                raise AssertionError(f"{where}: the gradient of {name} differs from peft's{hint}: {wrong}")
        for name, p in base.named_parameters():
            assert p.grad is None, f"{where}: the frozen base.{name} received a gradient: freeze the base layer"

        done, _ = _attempt(layer.merge)                                  # 4. merge, as peft's
        if not done:
            _ok("your layer starts at W0 and matches peft's outputs and gradients of A and B (to 1e-5)")
            return _todo("merge() and unmerge()")
        twin.merge()
        W_merged, W_peft = layer.base.weight if hasattr(layer, "base") else base.weight, twin.get_base_layer().weight
        assert tuple(W_merged.shape) == tuple(W0.shape), f"{where}: after merge() W has shape {tuple(W_merged.shape)}"
        wrong = _first_wrong(W_merged.detach(), W_peft.detach(), **MERGE_TOL)
        if wrong:
            k = _ratio(W_merged.detach() - W0, W_peft.detach() - W0)
            if k is not None and abs(k) < 1e-6:
                raise AssertionError(f"{where}: merge() left the base weight W0 as it was: add scaling * B @ A to "
                                     "base.weight, in place (under torch.no_grad())")
            if k is not None and math.isclose(k, 1 / scaling, rel_tol=1e-3):
                raise AssertionError(f"{where}: merge() added B @ A without the scaling: W0 + scaling * B @ A, "
                                     f"scaling = alpha / r = {scaling:g}")
            hint = f" (your change to W0 is {k:.4g} times peft's)" if k is not None else ""
            raise AssertionError(f"{where}: the merged weight differs from peft's merge(){hint}: {wrong}")
        assert not W_merged.requires_grad, (f"{where}: after merge() the base weight requires grad: change it in place "
                                            "(W += ...) rather than making a new nn.Parameter, so that W0 stays frozen")
        with torch.no_grad():
            h_merged = layer(x)
        wrong = _first_wrong(h_merged, want.detach(), **LORA_TOL)
        if wrong:
            k = _ratio(h_merged - base_out, want.detach() - base_out)
            if k is not None and math.isclose(k, 2, rel_tol=1e-3):
                raise AssertionError(f"{where}: after merge() your forward adds scaling * B A x a second time: W "
                                     "already holds the update, so forward must skip it while merged (keep a flag, "
                                     "e.g. self.merged)")
            raise AssertionError(f"{where}: after merge() your output changed: {wrong}")

        done, _ = _attempt(layer.unmerge)                                # 5. unmerge restores W0
        if not done:
            _ok("your layer starts at W0, matches peft's outputs and gradients (to 1e-5) and its merge (to 1e-6)")
            return _todo("unmerge()")
        W_back = layer.base.weight if hasattr(layer, "base") else base.weight
        wrong = _first_wrong(W_back.detach(), W0, **MERGE_TOL)
        if wrong:
            same = _first_wrong(W_back.detach(), W_peft.detach(), **MERGE_TOL) is None
            raise AssertionError(f"{where}: unmerge() did not restore W0" + (" (the weight is still the merged one)"
                                 if same else "") + f": {wrong}. Subtract exactly what merge() added, scaling * B @ A")
        with torch.no_grad():
            h_back = layer(x)
        wrong = _first_wrong(h_back, want.detach(), **LORA_TOL)
        if wrong:
            k = _ratio(h_back - base_out, want.detach() - base_out)
            hint = " (it is W0 x + b alone)" if k is not None and abs(k) < 1e-6 else ""
            raise AssertionError(f"{where}: after unmerge() W0 is back, but your output is wrong{hint}: {wrong}. "
                                 "Once unmerged, forward must add scaling * B A x again")
        passed.append(where)
    return _ok(f"your LoRA layer matches peft's lora.Linear on {len(passed)} hidden cases: starts at W0, outputs and "
               "gradients of A and B to 1e-5, merge to 1e-6, unmerge restores W0")


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


# Build it (chapter 4): blockwise NF4, checked against bitsandbytes. The hidden cases: (shape,
# blocksize). Rows of 128 and 96 values are not blocks (so one absmax per row shows), one block holds
# an outlier, and one case asks for blocks of 32.
NF4_CASES = (((8, 128), 64), ((6, 96), 64), ((1024,), 64), ((4, 256), 32))


def _nf4_case(i):
    """The i-th hidden case: (w, blocksize)."""
    shape, blocksize = NF4_CASES[i]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05
    if len(shape) == 1:
        w[3 * blocksize + 5] = 1.0                                   # an outlier: 20 sigma, in block 3
    return w, blocksize


def _nibbles(packed, n):
    flat = packed.reshape(-1).to(torch.uint8)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()


def _nf4_reference(w, blocksize):
    """bitsandbytes' packed bytes (n // 2,) and absmax (n // blocksize,) for w: its quantize_4bit runs
    the same pure-torch code on every CPU (no CPU kernel is registered for it in bitsandbytes 0.50)."""
    import bitsandbytes.functional as bnbF
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    return packed.reshape(-1), state.absmax


def _nf4_decode(packed, absmax, n, blocksize):
    """code[index] * absmax of its block: what bitsandbytes' dequantize_4bit computes (its default,
    pure-torch path; its AVX512 CPU kernel agrees where it is right, see tests/test_quant.py). Decoded
    here rather than by bitsandbytes' kernel, whose CPU path differs between machines and is wrong
    on some shapes (chapter 4, section 6)."""
    from .quant import nf4_codebook
    return nf4_codebook()[_nibbles(packed, n)] * absmax.float().repeat_interleave(blocksize)[:n]


def _explain_codes(w, got_idx, want_idx, absmax, blocksize):
    """Why the learner's 4-bit codes differ from bitsandbytes': name the likely mistake, and show the
    first wrong element (its value, its value / absmax, the code chosen and the nearest NF4 code)."""
    from .quant import nf4_codebook
    code = nf4_codebook()
    flat = w.reshape(-1).float()
    scaled = flat / absmax.repeat_interleave(blocksize)
    nearest = lambda v: (v[:, None] - code).abs().argmin(dim=1)
    swapped = want_idx.view(-1, 2).flip(1).reshape(-1)
    guesses = (
        (swapped, "your nibbles are in the wrong order: element 2j of the flattened tensor goes in the HIGH nibble "
                  "(byte >> 4), element 2j + 1 in the low one"),
        (nearest(flat), "you rounded w itself, not w / absmax: divide each value by its block's absmax first, "
                        "so that the block fills [-1, 1]"),
        (((scaled + 1) * 7.5).round().clamp(0, 15).long(),
         "your codes are evenly spaced levels (-1 + 2k/15); NF4's 16 values are not evenly spaced: round to the "
         "nearest of lk.nf4_codebook()"),
        ((torch.searchsorted(code, scaled.contiguous(), right=True) - 1).clamp(0, 15),
         "you took the code just below each value, not the nearest one"),
    )
    for idx, why in guesses:
        if torch.equal(got_idx, idx):
            return why
    i = int((got_idx != want_idx).nonzero()[0])
    return (f"{int((got_idx != want_idx).sum())} of {got_idx.numel()} codes differ; the first is element {i} of "
            f"the flattened tensor: w = {flat[i].item():.5f}, w / absmax = {scaled[i].item():.4f}, you stored code "
            f"{got_idx[i].item()} ({code[got_idx[i]].item():.4f}), the nearest NF4 value is code {want_idx[i].item()} "
            f"({code[want_idx[i]].item():.4f})")


def _check_absmax(absmax, want, shape, blocksize, where):
    absmax = torch.as_tensor(absmax).reshape(-1)
    n, n_blocks = want.numel() * blocksize, want.numel()
    if absmax.numel() != n_blocks:
        rows = math.prod(shape[:-1]) if len(shape) > 1 else None
        why = (" (one per row? a block is blocksize consecutive elements of w.reshape(-1), and may span rows)"
               if absmax.numel() == rows else " (one for the whole tensor? one per block)" if absmax.numel() == 1
               else f" (blocks of {n // absmax.numel()}? this call asked for blocksize={blocksize})"
               if absmax.numel() and n % absmax.numel() == 0 else "")
        raise AssertionError(f"{where}: absmax has {absmax.numel()} values, expected {n_blocks} = {n} / {blocksize}, "
                             f"one per block{why}")
    assert absmax.dtype == torch.float32, \
        f"{where}: absmax is {absmax.dtype}, expected torch.float32 (bitsandbytes' dtype)"
    if not torch.equal(absmax, want):
        b = int((absmax != want).nonzero()[0])
        raise AssertionError(f"{where}: absmax of block {b} (elements {b * blocksize} to {(b + 1) * blocksize - 1} of "
                             f"w.reshape(-1)) is {absmax[b].item():.6g}, expected {want[b].item():.6g}: the largest "
                             "|value| of the block (abs first, then max)")


def _check_refusal(quantize):
    w = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    try:
        got = quantize(w, 64)
    except ValueError as e:
        assert "100" in str(e) and "64" in str(e), (f"for a tensor of 100 values at blocksize 64 your ValueError says "
                                                    f"{str(e)!r}: say the size (100) and the block size (64)")
        return
    except Exception as e:
        raise AssertionError(f"for a tensor of 100 values at blocksize 64 your code raised {type(e).__name__}({e}) "
                             "from inside; check the size first and raise ValueError, with a message that gives the "
                             "size and the block size") from e
    raise AssertionError(f"for a tensor of 100 values at blocksize 64 (not a multiple) you returned "
                         f"{type(got).__name__}: raise ValueError instead, with a message that gives the size and the "
                         "block size (bitsandbytes pads a short last block; this lab leaves that out)")


def _check_nf4_quantize(quantize):
    """True if quantize matches bitsandbytes on every hidden case (and refuses a bad size), False if
    it is not attempted; raises AssertionError naming the first mistake."""
    for i in range(len(NF4_CASES)):
        w, blocksize = _nf4_case(i)
        shape, n = tuple(w.shape), w.numel()
        where = f"w of shape {shape}, blocksize {blocksize}"
        want_packed, want_absmax = _nf4_reference(w, blocksize)
        done, got = _attempt(quantize, w.clone(), blocksize)
        if not done:
            return False
        assert isinstance(got, (tuple, list)) and len(got) == 2, \
            f"{where}: quantize should return (packed, absmax), got {type(got).__name__}"
        packed, absmax = (torch.as_tensor(t) for t in got)
        assert packed.dtype == torch.uint8, f"{where}: packed is {packed.dtype}, expected torch.uint8 (bytes)"
        if packed.numel() == n:
            raise AssertionError(f"{where}: packed has {n} bytes for {n} values, one code per byte: pack two 4-bit "
                                 f"codes in each byte, {n // 2} bytes")
        assert tuple(packed.shape) in ((n // 2,), (n // 2, 1)), \
            f"{where}: packed has shape {tuple(packed.shape)}, expected ({n // 2},): two codes per byte"
        _check_absmax(absmax, want_absmax, shape, blocksize, where)
        if not torch.equal(packed.reshape(-1), want_packed):
            why = _explain_codes(w, _nibbles(packed, n), _nibbles(want_packed, n), want_absmax, blocksize)
            raise AssertionError(f"{where}: your packed bytes differ from bitsandbytes': {why}")
    _check_refusal(quantize)
    return True


def _check_nf4_dequantize(dequantize):
    """True if dequantize decodes bitsandbytes' own bytes and absmax right on every hidden case, False
    if it is not attempted; raises AssertionError naming the first mistake. Needs no quantize of yours."""
    from .quant import nf4_codebook
    for i in range(len(NF4_CASES)):
        w, blocksize = _nf4_case(i)
        shape, n = tuple(w.shape), w.numel()
        where = f"w of shape {shape}, blocksize {blocksize}"
        want_packed, want_absmax = _nf4_reference(w, blocksize)
        done, out = _attempt(dequantize, want_packed.clone(), want_absmax.clone(), shape, blocksize)
        if not done:
            return False
        want = _nf4_decode(want_packed, want_absmax, n, blocksize).reshape(shape)
        assert isinstance(out, torch.Tensor), f"{where}: dequantize returned {type(out).__name__}, not a tensor"
        assert tuple(out.shape) == tuple(shape), f"{where}: dequantize gave shape {tuple(out.shape)}, expected {shape}"
        assert out.dtype == torch.float32, f"{where}: dequantize gave {out.dtype}, expected torch.float32"
        err = (out - want).abs().reshape(-1)
        if not (err <= 1e-6 * want_absmax.repeat_interleave(blocksize)).all():
            idx, flat = _nibbles(want_packed, n), out.reshape(-1)
            if torch.equal(flat, nf4_codebook()[idx]):
                why = "your values are the codes alone, in [-1, 1]: multiply each by its block's absmax"
            elif torch.equal(flat, _nf4_decode((want_packed << 4) | (want_packed >> 4), want_absmax, n, blocksize)):
                why = "you read the low nibble first: element 2j is in the HIGH nibble (byte >> 4)"
            else:
                why = _first_wrong(out, want, atol=1e-6 * want_absmax.max().item())
            raise AssertionError(f"{where}: dequantize of bitsandbytes' bytes is wrong: {why}")
    return True


def check_nf4_blockwise(quantize, dequantize):
    """Build it, chapter 4. quantize(w, blocksize) -> (packed, absmax): packed uint8 (n // 2,), two
    4-bit NF4 codes per byte (element 2j in the high nibble), absmax float32 (n // blocksize,), one
    per block of consecutive elements of w.reshape(-1); a ValueError when n is not a multiple of
    blocksize. dequantize(packed, absmax, shape, blocksize) -> float32 tensor of `shape`.

    Against bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4"): packed bytes and
    absmax identical (torch.equal). dequantize is fed bitsandbytes' own bytes and absmax and must
    give code[index] * absmax, bitsandbytes' formula, to within 1e-6 x the block's absmax (a float32
    rounding; exact in practice). That reference is decoded in plain torch, not by bitsandbytes' CPU
    kernel, which differs between CPUs; tests/test_build_labs_ch2_ch4.py holds it equal to
    dequantize_4bit on these cases.

    The two are checked independently (dequantize never sees the output of your quantize), and each
    is reported: ✓, not attempted, or an AssertionError that names the mistake. A wrong quantize is
    raised after dequantize's ✓ is printed (or with dequantize's own mistake appended). Full ✓ only
    when both pass; with neither attempted, one line (quantize's) says so."""
    try:
        q_done, q_error = _check_nf4_quantize(quantize), None
    except AssertionError as e:
        q_done, q_error = True, e
    try:
        d_done = _check_nf4_dequantize(dequantize)
    except AssertionError as d_error:
        if q_error is not None:
            raise AssertionError(f"{q_error}\n(and dequantize too: {d_error})") from q_error
        raise
    if q_error is not None:
        if d_done:
            _ok(f"dequantize: bitsandbytes' bytes decoded to code[index] x absmax on {len(NF4_CASES)} hidden cases")
        raise q_error
    if not q_done and not d_done:
        return _todo("blockwise NF4 quantize")
    if not q_done:
        _ok(f"dequantize: bitsandbytes' bytes decoded to code[index] x absmax on {len(NF4_CASES)} hidden cases")
        return _todo("blockwise NF4 quantize")
    if not d_done:
        _ok(f"quantize: packed bytes and absmax identical to bitsandbytes on {len(NF4_CASES)} hidden cases")
        return _todo("blockwise NF4 dequantize")
    return _ok(f"blockwise NF4: bytes and absmax identical to bitsandbytes' quantize_4bit on {len(NF4_CASES)} hidden "
               "cases, dequantized values equal to code[index] x absmax, and a size that is not a multiple of the block "
               "size refused")


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


def _bnb_peft_stack(weights, As, Bs, r, alpha):
    """The reference for check_nf4_matmul: bitsandbytes' Linear4bit layers (NF4, blocks of 64, fp32
    compute, the path that dequantizes exactly) in a stack, with peft's LoRA on each."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from .bnb_cpu import bnb_exact_on_cpu

    class Stack(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    layers = []
    for W in weights:
        l4 = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=torch.float32,
                               compress_statistics=False, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False,
                                      blocksize=64)
        layers.append(l4.to("cpu"))
    names = [str(i) for i in range(len(weights))]
    model = bnb_exact_on_cpu(get_peft_model(Stack(layers), LoraConfig(r=r, lora_alpha=alpha, target_modules=names)))
    lora = [model.base_model.model.layers[i] for i in range(len(weights))]
    with torch.no_grad():
        for layer, A, B in zip(lora, As, Bs):
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    return model, lora


def check_nf4_matmul(Function):
    """Function: a torch.autograd.Function whose apply(x, packed, state) computes x W^T for the NF4
    weight W that (packed, state) = lk.quantize_nf4(W, 64) holds: x (..., in) -> (..., out). Its
    forward saves what backward needs without the dequantized W; its backward returns
    (grad of x, None, None), dequantizing W again.

    Checked in a stack of two or three 4-bit layers with LoRA on each, against bitsandbytes'
    Linear4bit with peft's LoRA holding the same weights, A and B: the output, the gradient of every
    A and B (the first layer's reach it only through your backward) and of the input, within 1e-5
    + 1e-5 x |value| (fp32); and no saved tensor as large as W."""
    from .measure import count_saved_tensors
    from .quant import dequantize_nf4, quantize_nf4
    g = torch.Generator().manual_seed(5)
    cases = (((5,), (64, 64, 64)), ((2, 3), (128, 64, 192)), ((4,), (64, 128, 64, 128)))   # square first
    r, alpha = 4, 8
    for batch, dims in cases:
        Ws = [torch.randn(dims[i + 1], dims[i], generator=g) / dims[i] ** 0.5 for i in range(len(dims) - 1)]
        As = [torch.randn(r, W.shape[1], generator=g) * 0.1 for W in Ws]
        Bs = [torch.randn(W.shape[0], r, generator=g) * 0.1 for W in Ws]   # a non-zero B, so gradients flow to A
        x = torch.randn(*batch, dims[0], generator=g)
        quantized = [quantize_nf4(W, 64) for W in Ws]
        # yours: each layer is your 4-bit matmul plus LoRA, written out
        mine_A = [A.clone().requires_grad_() for A in As]
        mine_B = [B.clone().requires_grad_() for B in Bs]
        h = x_mine = x.clone().requires_grad_()
        for i, ((packed, state), A, B) in enumerate(zip(quantized, mine_A, mine_B)):
            try:
                with count_saved_tensors() as saved:
                    y = Function.apply(h, packed, state)
            except NotImplementedError:
                return _todo("the 4-bit matmul with its own backward")
            want_shape = (*h.shape[:-1], Ws[i].shape[0])
            assert isinstance(y, torch.Tensor) and tuple(y.shape) == want_shape, (
                f"layer {i}: for x of shape {tuple(h.shape)} and W of shape {tuple(Ws[i].shape)} (out x in) your forward "
                f"returned {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}; expected "
                f"{want_shape}: y = x W^T")
            assert y.dtype == h.dtype, f"layer {i}: your forward returned {y.dtype} for an input of {h.dtype}"
            assert y.grad_fn is not None, ("your output has no grad_fn: call it as Function.apply(x, packed, state), "
                                           "and return a tensor computed from x")
            kept = [v for v in vars(y.grad_fn).values() if isinstance(v, torch.Tensor)]
            big = [t for t in kept if t.is_floating_point() and t.numel() >= Ws[i].numel()]
            assert not big and saved["bytes"] < 2 * Ws[i].numel(), (                 # bf16 W: 2 bytes a weight
                f"layer {i}: your forward kept {saved['bytes'] + sum(t.nbytes for t in kept):,} bytes for backward, "
                f"{'including a float tensor as large as W' if big else 'as much as W in 16 bits or more'} "
                f"({Ws[i].numel() * 4:,} bytes in fp32). Save packed (and keep state), and dequantize again in "
                "backward: that is what makes a frozen 4-bit layer cost only its packed bytes between the passes")
            probe = h.detach().clone().requires_grad_()                   # this layer's backward, alone
            try:
                Function.apply(probe, packed, state).sum().backward()
            except RuntimeError as e:
                raise AssertionError(f"layer {i}: your backward failed: {str(e).splitlines()[0]}. It gets grad_y "
                                     "(..., out) and must return one gradient per input of forward: "
                                     "(grad_y W, None, None), where W is out x in") from None
            assert probe.grad is not None, (
                f"layer {i}: your backward returned None as the gradient of x. The base weight is frozen, but x is "
                "not: every layer before this one learns through grad_x = grad_y W")
            bad = _first_wrong(probe.grad, torch.ones_like(y) @ dequantize_nf4(packed, state), 1e-5, 1e-5)
            assert bad is None, (f"layer {i}: your backward's gradient of x is wrong: {bad}. It is grad_y W (W out x "
                                 "in, dequantized again in backward), not grad_y W^T, and not scaled")
            h = y + (alpha / r) * (h @ A.T) @ B.T
        out_mine = h
        # the reference: bitsandbytes + peft, the same weights, A and B
        ref, lora = _bnb_peft_stack(Ws, As, Bs, r, alpha)
        x_ref = x.clone().requires_grad_()
        out_ref = ref(x_ref)
        bad = _first_wrong(out_mine.detach(), out_ref.detach(), 1e-5, 1e-5)
        deq = max((dequantize_nf4(p, s) - W).abs().max().item() for (p, s), W in zip(quantized, Ws))
        assert bad is None, (f"the stack's output differs from bitsandbytes + peft: {bad}. Is W dequantized with "
                             f"lk.dequantize_nf4(packed, state) (it is within {deq:.2g} of the fp32 W here), and is it "
                             "x W^T, not x W?")
        try:
            out_mine.pow(2).mean().backward()
        except RuntimeError as e:
            raise AssertionError(f"your backward failed: {str(e).splitlines()[0]}. It gets grad_y (..., out) and must "
                                 "return one gradient per input of forward: (grad_y W, None, None), where W is "
                                 "out x in") from None
        out_ref.pow(2).mean().backward()
        n = len(Ws)
        for i in reversed(range(n)):                                     # the last layer first: it needs no backward of yours
            for name, mine, theirs in (("B", mine_B[i], lora[i].lora_B["default"].weight),
                                       ("A", mine_A[i], lora[i].lora_A["default"].weight)):
                assert mine.grad is not None and mine.grad.abs().sum() > 0, (
                    f"layer {i}'s LoRA {name} got no gradient: the gradient to every layer before the last flows "
                    "through your backward's grad of x. Does it return grad_y W, or None?")
                bad = _first_wrong(mine.grad, theirs.grad, 1e-5, 1e-5)
                assert bad is None, (
                    f"the gradient of layer {i}'s LoRA {name} (of {n} layers) differs from peft's: {bad}. "
                    + ("The last layer's gradients do not use your backward: check the forward." if i == n - 1 else
                       "Layers after it are right, so your backward's grad of x is wrong: it is grad_y W "
                       "(W out x in, dequantized in backward), not grad_y W^T, and not scaled"))
        bad = _first_wrong(x_mine.grad, x_ref.grad, 1e-5, 1e-5)
        assert bad is None, f"the gradient of the input differs from bitsandbytes': {bad}"
    return _ok("your 4-bit matmul and its backward match bitsandbytes' Linear4bit with peft's LoRA (to 1e-5), "
               "and keep no dequantized weight for backward")


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


# Build it (chapter 7): alpha as a step size. The hidden cases, (r, alpha, lr, new_alpha, rslora,
# new_rslora): for the rule, and (others) for the live peft runs.
STEP_RULE_CASES = ((8, 16, 2e-3, 32, False, False), (16, 32, 1e-3, 4, False, True), (64, 16, 2e-3, 4, True, True),
                   (64, 16, 2e-3, 128, True, False), (4, 8, 1e-4, 2, False, False))
STEP_LIVE_CASES = ((8, 16, 2e-3, 64, False, False), (16, 32, 1e-3, 16, False, True), (64, 16, 2e-3, 64, True, False))
STEP_LIVE_TOL = (1e-2, 0.15, 0.15)        # ||ΔW_yours - ΔW_reference|| / ||ΔW_reference|| after steps 1, 2, 3


def _setting(r, alpha, rslora):
    from .lora import lora_scaling
    s = lora_scaling(alpha, r, rslora)
    return f"{'rsLoRA' if rslora else 'LoRA'} r={r} alpha={alpha:g} (scaling {s:.4g})"


def _live_delta_w(r, alpha, lr, rslora, steps=3):
    """peft's LoRA on q and v of a tiny random Llama (tiny_llama(seed=0): hidden 64, 2 layers), its A
    drawn from seed 1 whatever alpha, lr and rslora, trained `steps` AdamW steps (weight decay 0, as
    lk.train.train) on one fixed batch of 4 x 16 random tokens, fp32 on the CPU. Returns, after each
    step, ΔW = scaling B A of every adapted module (peft's get_delta_weight), flattened and joined."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from .models import tiny_llama
    with torch.random.fork_rng(devices=[]):                 # the notebook's random state is left as it was
        base = tiny_llama(seed=0)
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                use_rslora=rslora)).train()
        ids = torch.randint(0, base.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        out = []
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                out.append(torch.cat([m.get_delta_weight("default").reshape(-1) for m in layers]))
    return out


def _live_gaps(r, alpha, lr, new_alpha, rslora, new_rslora, new_lr):
    """||ΔW_new - ΔW_ref|| / ||ΔW_ref|| after each step, and ΔW_new's size in units of ΔW_ref's."""
    ref = _live_delta_w(r, alpha, lr, rslora)
    new = _live_delta_w(r, new_alpha, new_lr, new_rslora)
    return ([((b - a).norm() / a.norm()).item() for a, b in zip(ref, new)],
            [(b @ a / (a @ a)).item() for a, b in zip(ref, new)])


def check_matching_lr(fn):
    """Build it, chapter 7. fn(r, alpha, lr, new_alpha, rslora, new_rslora) -> the learning rate at
    which a LoRA of the same rank r with new_alpha (rsLoRA if new_rslora) makes the same first
    updates ΔW = scaling B A as the one at (alpha, lr) (rsLoRA if rslora). Adam moves each entry of
    B by about lr in its first steps, whatever the gradient's size, so ΔW moves by about scaling x lr:
    the answer is lr x scaling / new_scaling, with scaling alpha / r, or alpha / sqrt(r) with rsLoRA.

    First the numbers, on 5 hidden cases, against that rule to 1e-9 relative, with a diagnosis when
    wrong. Then live runs with peft, on 3 other cases: a tiny random Llama with LoRA on q and v, the
    same A at the start, 3 AdamW steps on one fixed batch at (alpha, lr) and at (new_alpha, your lr);
    ΔW after each step must agree within 1e-2 (step 1) and 0.15 (steps 2 and 3) of the reference's
    norm. Measured with the exact rule: at most 0.2% after step 1 (Adam's eps, 1e-8, is not scale-free
    for the smallest gradients) and 7% after step 3 (A moves by about lr per step too, and the lrs
    differ: "close, not equal", the chapter's section 3)."""
    from .lora import lora_scaling
    for r, alpha, lr, new_alpha, rslora, new_rslora in STEP_RULE_CASES:
        done, got = _attempt(fn, r, alpha, lr, new_alpha, rslora, new_rslora)
        if not done:
            return _todo("the learning rate that matches a new alpha")
        where = f"from {_setting(r, alpha, rslora)} at lr={lr:g} to {_setting(r, new_alpha, new_rslora)}"
        try:
            if isinstance(got, (str, bytes)):
                raise TypeError
            got = float(got)
        except (TypeError, ValueError):
            raise AssertionError(f"{where}: you returned {type(got).__name__}; return the learning rate, a number") \
                from None
        s, s_new = lora_scaling(alpha, r, rslora), lora_scaling(new_alpha, r, new_rslora)
        want = lr * s / s_new
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        near = lambda x: math.isclose(got, x, rel_tol=1e-9)   # noqa: E731
        hints = [(near(lr), f"you returned lr unchanged, but the scaling goes from {s:.4g} to {s_new:.4g}: "
                            "the learning rate must make up the difference"),
                 (near(lr * s_new / s), "the ratio is upside down (lr x new_scaling / scaling): a larger scaling "
                                        "makes larger steps, so it needs a SMALLER learning rate"),
                 (any(near(x) for x in (s, s_new, s / s_new, s_new / s)),
                  "that is a scaling (or a ratio of scalings), not a learning rate: multiply lr by it"),
                 (near(lr * alpha / new_alpha), "you kept lr x alpha constant (one rule for both settings), which "
                                                "holds when both scale alike; here one is rsLoRA, whose scaling is "
                                                "alpha / sqrt(r), the other plain LoRA's alpha / r"),
                 (near(lr * lora_scaling(alpha, r, new_rslora) / lora_scaling(new_alpha, r, rslora)),
                  "you swapped the two rules: `rslora` is the first setting's, `new_rslora` the new one's")]
        hint = next((h for cond, h in hints if cond), "keep scaling x lr the same: lr x scaling / new_scaling")
        raise AssertionError(f"{where}: you gave lr={got:.6g}, expected {want:.6g} = {lr:g} x {s:.4g} / {s_new:.4g}: "
                             f"{hint}")
    worst = [0.0] * len(STEP_LIVE_TOL)
    for r, alpha, lr, new_alpha, rslora, new_rslora in STEP_LIVE_CASES:
        done, got = _attempt(fn, r, alpha, lr, new_alpha, rslora, new_rslora)
        if not done:
            return _todo("the learning rate that matches a new alpha")
        got = float(got)
        gaps, sizes = _live_gaps(r, alpha, lr, new_alpha, rslora, new_rslora, got)
        for step, (gap, size, tol) in enumerate(zip(gaps, sizes, STEP_LIVE_TOL), start=1):
            if gap > tol:
                s, s_new = lora_scaling(alpha, r, rslora), lora_scaling(new_alpha, r, new_rslora)
                raise AssertionError(
                    f"live peft runs (tiny Llama, LoRA on q and v, AdamW), {_setting(r, alpha, rslora)} at lr={lr:g} "
                    f"against {_setting(r, new_alpha, new_rslora)} at your lr={got:.6g}: after step {step} of "
                    f"{len(STEP_LIVE_TOL)} the two ΔW = scaling B A differ by {100 * gap:.3g}% of the reference's norm "
                    f"(tolerance {100 * tol:g}%); yours is {size:.3g} x the reference's. Adam moves B by about lr per "
                    f"entry, so ΔW moves by about scaling x lr: {s:.4g} x {lr:g} = {s * lr:.3g} there, "
                    f"{s_new:.4g} x {got:.3g} = {s_new * got:.3g} in yours")
            worst[step - 1] = max(worst[step - 1], gap)
    return _ok(f"lr x scaling / new_scaling on {len(STEP_RULE_CASES)} hidden cases (to 1e-9); in live peft runs "
               f"({len(STEP_LIVE_CASES)} cases, 3 AdamW steps) your lr's ΔW is within {worst[0]:.1%} of the reference's "
               f"after step 1 and {worst[-1]:.0%} after step 3: A moves by lr too, so close, not equal")


def check_virtual_tokens(fn):
    """fn(embeds, attention_mask, labels, prompt) -> (embeds, attention_mask, labels) with prompt
    tuning's n virtual tokens in front of every row: embeds (B, T, d), attention_mask (B, T),
    labels (B, T), prompt (n, d) -> (B, n + T, d), (B, n + T), (B, n + T).

    Checked on a small random Llama against peft's prompt tuning (PromptTuningConfig) holding the
    same virtual tokens: the logits within 1e-5, the loss within 1e-6 relative, and the gradient of
    the virtual tokens within 1e-5 of its largest value; and, before that, the shapes, dtypes and
    values of what you return."""
    from peft import PromptTuningConfig, get_peft_model
    from .models import tiny_llama
    g = torch.Generator().manual_seed(8)
    for B, T, n, pad in ((2, 7, 4, (0, 2)), (3, 5, 6, (1, 0, 3)), (1, 9, 1, (0,))):
        ids = torch.randint(0, 256, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        for b, p in enumerate(pad):                                   # right padding, as training batches have
            if p:
                mask[b, -p:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100                                           # a prompt the loss does not see
        theirs = get_peft_model(tiny_llama(seed=1), PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM"))
        prompt_ref = theirs.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            prompt_ref.copy_(0.5 * torch.randn(n, prompt_ref.shape[1], generator=g))
        model = tiny_llama(seed=1).requires_grad_(False)
        prompt = prompt_ref.detach().clone().requires_grad_()
        embeds = model.get_input_embeddings()(ids)
        done, got = _attempt(fn, embeds, mask.clone(), labels.clone(), prompt)
        if not done:
            return _todo("the virtual tokens of prompt tuning")
        assert isinstance(got, (tuple, list)) and len(got) == 3, \
            "return three things: (embeds, attention_mask, labels), each with the n virtual tokens in front"
        e, m, lab = got
        d = embeds.shape[-1]
        for what, t, shape in (("embeds", e, (B, n + T, d)), ("attention_mask", m, (B, n + T)),
                               ("labels", lab, (B, n + T))):
            assert isinstance(t, torch.Tensor) and tuple(t.shape) == shape, (
                f"for a batch of {B} rows of {T} tokens and {n} virtual tokens, your {what}: shape "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}, expected {shape}"
                + (": the prompt is (n, d), one copy in front of every row (expand it over the batch)"
                   if what == "embeds" else ""))
        assert m.dtype == mask.dtype and lab.dtype == labels.dtype, (
            f"keep the dtypes: attention_mask {m.dtype} (given {mask.dtype}), labels {lab.dtype} (given {labels.dtype})")
        assert e.grad_fn is not None, ("your embeds carry no gradient back to the prompt: concatenate the prompt "
                                       "tensor itself (torch.cat), not a detached copy or its .data")
        assert torch.equal(m[:, n:], mask) and torch.equal(lab[:, n:], labels) and torch.equal(e[:, n:], embeds), (
            "the last T positions must be the input as it was: the virtual tokens go in FRONT of each row")
        assert torch.equal(m[:, :n], torch.ones_like(m[:, :n])), (
            f"the attention mask of the virtual tokens is {m[0, :n].tolist()}: it must be 1, or no token attends to them")
        assert (lab[:, :n] == -100).all(), (
            f"the labels of the virtual tokens are {lab[0, :n].tolist()}: they must be -100 (the loss ignores them; "
            "there is no token to predict there)")
        bad = _first_wrong(e[:, :n].detach(), prompt.detach().expand(B, -1, -1), 0.0)
        assert bad is None, f"the first n embeddings of every row must be the prompt, in order: {bad}"
        mine, ref = model(inputs_embeds=e, attention_mask=m, labels=lab), theirs(input_ids=ids, attention_mask=mask,
                                                                              labels=labels)
        bad = _first_wrong(mine.logits.detach(), ref.logits.detach(), 1e-5)
        assert bad is None, f"the logits differ from peft's prompt tuning: {bad}"
        assert math.isclose(mine.loss.item(), ref.loss.item(), rel_tol=1e-6), \
            f"your loss {mine.loss.item():.6f}, peft's {ref.loss.item():.6f}"
        mine.loss.backward()
        ref.loss.backward()
        bad = _first_wrong(prompt.grad, prompt_ref.grad, 1e-5 * prompt_ref.grad.abs().max().item())
        assert bad is None, f"the gradient of the virtual tokens differs from peft's: {bad}"
    return _ok("your virtual tokens give peft's prompt tuning: the same logits, loss and gradient of the prompt")


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


def _peft_adapters_on_one_layer(W0, adapters):
    """peft's LoRA on one nn.Linear holding W0, one named adapter per (A, B, alpha) in `adapters`
    (each at its own rank): the reference for check_mixed_lora."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=False)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(W0)
    model = None
    for k, (A, B, alpha) in enumerate(adapters):
        config = LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"])
        if model is None:
            model = get_peft_model(holder, config, adapter_name=str(k))
        else:
            model.add_adapter(str(k), config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A[str(k)].weight.copy_(A)
            layer.lora_B[str(k)].weight.copy_(B)
    return model.eval()


def check_mixed_lora(fn):
    """fn(x, W0, A, B, scaling, index) -> h, one forward pass of a batch whose rows each use their
    own LoRA adapter:  h[b] = x[b] W0^T + scaling[k] x[b] A[k]^T B[k]^T  with k = index[b], and
    h[b] = x[b] W0^T where index[b] = -1 (the base alone).
    x (batch, tokens, in); W0 (out, in); A (n_adapters, r_max, in); B (n_adapters, out, r_max),
    adapters of smaller rank zero-padded to r_max; scaling (n_adapters,); index (batch,) long.

    Checked against each row run alone through peft, with that row's adapter set (or peft's
    adapters disabled for -1), within 1e-5 + 1e-5 x |value| (fp32)."""
    g = torch.Generator().manual_seed(9)
    cases = (((5, 3), 16, 12, (4, 8, 2), (8, 16, 2), [0, 2, -1, 1, 0]),
             ((4, 1), 24, 24, (2, 2), (4, 2), [1, 1, 0, -1]),
             ((3, 2), 8, 10, (3,), (6,), [-1, 0, -1]))
    for (batch, tokens), d_in, d_out, ranks, alphas, index in cases:
        W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        adapters = [(torch.randn(r, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r, generator=g) * 0.5, a)
                    for r, a in zip(ranks, alphas)]
        r_max = max(ranks)
        A = torch.zeros(len(ranks), r_max, d_in)
        B = torch.zeros(len(ranks), d_out, r_max)
        for k, (a, b, _) in enumerate(adapters):
            A[k, :a.shape[0]], B[k, :, :b.shape[1]] = a, b
        scaling = torch.tensor([alpha / r for r, alpha in zip(ranks, alphas)])
        x = torch.randn(batch, tokens, d_in, generator=g)
        idx = torch.tensor(index)
        done, got = _attempt(fn, x, W0.clone(), A.clone(), B.clone(), scaling.clone(), idx.clone())
        if not done:
            return _todo("the mixed-adapter forward pass")
        assert isinstance(got, torch.Tensor) and tuple(got.shape) == (batch, tokens, d_out), (
            f"for x of shape {tuple(x.shape)}, W0 {tuple(W0.shape)} (out x in), A {tuple(A.shape)} and "
            f"B {tuple(B.shape)} you returned {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}"
            f"; expected {(batch, tokens, d_out)}: one row of out values per token")
        peft_model = _peft_adapters_on_one_layer(W0, adapters)
        with torch.no_grad():
            for b, k in enumerate(index):
                if k < 0:
                    with peft_model.disable_adapter():
                        want = peft_model(x[b:b + 1])[0]
                else:
                    peft_model.set_adapter(str(k))
                    want = peft_model(x[b:b + 1])[0]
                bad = _first_wrong(got[b], want, 1e-5, 1e-5)
                if bad is None:
                    continue
                base_only = (got[b] - x[b] @ W0.T).abs().max() <= 1e-5
                other = [j for j in range(len(ranks)) if j != k and (
                    got[b] - x[b] @ W0.T - scaling[j] * x[b] @ A[j].T @ B[j].T).abs().max() <= 1e-4]
                if k < 0:
                    hint = (f"Index -1 means the base alone, but your row used adapter {other[0]}"
                            + (" (A[-1] is the last adapter in Python: mask the rows with index -1)"
                               if other == [len(ranks) - 1] else "") if other else
                            "Index -1 means the base alone: x W0^T and nothing added")
                elif base_only:
                    hint = f"Your row is the base alone, without adapter {k}'s update"
                elif other:
                    hint = (f"Your row used adapter {other[0]}'s A and B, not its own ({k}): each row gathers "
                            "A[index[b]] and B[index[b]]")
                else:
                    hint = (f"Each row adds scaling[k] x A[k]^T B[k]^T, with its own adapter's scaling "
                            f"({scaling[k].item():g} for adapter {k}), to x W0^T")
                raise AssertionError(f"row {b} (adapter {k}, of a batch using {index}) differs from that row run "
                                     f"alone through peft: {bad}. {hint}")
    return _ok("each row of your mixed batch equals that row run alone through peft with its adapter "
               "(to 1e-5), the base-alone rows too")
