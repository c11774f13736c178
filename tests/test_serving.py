"""A batch whose rows use different adapters (lk.serving): each row must get what that adapter
alone gives, and what peft's mixed-batch inference (adapter_names=) gives."""
import pytest
import torch

import labkit as lk
from labkit import serving
from conftest import assert_unchanged, snapshot

IDS = torch.randint(1, 256, (4, 10), generator=torch.Generator().manual_seed(0))


def trained(targets, r, seed, use_rslora=False):
    model = lk.inject_lora(lk.tiny_llama(), targets, r=r, alpha=2 * r, use_rslora=use_rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three adapters of other ranks and targets (one rsLoRA, one in peft's format) and their models."""
    d = tmp_path_factory.mktemp("adapters")
    models = {"people": trained(["q_proj", "v_proj"], 4, 1),
              "dates": trained(["q_proj", "k_proj", "v_proj", "o_proj"], 8, 2, use_rslora=True),
              "units": trained(["v_proj", "down_proj"], 2, 3)}
    paths = {"people": lk.save_adapter(models["people"], d / "people.safetensors"),
             "dates": lk.save_adapter(models["dates"], d / "dates.safetensors"),
             "units": lk.save_adapter(models["units"], d / "units", format="peft")}
    return models, paths


def test_each_row_gets_its_own_adapter(saved):
    models, paths = saved
    model = serving.attach(lk.tiny_llama(), paths)
    names = ["dates", None, "people", "units"]
    with torch.no_grad(), serving.rows(model, names):
        mixed = model(input_ids=IDS).logits
    base = lk.tiny_llama()
    for b, name in enumerate(names):
        alone = (models[name] if name else base)(input_ids=IDS[b:b + 1]).logits[0]
        torch.testing.assert_close(mixed[b], alone.detach(), rtol=0, atol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3                     # the adapters really differ


def test_a_mixed_batch_equals_peft_adapter_names(saved):
    from peft import PeftModel
    models, paths = saved
    peft_paths = {}
    for name, model in models.items():
        peft_paths[name] = lk.save_adapter(model, paths["people"].parent / f"{name}_peft", format="peft")
    theirs = PeftModel.from_pretrained(lk.tiny_llama(), peft_paths["people"], adapter_name="people")
    for name in ("dates", "units"):
        theirs.load_adapter(peft_paths[name], adapter_name=name)
    ours = serving.attach(lk.tiny_llama(), paths)
    names = ["units", "people", "dates", "people"]
    with torch.no_grad(), serving.rows(ours, names):
        got = ours(input_ids=IDS).logits
        expected = theirs(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_mixed_generation_answers_each_row_under_its_adapter(tmp_path):
    """Left-padded batched greedy decoding, rows under different adapters: each row's answer is the
    one its adapter gives alone. (A toy model of the tokenizer's vocabulary; B large, so the two
    adapters answer differently.)"""
    tok = lk.load_tokenizer()
    make = lambda: lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256)
    adapted = {}
    for i, name in enumerate(("a", "b")):
        adapted[name] = lk.inject_lora(make(), ["q_proj", "v_proj"], r=4, alpha=8)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, layer in lk.lora_layers(adapted[name]):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    files = {n: lk.save_adapter(m, tmp_path / f"{n}.safetensors") for n, m in adapted.items()}
    model = serving.attach(make(), files)
    prompts = ["Hello", "A longer question, padded on the left?"]
    mixed = serving.generate(model, tok, prompts, ["b", "a"], max_new_tokens=6)
    alone = [lk.text.generate(adapted["b"], tok, prompts[:1], max_new_tokens=6)[0],
             lk.text.generate(adapted["a"], tok, prompts[1:], max_new_tokens=6)[0]]
    assert mixed == alone
    assert lk.text.generate(adapted["a"], tok, prompts[:1], max_new_tokens=6) != alone[:1]   # they differ


def test_bad_names_and_bad_adapters_are_refused(saved, tmp_path):
    _, paths = saved
    model = serving.attach(lk.tiny_llama(), paths)
    with pytest.raises(ValueError, match="not loaded; loaded"):
        with serving.rows(model, ["people", "legal"]):
            pass
    with pytest.raises(RuntimeError, match="no adapter chosen"):
        model(input_ids=IDS)
    with pytest.raises(ValueError, match="4 rows"):
        with serving.rows(model, ["people"]):
            model(input_ids=IDS)
    with pytest.raises(ValueError, match="already has adapters"):
        serving.attach(model, paths)
    with pytest.raises(ValueError, match="does not fit"):
        serving.attach(lk.tiny_llama(hidden_size=32, intermediate_size=64), paths)
    with pytest.raises(ValueError, match="non-empty list"):
        with serving.rows(model, "people"):
            pass
    with pytest.raises(TypeError, match="fresh base model"):
        serving.attach(lk.inject_lora(lk.tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8), paths)
    with pytest.raises(ValueError, match="no adapters attached"):
        with serving.rows(lk.tiny_llama(), ["people"]):
            pass


def test_an_adapter_of_another_model_type_is_refused_even_when_shapes_fit(saved):
    """A Mistral of the toy Llama's sizes has the same module names and shapes: only the model type
    recorded in labkit's file tells the adapter was trained on another model."""
    from transformers import MistralConfig, MistralForCausalLM
    _, paths = saved
    llama = lk.tiny_llama()
    config = MistralConfig(**{k: getattr(llama.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")})
    for load in (lambda m: serving.attach(m, {"people": paths["people"]}), lambda m: lk.load_adapter(m, paths["people"])):
        with pytest.raises(ValueError, match="trained on a llama model, not on this mistral model"):
            load(MistralForCausalLM(config))
    lk.load_adapter(lk.tiny_llama(), paths["people"])          # the model it was made for takes it


def test_latency_per_token_times_a_mixed_batch(saved, monkeypatch):
    """Timed with a fake clock that ticks once per forward pass of the model (lk.finetune reads
    the time), a mixed batch costs exactly 1.0 per decoding step: one pass makes a token per row."""
    from types import SimpleNamespace
    _, paths = saved
    tok = lk.models.load_tokenizer()                               # SmolLM2's, over a toy model of its vocabulary
    model = serving.attach(lk.tiny_llama(vocab_size=len(tok)), paths)
    passes = [0]
    model.register_forward_pre_hook(lambda m, args: passes.__setitem__(0, passes[0] + 1))
    monkeypatch.setattr(lk.finetune, "time", SimpleNamespace(perf_counter=lambda: float(passes[0])))
    for names in (None, ["people", "dates"]):
        if names is None:
            with pytest.raises(RuntimeError, match="no adapter chosen"):   # an attached model needs names
                serving.latency_per_token(model, tok, ["a", "b"], new_tokens=2, repeats=1)
        else:
            assert serving.latency_per_token(model, tok, ["a", "b"], names, new_tokens=3, repeats=2) == 1.0


def test_the_cached_scores_follow_from_the_cached_answers():
    """data/results/multi_adapter.json: every score is the exact match of its stored answers, every
    cached adapter folder is in peft's layout with the recipe's settings."""
    import json
    from labkit import data
    results = serving.load_results()
    for name, per_task in results["answers"].items():
        for task, answers in per_task.items():
            refs = [r["response"] for r in data.load_task(task, splits=("test",))["test"]]
            assert len(answers) == len(refs) == 60
            assert results["scores"][name][task] == data.exact_match(answers, refs)
    assert set(results["scores"]) == {"base", *serving.TASKS, "union", *serving.COMBINATIONS}
    for name in (*serving.TASKS, "union"):
        config = json.loads((serving.adapter_dir(name) / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == \
            (serving.RECIPE["r"], serving.RECIPE["alpha"], sorted(lk.lora.QKVO))
        assert results["training"][name]["steps"] == serving.RECIPE["steps"] * (3 if name == "union" else 1)
    assert len(serving.union_rows()) == 1200


def test_a_refused_attach_leaves_the_model_as_it_was(saved, tmp_path):
    """Every adapter is checked against every layer before the first layer is replaced."""
    from transformers import MistralConfig, MistralForCausalLM
    models, paths = saved
    deep = lk.inject_lora(lk.tiny_llama(num_hidden_layers=4), ["v_proj"], r=2, alpha=4)
    too_deep = {"people": paths["people"], "deep": lk.save_adapter(deep, tmp_path / "deep.safetensors")}
    llama = lk.tiny_llama()
    mistral = MistralForCausalLM(MistralConfig(**{k: getattr(llama.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")}))
    refused = [(lk.tiny_llama(), too_deep, ValueError, r"model\.layers\.2.* is not a module"),   # unknown names
               (lk.tiny_llama(hidden_size=32, intermediate_size=64), paths, ValueError, "does not fit"),  # shapes
               (lk.inject_lora(lk.tiny_llama(), ["v_proj"], r=4, alpha=8), paths, TypeError, "fresh base model"),
               (mistral, paths, ValueError, "not on this mistral model")]                             # model type
    for model, adapters, error, message in refused:
        before = snapshot(model)
        with pytest.raises(error, match=message):
            serving.attach(model, adapters)
        assert_unchanged(model, before)
    model = refused[0][0]                                       # then the right adapters attach
    serving.attach(model, paths)
    with torch.no_grad(), serving.rows(model, ["people"] * 4):
        torch.testing.assert_close(model(input_ids=IDS).logits, models["people"](input_ids=IDS).logits,
                                   rtol=0, atol=1e-5)


def test_nested_rows_give_the_outer_rows_back(saved):
    models, paths = saved
    model = serving.attach(lk.tiny_llama(), paths)
    with torch.no_grad(), serving.rows(model, ["people"] * 4):
        with serving.rows(model, ["dates"] * 4):
            inner = model(input_ids=IDS).logits
        outer = model(input_ids=IDS).logits                     # people's again, after the inner block
        torch.testing.assert_close(inner, models["dates"](input_ids=IDS).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(outer, models["people"](input_ids=IDS).logits, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="no adapter chosen"):
        model(input_ids=IDS)                                    # and none outside them all
