"""Adapters and IA3 from scratch (chapter 8): the other PEFT families, each on one screen.

- Bottleneck adapter (Houlsby et al., 2019): a small MLP, d -> m -> d, with a residual connection.
  Serial: placed after a sublayer, on its output: y = f(x); y + up(act(down(y))).
  Parallel (He et al., 2022): beside the sublayer, on its input: f(x) + s * up(act(down(x))).
  `up` starts at zero, so either adapter starts exactly at the base model (as LoRA's B = 0 does).
- IA3 (Liu et al., 2022): learned vectors that rescale the keys, the values and the MLP's inner
  activation; they start at one, so the model starts at the base model too.
"""
import itertools

import torch
import torch.nn as nn

from .lora import find_targets, replace_module

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """up(act(down(x))), with `up` initialised to zero: the adapter's output starts at 0."""

    def __init__(self, d, bottleneck, activation="relu"):
        super().__init__()
        if not isinstance(bottleneck, int) or not 0 < bottleneck <= d:
            raise ValueError(f"bottleneck must be an int in 1..{d} (the layer's width), got {bottleneck!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(d, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):                       # computed in the adapter's dtype (fp32), returned in x's
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class SerialAdapter(nn.Module):
    """y = sublayer(x); y + adapter(y). The extra work sits on the path: more latency per token."""

    def __init__(self, sublayer, d, bottleneck, activation="relu"):
        super().__init__()
        self.base, self.adapter = sublayer, Bottleneck(d, bottleneck, activation)

    def forward(self, x):
        y = self.base(x)
        return y + self.adapter(y)


class ParallelAdapter(nn.Module):
    """sublayer(x) + scale * adapter(x): the adapter reads the sublayer's input, beside it, so on
    hardware that runs the two branches at once it adds no step to the path."""

    def __init__(self, sublayer, d, bottleneck, activation="relu", scale=1.0):
        super().__init__()
        self.base, self.adapter, self.scale = sublayer, Bottleneck(d, bottleneck, activation), scale

    def forward(self, x):
        return self.base(x) + self.scale * self.adapter(x)


def inject_adapters(model, kind="serial", bottleneck=16, activation="relu", scale=1.0,
                    targets=("o_proj", "mlp")):
    """Freeze `model` and put a bottleneck adapter on each module named by `targets` (default: each
    layer's attention output projection and its whole MLP, the two places Houlsby et al. use).
    `kind` is "serial" (on the module's output) or "parallel" (beside it, on its input).
    Both need a module whose input and output widths are equal."""
    if kind not in ("serial", "parallel"):
        raise ValueError(f"kind must be 'serial' or 'parallel', got {kind!r}")
    names = _match(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.config.hidden_size
    for name in names:
        module = model.get_submodule(name)
        wrapped = (SerialAdapter(module, d, bottleneck, activation) if kind == "serial"
                   else ParallelAdapter(module, d, bottleneck, activation, scale))
        replace_module(model, name, wrapped.to(module_device(module) or module_device(model)))
    model.adapter_config = dict(kind=kind, bottleneck=bottleneck, activation=activation, scale=scale,
                                targets=list(targets))
    return model


def module_device(module):
    """Where a module's tensors are: its first parameter's device, or its first buffer's (a 4-bit
    layer without a bias holds its weight in buffers only); None if it holds no tensor at all."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device


def _match(model, targets):
    """Names of the modules whose last name part is in `targets` (e.g. 'o_proj', 'mlp')."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = find_targets(model, targets)
    if not names:
        raise ValueError(f"no module matches {list(targets)}; module names end in e.g. "
                         f"{sorted({n.rsplit('.', 1)[-1] for n, _ in model.named_modules() if n})[:12]}")
    return names


class IA3Linear(nn.Module):
    """A frozen linear layer whose output (keys, values) or input (the MLP's down projection,
    `feedforward=True`) is multiplied element-wise by a learned vector that starts at one."""

    def __init__(self, base, feedforward=False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3 wraps nn.Linear layers, got {type(base).__name__}")
        self.base, self.feedforward = base, feedforward
        size = base.in_features if feedforward else base.out_features
        # fp32 whatever the base's dtype, as peft keeps it; the products are cast back to the layer's dtype
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=torch.float32))
        base.weight.requires_grad_(False)

    def forward(self, x):
        if self.feedforward:
            return self.base((x * self.ia3_l).to(x.dtype))      # rescale the MLP's inner activation
        h = self.base(x)
        return (h * self.ia3_l).to(h.dtype)                     # rescale the keys or the values

    def extra_repr(self):
        return f"feedforward={self.feedforward}, scaled={self.ia3_l.numel()}"


def inject_ia3(model, targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",)):
    """Freeze `model` and wrap each linear layer matching `targets` (peft-style names) in IA3Linear;
    those in `feedforward` are rescaled on their input, the others on their output."""
    unknown = set(feedforward) - set(targets)
    if unknown:
        raise ValueError(f"feedforward modules {sorted(unknown)} must also be in targets {list(targets)}")
    names = find_targets(model, list(targets))
    if not names:
        raise ValueError(f"targets {list(targets)} match no module of this {type(model).__name__}; its linear "
                         f"layers are named {sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        replace_module(model, name, IA3Linear(model.get_submodule(name), name.rsplit(".", 1)[-1] in feedforward))
    model.ia3_config = dict(targets=list(targets), feedforward=list(feedforward))
    return model


def ia3_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]
