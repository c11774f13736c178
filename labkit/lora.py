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
# Counting what trains, and saving the adapter alone.

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


def save_adapter(model, path, format="labkit"):
    """Write the LoRA weights alone. format="labkit": one safetensors file, with the injection
    settings as metadata. format="peft": a folder in peft's layout (adapter_config.json and
    adapter_model.safetensors), which PeftModel.from_pretrained loads and serving engines that
    read peft adapters (vLLM, TGI, ...) accept."""
    import json
    from safetensors.torch import save_file
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("this model has no LoRA layers: call inject_lora first")
    if format == "peft":
        return _save_peft(model, config, path)
    if format != "labkit":
        raise ValueError(f"format must be 'labkit' or 'peft', got {format!r}")
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {"lora_config": json.dumps(config)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        metadata["model_type"] = model_type                # checked by load_adapter and serving.attach
    save_file(tensors, str(path), metadata=metadata)
    return path


# peft's names: "base_model.model.<layer>.lora_A.weight" for labkit's "<layer>.lora_A"
_PEFT_PREFIX, _PEFT_SUFFIX = "base_model.model.", ".weight"


def _save_peft(model, config, folder):
    import json
    from pathlib import Path
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_PEFT_PREFIX + k + _PEFT_SUFFIX: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "task_type": _peft_task_type(model), "r": config["r"],
                   "lora_alpha": config["alpha"], "lora_dropout": config["dropout"], "use_rslora": config["use_rslora"],
                   "bias": "none",
                   "target_modules": config["target_modules"], "fan_in_fan_out": False, "inference_mode": True,
                   "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)}
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return folder


def _peft_task_type(model):
    """The task_type by which PeftModel.from_pretrained picks its wrapper: CAUSAL_LM for a causal LM
    (its wrapper calls the model's generation methods, which an encoder lacks), FEATURE_EXTRACTION for
    a transformers model without a head (BERT's encoder, MiniLM), None (peft's plain PeftModel) otherwise."""
    if type(model).__name__.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if getattr(model, "base_model", None) is model:          # transformers: a model without a head is its own base
        return "FEATURE_EXTRACTION"
    return None


# An allow-list of adapter_config.json's keys (peft 0.21's LoraConfig): an option labkit does not
# know might change what the adapter computes, so it is refused rather than ignored. labkit reads:
_PEFT_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "init_lora_weights"}
# These describe the adapter, or act only with an option checked here (loftq_config with
# init_lora_weights="loftq", megatron_core with megatron_config, ...): ignored.
_PEFT_IGNORED = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                 "runtime_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
                 "qalora_group_size", "ensure_weight_tying"}
# LoRALinear has none of these options: each must be off, at peft's default (None or empty counts as off).
_PEFT_OFF = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False,
             "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
             "lora_bias": False, "megatron_config": None, "trainable_token_indices": None, "velora_config": None,
             "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None, "layer_replication": None,
             "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None}
_PEFT_KEYS = _PEFT_READ | _PEFT_IGNORED | set(_PEFT_OFF)
# The initialisations known to leave the base W0 as it is, as labkit's inits (the file's A and B
# replace them anyway). PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA move part of W0 into A and B: their
# adapter belongs to a changed base, not to the one on disk.
_PEFT_INITS = {True: "kaiming", "gaussian": "gaussian", False: "random"}


def _check_peft_options(folder, c):
    unknown = sorted(set(c) - _PEFT_KEYS)
    if unknown:
        raise ValueError(f"{folder} has peft options labkit does not know: {unknown} (a newer peft?); labkit cannot "
                         "tell whether they change the adapter, so it does not load it: load it with peft")
    on = {k: c[k] for k, off in _PEFT_OFF.items() if c.get(k, off) not in (off, None, [], {})}
    if on:
        raise ValueError(f"{folder} uses peft options labkit's LoRALinear does not have: {on}; load it with peft")
    init = c.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        raise ValueError(f"{folder} was made with init_lora_weights={init!r}; labkit loads adapters made with "
                         "True, False or 'gaussian' only, whose base is the unchanged model (PiSSA, OLoRA, LoftQ, "
                         "CorDA change W0). Load it with peft, or save it again with peft's save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...), which turns it into a plain LoRA adapter")


def _read_peft(folder):
    """(labkit config, labkit-named tensors) of an adapter folder in peft's layout."""
    import json
    from safetensors.torch import load_file
    c = json.loads((folder / "adapter_config.json").read_text())
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {c.get('peft_type')} adapter: labkit loads LoRA adapters only")
    _check_peft_options(folder, c)
    config = dict(target_modules=c["target_modules"], r=c["r"], alpha=c["lora_alpha"],
                  dropout=c.get("lora_dropout", 0.0), init=_PEFT_INITS[c.get("init_lora_weights", True)],
                  use_rslora=c.get("use_rslora", False))
    if not (folder / "adapter_model.safetensors").is_file():
        raise ValueError(f"{folder} has no adapter_model.safetensors (an older peft's adapter_model.bin is not "
                         "read here: load it with peft and save it again)")
    tensors = {}
    for k, v in load_file(str(folder / "adapter_model.safetensors")).items():
        if not (k.startswith(_PEFT_PREFIX) and k.endswith(_PEFT_SUFFIX)):
            raise ValueError(f"{folder}: tensor {k} is not a LoRA weight in peft's naming")
        tensors[k[len(_PEFT_PREFIX):-len(_PEFT_SUFFIX)]] = v
    return config, tensors


def read_adapter(path):
    """(settings, {'<layer>.lora_A': A, '<layer>.lora_B': B}) of an adapter file written by
    save_adapter, or of a folder in peft's layout. A labkit file's settings also hold the
    "model_type" of the model it was saved from (check_model_type takes it out)."""
    import json
    from pathlib import Path
    from safetensors import safe_open
    if Path(path).is_dir():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"{path} is a folder without adapter_config.json: not a peft adapter")
        return _read_peft(Path(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        config = json.loads(metadata.get("lora_config", "null"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if config is None:
        raise ValueError(f"{path} has no lora_config metadata: it was not written by labkit.save_adapter")
    if "model_type" in metadata:
        config["model_type"] = metadata["model_type"]
    return config, tensors


def check_model_type(model, config, path):
    """Refuse an adapter whose file names another kind of base model than `model` (labkit's files
    record the model type; peft's folders do not, and are checked by shapes alone)."""
    saved = config.pop("model_type", None)
    mine = getattr(getattr(model, "config", None), "model_type", None)
    if saved and mine and saved != mine:
        raise ValueError(f"adapter {path} was trained on a {saved} model, not on this {mine} model")


def load_adapter(model, path):
    """Load an adapter into `model`: a file written by save_adapter, or a folder in peft's layout
    (written by save_adapter(format="peft") or by peft's save_pretrained). A model without LoRA
    layers gets them first, with the adapter's settings. A model with LoRA layers must have the
    adapter's r, alpha and rsLoRA (they set the update's scale) and must not be merged (its W0
    would keep the old update). Shapes and names must match exactly. Everything is checked before
    the model changes: a refused adapter leaves it as it was."""
    config, tensors = read_adapter(path)
    check_model_type(model, config, path)
    layers = lora_layers(model)
    if not layers:
        own = _lora_shapes(model, config)              # what inject_lora would make, before it makes it
    else:
        merged = [n for n, m in layers if m.merged]
        if merged:
            raise ValueError(f"{len(merged)} LoRA layers of this model are merged (e.g. {merged[0]}): their W0 "
                             "holds the old update; unmerge_lora(model) first, or load into a fresh model")
        mine = getattr(model, "lora_config", {}) or {}
        differ = {k: (config.get(k), mine.get(k)) for k in ("r", "alpha", "use_rslora") if config.get(k) != mine.get(k)}
        if differ:
            raise ValueError(f"adapter {path} was trained with other settings than this model's LoRA layers: "
                             f"{differ} (file, model); load it into a fresh model, which gets the file's settings")
        own = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"adapter {path} does not fit this model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {own[k]}" for k in own if tuple(tensors[k].shape) != own[k]]
    if bad:
        raise ValueError(f"adapter {path} has shapes that do not match the model: {bad[:3]}")
    if not layers:
        inject_lora(model, **config)
    model.load_state_dict(tensors, strict=False)
    return model


def _lora_shapes(model, config):
    """{'<layer>.lora_A': (r, in), '<layer>.lora_B': (out, r)}: the tensors inject_lora(model, **config) adds."""
    shapes, r = {}, config["r"]
    for name in find_targets(model, config["target_modules"]):
        m = model.get_submodule(name)
        if is_linear(m):
            shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = (r, m.in_features), (m.out_features, r)
    return shapes
