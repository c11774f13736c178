"""Adapter files (chapter 3; chapter 9 serves them): the LoRA weights alone, written and read in
labkit's format (one safetensors file, the injection settings as metadata) or in peft's layout (a
folder with adapter_config.json and adapter_model.safetensors, as PeftModel.from_pretrained, vLLM
and TGI read it). The layer and its injection are lk.lora's; these are also reachable as
lk.save_adapter, lk.load_adapter and lk.lora.save_adapter, ... (labkit/__init__.py).
"""
from .lora import find_targets, inject_lora, is_linear, lora_layers, lora_state_dict

__all__ = ["save_adapter", "read_adapter", "check_model_type", "load_adapter"]


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
