"""Chapter 2 (the LoRA layer): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ._common import _attempt, _ok, _todo, _first_wrong, _ratio


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
