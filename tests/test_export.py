"""lk.export: llama.cpp's own converter writes the LoRA GGUF; the gguf package reads it back here, and
every layer's update B A must be the adapter's, with llama.cpp's rotary reordering of q and k rows
undone by this file's own copy of it. Refusals are checked before anything is written."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

import labkit as lk
from labkit import export

ROOT = Path(__file__).resolve().parent.parent
PEOPLE = ROOT / "data" / "results" / "adapters" / "people"

if export.converter_dir(required=False) is None:
    # the set-up fetches it (76 MB from PyPI); under CI its absence is a failure, not a skip
    if os.environ.get("CI") == "true":
        raise RuntimeError("llama.cpp's converter is missing under CI: the set-up should have fetched it "
                           "(lk.export.fetch_converter())")
    pytest.skip("llama.cpp's converter is not fetched (python -c 'import labkit as lk; lk.export.fetch_converter()')",
                allow_module_level=True)


def rope_rows(w, n_head):
    """llama.cpp stores q and k with each head's rotary pairs interleaved, where transformers keeps
    the two halves apart: row (h, half, i) moves to (h, i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def expected_updates(tensors, config):
    """{gguf name: B A} from peft-named tensors, q and k rows reordered as llama.cpp stores them."""
    out = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        layer, kind = int(name.split(".layers.")[1].split(".")[0]), name.split(".lora_A.")[0].rsplit(".", 1)[1]
        delta = b.double() @ a.double()
        if kind == "q_proj":
            delta = rope_rows(delta, config["num_attention_heads"])
        elif kind == "k_proj":
            delta = rope_rows(delta, config["num_key_value_heads"])
        out[f"blk.{layer}.{GGUF_NAME[kind]}.weight"] = delta
    return out


def check_against(gguf_path, tensors, config):
    alpha, read = export.read_gguf_adapter(gguf_path)
    want = expected_updates(tensors, config)
    assert sorted(k[:-len(".lora_a")] for k in read if k.endswith(".lora_a")) == sorted(want)
    for name, delta in want.items():
        a, b = read[name + ".lora_a"], read[name + ".lora_b"]
        assert a.shape[0] == b.shape[1]                        # (r, in) and (out, r)
        err = ((b.double() @ a.double()) - delta).abs().max().item()
        assert err <= 1e-6 * delta.abs().max().item(), f"{name}: B A differs by {err}"
    return alpha


def test_chapter_9_adapter_round_trips_through_llama_cpps_converter(tmp_path):
    from safetensors.torch import load_file
    config = json.loads((lk.smollm2_path() / "config.json").read_text())
    out = export.adapter_to_gguf(PEOPLE, tmp_path / "people.gguf", base=lk.smollm2_path())
    tensors = load_file(str(PEOPLE / "adapter_model.safetensors"))
    alpha = check_against(out["path"], tensors, config)
    assert alpha == json.loads((PEOPLE / "adapter_config.json").read_text())["lora_alpha"] == out["alpha"] == 16
    assert len(tensors) == 2 * 4 * config["num_hidden_layers"]


@pytest.fixture()
def tiny_base(tmp_path):
    model = lk.tiny_llama(tie_word_embeddings=False)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("rslora", [False, True])
def test_a_labkit_model_exports_and_rslora_keeps_its_scale(tmp_path, tiny_base, rslora):
    """llama.cpp scales by alpha / r: an rsLoRA adapter is written with alpha x sqrt(r)."""
    model, base = tiny_base
    lk.inject_lora(model, ["q_proj", "k_proj", "v_proj", "down_proj"], r=4, alpha=8, use_rslora=rslora)
    for _, layer in lk.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)       # B = 0 would make every check pass
    out = export.adapter_to_gguf(model, tmp_path / "a.gguf", base=base)
    peft_named = {f"base_model.model.{k}.weight": v for k, v in lk.lora_state_dict(model).items()}
    alpha = check_against(out["path"], peft_named, json.loads((base / "config.json").read_text()))
    assert alpha / 4 == pytest.approx(lk.lora.lora_scaling(8, 4, rslora), rel=1e-6)
    assert alpha == pytest.approx(8 * math.sqrt(4) if rslora else 8)


def _peft_adapter(tmp_path, base_model, **config):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(base_model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                          **config}))
    folder = tmp_path / "peft"
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("config, reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias="),
    (dict(alpha_pattern={"v_proj": 2}), "alpha_pattern"),
    (dict(rank_pattern={"v_proj": 2}, use_rslora=True), "rsLoRA with rank_pattern"),
])
def test_what_the_converter_cannot_carry_is_refused_before_writing(tmp_path, tiny_base, config, reason):
    _, base = tiny_base
    folder = _peft_adapter(tmp_path, lk.tiny_llama(tie_word_embeddings=False), **config)
    with pytest.raises(ValueError, match=reason):
        export.adapter_to_gguf(folder, tmp_path / "x.gguf", base=base)
    assert not (tmp_path / "x.gguf").exists()


def test_a_rank_pattern_is_carried_llama_cpp_divides_by_each_layers_rank(tmp_path, tiny_base):
    """llama.cpp's scale is alpha / (rank of that tensor): peft's alpha / r per layer, at several ranks."""
    from safetensors.torch import load_file, save_file
    _, base = tiny_base
    folder = _peft_adapter(tmp_path, lk.tiny_llama(tie_word_embeddings=False), rank_pattern={"v_proj": 2})
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors = {k: (torch.randn_like(v) * 0.02 if ".lora_B." in k else v) for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    out = export.adapter_to_gguf(folder, tmp_path / "a.gguf", base=base)
    alpha = check_against(out["path"], tensors, json.loads((base / "config.json").read_text()))
    _, read = export.read_gguf_adapter(out["path"])
    ranks = {k.split(".")[2]: v.shape[1] for k, v in read.items() if k.endswith(".lora_b")}
    assert ranks == {"attn_q": 4, "attn_v": 2} and alpha == 8


def test_lm_head_on_tied_embeddings_is_refused(tmp_path):
    tied = lk.tiny_llama()                                      # tie_word_embeddings=True, as SmolLM2
    base = tmp_path / "tied"
    tied.save_pretrained(base)
    folder = _peft_adapter(tmp_path, lk.tiny_llama(), target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="tied embeddings"):
        export.adapter_to_gguf(folder, tmp_path / "x.gguf", base=base)
    assert not (tmp_path / "x.gguf").exists()


def test_the_base_must_be_a_local_folder_and_the_converter_present(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="local folder with its config.json"):
        export.adapter_to_gguf(PEOPLE, tmp_path / "x.gguf", base="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="not a peft adapter folder"):
        export.adapter_to_gguf(tmp_path, tmp_path / "x.gguf", base=lk.smollm2_path())
    monkeypatch.setenv("LABKIT_LLAMA_CPP", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fetch_converter"):
        export.adapter_to_gguf(PEOPLE, tmp_path / "x.gguf", base=lk.smollm2_path())
    assert not (tmp_path / "x.gguf").exists()


def test_merged_export_holds_w0_plus_the_update(tmp_path):
    """merged_to_gguf: W0 + scale B A in safetensors, then GGUF; the model itself stays unmerged."""
    import gguf
    import numpy as np
    model = lk.tiny_llama(vocab_size=49152, tie_word_embeddings=True)    # SmolLM2's tokenizer needs its vocab
    w0 = model.model.layers[1].self_attn.v_proj.weight.detach().clone()
    lk.inject_lora(model, ["v_proj"], r=4, alpha=8)
    layer = model.model.layers[1].self_attn.v_proj
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    want = w0 + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    out = export.merged_to_gguf(model, lk.load_tokenizer(), tmp_path, outtype="f32")
    assert not layer.merged and lk.lora_layers(model)            # the model was not changed
    reader = gguf.GGUFReader(str(out["gguf"]))
    (v,) = [t for t in reader.tensors if t.name == "blk.1.attn_v.weight"]
    got = torch.from_numpy(np.array(v.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(v.shape))))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, w0, atol=1e-4)
    assert out["safetensors"] > 0 and out["gguf_bytes"] > 0


def test_ollama_modelfile_names_base_and_adapter(tmp_path):
    text = export.ollama_modelfile("/m/base.gguf", "/m/people.gguf", tmp_path / "Modelfile")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == ["FROM /m/base.gguf", "ADAPTER /m/people.gguf", "PARAMETER temperature 0"]
    assert (tmp_path / "Modelfile").read_text() == text
