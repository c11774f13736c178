"""Injection into whole models, freezing, the parameter report, and saving/loading adapters alone."""
import pytest
import torch
import torch.nn as nn

import labkit as lk
from conftest import assert_unchanged, snapshot

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ids(n=2, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, T), generator=g)


def test_inject_replaces_targets_and_freezes_the_rest():
    model = lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8)
    layers = lk.lora_layers(model)
    assert len(layers) == 2 * 4                              # 2 layers x q, k, v, o
    assert all(n.rsplit(".", 1)[-1] in QKVO for n, _ in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)


def test_parameter_count_matches_r_times_in_plus_out():
    model = lk.tiny_llama()                               # hidden 64, 4 heads of 16, 2 kv heads -> k,v out 32
    lk.inject_lora(model, QKVO, r=4, alpha=8)
    per_layer = 4 * (64 + 64) + 4 * (64 + 32) * 2 + 4 * (64 + 64)
    trainable, total = lk.count_parameters(model)
    assert trainable == 2 * per_layer
    rows = {r["module"]: r for r in lk.lora_report(model, show=False)}
    assert rows["k_proj"]["lora_params"] == 2 * 4 * (64 + 32)
    assert rows["q_proj"]["base_params"] == 2 * 64 * 64


def test_output_unchanged_at_initialisation():
    x = ids()
    base = lk.tiny_llama()(x).logits
    model = lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8)
    assert torch.equal(model(x).logits, base)


def test_regex_and_all_linear():
    model = lk.tiny_llama()
    regex = lk.find_targets(model, r".*layers\.0\.self_attn\.(q|v)_proj")
    assert regex == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    every = lk.find_targets(model, "all-linear")
    assert len(every) == 2 * 7 and "lm_head" not in every       # q k v o gate up down, not the head


def test_bert_names():
    model = lk.inject_lora(lk.tiny_bert(), ["query", "key", "value"], r=2, alpha=4)
    assert len(lk.lora_layers(model)) == 2 * 3


def test_no_match_is_an_error_that_lists_the_linear_layers():
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        lk.inject_lora(lk.tiny_llama(), ["query"], r=4, alpha=8)


def test_non_linear_target_is_an_error():
    with pytest.raises(TypeError, match="not an nn.Linear"):
        lk.inject_lora(lk.tiny_llama(), ["mlp"], r=4, alpha=8)


def test_injecting_twice_is_an_error():
    model = lk.inject_lora(lk.tiny_llama(), ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="called twice"):
        lk.inject_lora(model, ["q_proj"], r=4, alpha=8)


def test_empty_targets_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        lk.inject_lora(lk.tiny_llama(), [], r=4, alpha=8)


def test_rank_too_large_for_a_target_is_an_error():
    with pytest.raises(ValueError, match="larger than min"):
        lk.inject_lora(lk.tiny_llama(), ["k_proj"], r=33, alpha=8)    # k_proj is 64 -> 32


def trained(seed=1):
    model = lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8)
    torch.manual_seed(seed)
    for _, m in lk.lora_layers(model):
        m.lora_B.data.normal_(std=0.1)
    return model


def test_save_and_load_into_a_fresh_model(tmp_path):
    model = trained()
    path = lk.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = lk.load_adapter(lk.tiny_llama(), path)          # injects with the stored settings
    x = ids()
    assert torch.equal(fresh(x).logits, model(x).logits)
    assert fresh.lora_config == model.lora_config
    size = path.stat().st_size
    n = lk.count_parameters(model)[0]
    assert n * 4 <= size < n * 4 + 4096                     # the LoRA tensors and a small header only


def test_load_rejects_mismatched_shapes(tmp_path):
    path = lk.save_adapter(trained(), tmp_path / "a.safetensors")
    other = lk.inject_lora(lk.tiny_llama(), QKVO, r=2, alpha=8)
    with pytest.raises(ValueError, match=r"trained with other settings .*{'r': \(4, 2\)}"):   # r sets the shapes
        lk.load_adapter(other, path)
    other.lora_config["r"] = 4                                  # a config that lies about its shapes
    with pytest.raises(ValueError, match="shapes that do not match"):
        lk.load_adapter(other, path)


def test_load_rejects_missing_layers(tmp_path):
    path = lk.save_adapter(trained(), tmp_path / "a.safetensors")
    other = lk.inject_lora(lk.tiny_llama(), ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="does not fit this model"):
        lk.load_adapter(other, path)


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lk.save_adapter(lk.tiny_llama(), tmp_path / "a.safetensors")


def test_merge_and_unmerge_whole_model():
    model = trained()
    x = ids()
    before = model(x).logits
    lk.merge_lora(model)
    torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-5)
    lk.unmerge_lora(model)
    torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-5)


def test_load_refuses_other_settings_than_the_models(tmp_path):
    """Same shapes, other alpha (or rsLoRA): the update would be scaled wrongly, silently."""
    path = lk.save_adapter(trained(), tmp_path / "a.safetensors")
    for other in (lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=16),
                  lk.inject_lora(lk.tiny_llama(), QKVO, r=4, alpha=8, use_rslora=True)):
        with pytest.raises(ValueError, match="trained with other settings"):
            lk.load_adapter(other, path)


def test_load_refuses_a_merged_model(tmp_path):
    model = trained()
    path = lk.save_adapter(model, tmp_path / "a.safetensors")
    lk.merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        lk.load_adapter(model, path)
    lk.unmerge_lora(model)
    lk.load_adapter(model, path)                                # unmerged: fine


def test_a_second_injection_adds_targets_and_keeps_them_all(tmp_path):
    model = lk.inject_lora(lk.tiny_llama(), ["q_proj"], r=4, alpha=8)
    lk.inject_lora(model, ["v_proj"], r=4, alpha=8)
    assert model.lora_config["target_modules"] == ["q_proj", "v_proj"]
    for _, m in lk.lora_layers(model):
        m.lora_B.data.normal_(std=0.1)
    path = lk.save_adapter(model, tmp_path / "a.safetensors")
    fresh = lk.load_adapter(lk.tiny_llama(), path)              # both calls' layers come back
    x = ids()
    assert len(lk.lora_layers(fresh)) == len(lk.lora_layers(model)) == 4
    assert torch.equal(fresh(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="other settings"):
        lk.inject_lora(model, ["k_proj"], r=2, alpha=8)


def _trained_lora(seed=0, **overrides):
    model = lk.inject_lora(lk.tiny_llama(**overrides), ["q_proj", "v_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def test_an_adapter_saved_in_peft_format_loads_in_peft_with_the_same_outputs(tmp_path):
    from peft import PeftModel
    ours = _trained_lora()
    folder = lk.save_adapter(ours, tmp_path / "adapter", format="peft")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = PeftModel.from_pretrained(lk.tiny_llama(), folder)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-6)
        assert (theirs(input_ids=ids).logits - lk.tiny_llama()(input_ids=ids).logits).abs().max() > 1e-3  # B != 0


def test_a_peft_saved_adapter_loads_into_labkit_with_the_same_outputs(tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    theirs = get_peft_model(lk.tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"],
                                                         lora_dropout=0.0, init_lora_weights="gaussian",
                                                         use_rslora=True))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(lk.tiny_llama(), tmp_path / "peft")
    assert ours.lora_config["use_rslora"] and ours.lora_config["alpha"] == 8
    assert {n.rsplit(".", 1)[-1] for n, _ in lk.lora_layers(ours)} == {"k_proj", "o_proj"}
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_peft_adapters_labkit_cannot_load_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    dora = get_peft_model(lk.tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapter(lk.tiny_llama(), tmp_path / "dora")
    layered = get_peft_model(lk.tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                         layers_to_transform=[0]))
    layered.save_pretrained(tmp_path / "layered")
    with pytest.raises(ValueError, match="layers_to_transform"):
        lk.load_adapter(lk.tiny_llama(), tmp_path / "layered")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without adapter_config.json"):
        lk.load_adapter(lk.tiny_llama(), tmp_path / "empty")


def test_an_adapter_for_another_base_model_is_refused(tmp_path):
    folder = lk.save_adapter(_trained_lora(hidden_size=64), tmp_path / "adapter", format="peft")
    with pytest.raises(ValueError, match="shapes that do not match"):
        lk.load_adapter(lk.tiny_llama(hidden_size=32, intermediate_size=64), folder)
    with pytest.raises(ValueError, match="format must be"):
        lk.save_adapter(_trained_lora(), tmp_path / "x", format="gguf")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_peft_adapter_whose_init_changed_the_base_is_refused(tmp_path, init):
    """PiSSA and OLoRA take their A and B out of W0, so peft saves an adapter that belongs to a base
    W0 - scaling B A, not to the base on disk: loaded as plain LoRA it would be silently wrong."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    theirs = get_peft_model(lk.tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                         init_lora_weights=init))
    theirs.save_pretrained(tmp_path / init)
    with pytest.raises(ValueError, match=rf"init_lora_weights.*{init}"):
        lk.load_adapter(lk.tiny_llama(), tmp_path / init)


def test_a_peft_option_labkit_does_not_know_is_refused_by_name(tmp_path):
    import json
    from peft import LoraConfig, get_peft_model
    folder = tmp_path / "plain"
    get_peft_model(lk.tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                               init_lora_weights=False)).save_pretrained(folder)
    lk.load_adapter(lk.tiny_llama(), folder)                   # init False (random B) leaves the base alone: fine
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_mora": True}))   # another (future) peft's
    with pytest.raises(ValueError, match="use_mora"):
        lk.load_adapter(lk.tiny_llama(), folder)
    assert set(config) <= set(lk.adapter_files._PEFT_KEYS)              # labkit knows every key this peft writes


def test_a_bert_adapter_in_peft_format_is_a_feature_extraction_one(tmp_path):
    """peft picks its wrapper by task_type: CAUSAL_LM's needs generate()'s methods, which an encoder
    (BERT, MiniLM) does not have; FEATURE_EXTRACTION's is the one for a model without a head."""
    import json
    from peft import PeftModel
    ours = lk.inject_lora(lk.tiny_bert(), ["query", "value"], r=2, alpha=4)
    for _, m in lk.lora_layers(ours):
        m.lora_B.data.normal_(std=0.1)
    folder = lk.save_adapter(ours, tmp_path / "bert", format="peft")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    theirs = PeftModel.from_pretrained(lk.tiny_bert(), folder)
    x = ids(n=2, T=8) % 100
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).last_hidden_state, ours(input_ids=x).last_hidden_state,
                                   rtol=0, atol=1e-6)
    llama = lk.save_adapter(trained(), tmp_path / "llama", format="peft")
    assert json.loads((llama / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_a_refused_load_leaves_the_model_as_it_was(tmp_path):
    model = lk.tiny_llama()
    before = snapshot(model)
    other_sizes = lk.save_adapter(_trained_lora(hidden_size=32, intermediate_size=64), tmp_path / "small", format="peft")
    more_layers = lk.save_adapter(_trained_lora(num_hidden_layers=4), tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match="shapes that do not match"):
        lk.load_adapter(model, other_sizes)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"does not fit this model.*model\.layers\.2"):
        lk.load_adapter(model, more_layers)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="larger than min"):      # r = 40 fits q_proj (64 x 64), not k_proj (-> 32)
        lk.inject_lora(model, QKVO, r=40, alpha=8)
    assert_unchanged(model, before)
    good = trained()                                           # then a right adapter, of other settings, loads
    lk.load_adapter(model, lk.save_adapter(good, tmp_path / "good.safetensors"))
    assert torch.equal(model(ids()).logits, good(ids()).logits)
