"""LoRA from scratch: the layer (chapter 2) and its injection into a model (chapter 3).

    h = W0 x + (alpha / r) * B A x          W0: (out, in) frozen,  A: (r, in),  B: (out, r)

Only A and B train. With B = 0 at the start, h = W0 x: the model begins exactly where the
pretrained one was. peft's `lora/layer.py` does the same in one line among 2,600 (see chapter 2).
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("kaiming", "gaussian", "zeros", "random")
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]          # the attention projections of a Llama-style model


def lora_scaling(alpha, r, use_rslora=False):
    """What LoRA multiplies B A by: alpha / r, or rsLoRA's alpha / sqrt(r) (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: h = W0 x + scaling * B A x."""

    def __init__(self, base, r, alpha, dropout=0.0, init="kaiming", use_rslora=False, dtype=None):
        super().__init__()
        _check_lora_args(base, r, alpha, dropout, init)
        self.base = base.requires_grad_(False)                    # W0 (and bias): frozen
        self.r, self.alpha, self.init, self.use_rslora = r, alpha, init, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)         # alpha / r, or alpha / sqrt(r) (rsLoRA)
        # A and B are kept in fp32 whatever the base's dtype (bf16, or 4 bits in chapter 5), as peft
        # keeps them (autocast_adapter_dtype): small updates to them are not lost to bf16's 8 bits.
        kw = dict(device=_device(base), dtype=dtype or torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))     # A: (r, in)
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **kw))    # B: (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init=None):
        init = self.init if init is None else init         # by default, the init the layer was built with
        A, B = self.lora_A.data, self.lora_B.data
        if init in ("kaiming", "random"):
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))    # peft's default for A
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / self.r)             # peft's "gaussian": the paper says Gaussian, σ = 1/r is peft's
        else:
            nn.init.zeros_(A)                              # "zeros": an ablation, nothing can learn
        if init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))    # an ablation: the model no longer starts at W0
        else:
            nn.init.zeros_(B)                              # B = 0, so B A = 0 at the start

    def forward(self, x):                                  # x: (..., in)
        h = self.base(x)                                   # W0 x + bias       (..., out)
        if self.merged:                                    # W0 already holds W0 + scaling * B A
            return h
        x = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)   # B A x   (..., out)
        return h + (update * self.scaling).to(h.dtype)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling   # scaling * B A   (out, in)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("merge(): this layer is already merged; call unmerge() first")
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("unmerge(): this layer is not merged")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta):
        if hasattr(self.base, "add_to_weight"):       # a base that stores W its own way (4 bits: chapter 5)
            self.base.add_to_weight(delta)
        else:
            _check_mergeable(self.base)
            self.base.weight += delta.to(self.base.weight.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, init={self.init!r}, merged={self.merged}"


def _check_mergeable(base):
    """bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear but store W quantized, without an
    add_to_weight: W += delta would be truncated (int8: an update below 1 is lost) or fail (4-bit)."""
    if type(base).__module__.split(".")[0] == "bitsandbytes":
        raise TypeError(f"cannot merge LoRA into bitsandbytes' {type(base).__name__}: its weight is stored quantized, "
                        "so adding B A to it would be lost or fail. Keep the adapter unmerged, merge with peft's "
                        "merge_and_unload (it dequantizes, adds and quantizes again), or quantize with labkit's "
                        "LinearNF4 (lk.quantize_model), which merges through add_to_weight")


def _device(module):
    return next(iter([*module.parameters(), *module.buffers()])).device


def is_linear(module):
    """What LoRA can wrap: an nn.Linear, or a layer that offers what LoRALinear uses of one
    (in_features, out_features, forward, add_to_weight), as chapter 5's 4-bit LinearNF4 does."""
    return isinstance(module, nn.Linear) or all(hasattr(module, a) for a in ("in_features", "out_features",
                                                                              "add_to_weight"))


def packed_weights(model):
    """Weights that layers store outside their parameters (a 4-bit layer's packed bytes), counted
    as the weights they stand for."""
    return sum(getattr(m, "packed_weights", 0) for m in model.modules())


def _check_lora_args(base, r, alpha, dropout, init):
    if not is_linear(base):
        raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r must be an integer >= 1, got {r!r}")
    if r > min(base.in_features, base.out_features):
        raise ValueError(f"rank r={r} is larger than min(in_features, out_features) = "
                         f"min({base.in_features}, {base.out_features}): B A could not be low-rank")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


# ---------------------------------------------------------------------------------------------
# Injection: find the target nn.Linear layers by name and wrap each one in a LoRALinear.

def find_targets(model, target_modules):
    """Names of the modules that `target_modules` selects, matched the way peft matches them.

    A list of names matches a module whose full name is a name or ends in "." + name
    ("q_proj" matches "model.layers.0.self_attn.q_proj"); a string is a regular expression that
    must match the whole name; "all-linear" takes every nn.Linear except the output head."""
    names = [n for n, _ in model.named_modules() if n]
    if target_modules == "all-linear":
        out_head = _output_head_name(model)
        return [n for n, m in model.named_modules()
                if is_linear(m) and n != out_head and not _inside_lora(n)]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one module, e.g. ['q_proj', 'v_proj']")
    keys = list(target_modules)
    return [n for n in names if any(n == k or n.endswith("." + k) for k in keys)]


def inject_lora(model, target_modules, r, alpha, dropout=0.0, init="kaiming", use_rslora=False):
    """Freeze `model`, then replace each target nn.Linear by a LoRALinear. Returns the model.
    A second call may add targets with the same settings (model.lora_config then lists them all);
    labkit keeps one setting per model, so other settings are an error."""
    settings = dict(r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora)
    earlier = _earlier_targets(model, settings, target_modules)          # [] on a first call
    targets = find_targets(model, target_modules)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise ValueError(f"target_modules={target_modules!r} matches no module of this "
                         f"{type(model).__name__}; its nn.Linear layers are named {linear}")
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) or _inside_lora(name):
            raise ValueError(f"{name} already has a LoRA adapter: inject_lora was called twice on it")
        if not is_linear(module):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear: "
                            "LoRALinear can only wrap linear layers")
        _check_lora_args(module, r, alpha, dropout, init)       # r fits every target, before the first is replaced
    model.requires_grad_(False)                                  # freeze every weight of the model,
    for name in targets:                                         # then put a LoRALinear around each target
        replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, init, use_rslora))
    if earlier:
        target_modules = earlier + [t for t in target_modules if t not in earlier]
    model.lora_config = dict(target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                             **settings)
    return model


def _earlier_targets(model, settings, target_modules):
    """The targets of an earlier inject_lora call on `model` ([] if none), after checking that this
    call uses the same settings."""
    old = getattr(model, "lora_config", None)
    if old is None or not lora_layers(model):
        return []
    differ = {k: (old[k], v) for k, v in settings.items() if old.get(k) != v}
    if differ:
        raise ValueError(f"this model already has LoRA layers with other settings {differ} (old, new): labkit "
                         "keeps one setting per model; inject every target in one call, or use peft's "
                         "rank_pattern/alpha_pattern for per-module settings")
    if isinstance(old["target_modules"], str) or isinstance(target_modules, str):
        raise ValueError("a second inject_lora call cannot be combined with a regular expression: name all "
                         "targets in one call")
    return list(old["target_modules"])


def replace_module(model, name, module):
    """Put `module` where the dotted `name` is, e.g. "model.layers.0.self_attn.q_proj"."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _inside_lora(name):
    return name.endswith(".base") or ".base." in name


def _output_head_name(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    return next((n for n, m in model.named_modules() if m is head), None)


def lora_layers(model):
    """(name, LoRALinear) for every adapted layer of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for _, m in lora_layers(model):                # every layer can take its update, or none is merged
        if not hasattr(m.base, "add_to_weight"):
            _check_mergeable(m.base)
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()
    return model


# ---------------------------------------------------------------------------------------------
# Counting what trains, and the adapter's tensors alone (lk.adapter_files writes and reads them).

def count_parameters(model):
    """(trainable, total) parameter counts; shared (tied) tensors are counted once, and a 4-bit
    layer's packed weight counts as the in x out frozen parameters it stores (as peft counts them)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total + packed_weights(model)


def lora_report(model, show=True):
    """Per module type (q_proj, v_proj, ...): layers adapted, trainable LoRA parameters, and the
    frozen parameters they sit on; then the model's trainable / total. Returns the rows."""
    rows = {}
    for name, m in lora_layers(model):
        kind = name.rsplit(".", 1)[-1]
        row = rows.setdefault(kind, dict(module=kind, layers=0, lora_params=0, base_params=0))
        row["layers"] += 1
        row["lora_params"] += m.lora_A.numel() + m.lora_B.numel()
        row["base_params"] += m.base.in_features * m.base.out_features
    trainable, total = count_parameters(model)
    rows = list(rows.values())
    if show:
        print(f"{'module':<12}{'layers':>7}{'LoRA params':>14}{'frozen params':>15}")
        for row in rows:
            print(f"{row['module']:<12}{row['layers']:>7}{row['lora_params']:>14,}{row['base_params']:>15,}")
        print(f"trainable: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return rows


def lora_state_dict(model):
    """Only the adapter: {'<layer>.lora_A': (r, in), '<layer>.lora_B': (out, r)}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
