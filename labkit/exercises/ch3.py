"""Chapter 3 (injecting LoRA): the checkers of its exercises and its Build-it lab."""
import torch

from ..lora import count_parameters, inject_lora
from ._common import _attempt, _ok, _todo, _first_diff


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
    from ..models import tiny_llama
    return [("2 layers", lambda: tiny_llama(seed=0), ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8),
            ("3 layers, with a decoy qkv_proj", lambda: _decoy_qkv(tiny_llama(seed=1, num_hidden_layers=3)),
             ["q_proj", "v_proj"], 2, 16),
            ("2 layers, 1 key/value head", lambda: tiny_llama(seed=2, num_key_value_heads=1), ["k_proj", "o_proj"], 8, 4)]




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
        from ..models import tiny_llama
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
