"""One base model, many LoRA adapters (chapter 9): several adapters loaded beside one frozen base,
a batch whose rows each use their own adapter in one forward pass. Chapter 9's three tasks, their
training recipe and cached runs are lk.tasks', also reachable here (lk.serving.RECIPE, ...).

The idea behind S-LoRA and Punica: every adapted layer keeps the adapters' A and B stacked,
(n_adapters, r, in) and (n_adapters, out, r), and each row of the batch gathers its own pair:

    h[b] = W0 x[b] + scaling[k_b] * B[k_b] A[k_b] x[b]        k_b: the adapter of row b

Adapters of other ranks are zero-padded to the largest rank (zero rows of A and zero columns of B
add nothing); a layer that an adapter does not target holds zeros for it. A row may also use no
adapter (the base model alone).

    model = lk.serving.attach(base, {"people": "people.safetensors", "dates": "dates_peft/"})
    with lk.serving.rows(model, ["people", "dates", None]):
        logits = model(**batch).logits          # row 0: people's adapter, row 1: dates', row 2: the base
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from .adapter_files import check_model_type, read_adapter
from .lora import _device, is_linear, lora_scaling, replace_module
from .tasks import (COMBINATIONS, DENSITY, MAX_NEW_TOKENS, RECIPE, TASKS, adapter_dir, folder_bytes,  # noqa: F401
                    load_results, results_path, train_adapter, union_rows)     # (chapter 9 reads them here)


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with several named LoRA adapters; `row_index` (set by rows()) picks
    one for each row of the batch: an index into the stacks, or -1 for the base alone."""

    def __init__(self, base, names, A, B, scaling):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.names = list(names)
        self.register_buffer("A", A)                  # (n_adapters, r_max, in)
        self.register_buffer("B", B)                  # (n_adapters, out, r_max)
        self.register_buffer("scaling", scaling)      # (n_adapters,)
        self.row_index = None

    def forward(self, x):                             # x: (batch, ..., in)
        h = self.base(x)
        if self.row_index is None:
            raise RuntimeError("no adapter chosen for the rows of this batch: run the model inside "
                               "lk.serving.rows(model, names)")
        k = self.row_index
        if k.numel() != x.shape[0]:
            raise ValueError(f"{k.numel()} adapter names for a batch of {x.shape[0]} rows")
        use = k.clamp(min=0)
        A, B = self.A[use], self.B[use]                               # (batch, r, in), (batch, out, r)
        s = self.scaling[use] * (k >= 0)                               # 0 for rows without an adapter
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)      # (batch, tokens, in)
        update = torch.bmm(torch.bmm(flat, A.transpose(1, 2)), B.transpose(1, 2))   # B A x, row by row
        update = update * s[:, None, None]
        return h + update.reshape(*h.shape[:-1], -1).to(h.dtype)

    def extra_repr(self):
        return f"adapters={self.names}, r_max={self.A.shape[1]}"


def attach(model, adapters):
    """Put the adapters {name: path} (files of save_adapter, or peft folders) beside `model`'s
    frozen weights, each layer that any of them targets becoming a MultiLoRALinear. Returns the model."""
    if not adapters:
        raise ValueError("no adapters given: pass {name: path}")
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError("this model already has adapters attached: attach them all in one call")
    names = list(adapters)
    read = {name: read_adapter(path) for name, path in adapters.items()}
    for name, (config, _) in read.items():
        check_model_type(model, config, adapters[name])
    layers = sorted({k.rsplit(".", 1)[0] for _, tensors in read.values() for k in tensors})
    r_max = max(config["r"] for config, _ in read.values())
    scaling = torch.tensor([lora_scaling(c["alpha"], c["r"], c["use_rslora"]) for c, _ in read.values()])
    # Every layer is checked, and its stacks built, before the first one is replaced: a refused call changes nothing.
    stacks = {layer: _stack(model, layer, names, list(read.values()), r_max) for layer in layers}
    model.requires_grad_(False)
    for layer, (base, A, B) in stacks.items():
        device = _device(base)
        replace_module(model, layer, MultiLoRALinear(base, names, A.to(device), B.to(device), scaling.to(device)))
    model.adapter_names = names
    return model


def _stack(model, layer, names, read, r_max):
    """(base, A, B) of one layer: every adapter's A and B for it, zero-padded to r_max, after checking
    that the layer is a plain linear layer of this model that they fit."""
    try:
        base = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"adapter layer {layer} is not a module of this {type(model).__name__}: "
                         "the adapters were trained on another model") from None
    if not is_linear(base):
        raise TypeError(f"{layer} is a {type(base).__name__}, not a linear layer (attach adapters to a fresh "
                        "base model, without LoRA layers of its own)")
    A = torch.zeros(len(names), r_max, base.in_features)
    B = torch.zeros(len(names), base.out_features, r_max)
    for i, (config, tensors) in enumerate(read):
        if f"{layer}.lora_A" not in tensors:
            continue                                   # this adapter leaves the layer alone
        a, b = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise ValueError(f"adapter {names[i]!r} does not fit {layer}: A {tuple(a.shape)}, B "
                             f"{tuple(b.shape)} for a layer of {base.in_features} -> {base.out_features}")
        A[i, :a.shape[0]], B[i, :, :b.shape[1]] = a, b
    return base, A, B


@contextmanager
def rows(model, names):
    """Within the block, row b of every batch uses the adapter names[b] (None: the base alone)."""
    known = getattr(model, "adapter_names", None)
    if known is None:
        raise ValueError("this model has no adapters attached: call lk.serving.attach first")
    if isinstance(names, str) or not len(names):
        raise ValueError(f"names must be a non-empty list, one adapter name (or None) per row, got {names!r}")
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"adapter(s) {unknown} are not loaded; loaded: {known}")
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    index = torch.tensor([-1 if n is None else known.index(n) for n in names], dtype=torch.long,
                         device=layers[0].A.device)                # moved once, not in every layer
    outer = [m.row_index for m in layers]          # an enclosing rows() block's choice (None if none)
    for m in layers:
        m.row_index = index
    try:
        yield model
    finally:
        for m, k in zip(layers, outer):            # given back when this block ends
            m.row_index = k


@torch.no_grad()
def generate(model, tok, prompts, names, max_new_tokens=48):
    """Greedy answers to `prompts`, prompt i answered under adapter names[i], all in one batch."""
    from . import text
    if len(prompts) != len(names):
        raise ValueError(f"{len(prompts)} prompts for {len(names)} adapter names")
    with rows(model, names):
        return text.generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))


def latency_per_token(model, tok, prompts, names=None, new_tokens=32, repeats=3):
    """Seconds per decoding step of the batch `prompts` (lk.finetune.latency_per_token); with
    `names`, row i under adapter names[i] (an attached model)."""
    from .finetune import latency_per_token as timed
    with rows(model, names) if names is not None else nullcontext():
        return timed(model, tok, list(prompts), new_tokens, repeats)
