"""Chapter 7's laboratory: LoRA scaling and budgets, the paper's subspace similarity, the sweep
runner, the cached sweep, the config-only memory prediction, and the widgets' pure functions and
callbacks (driven here without a browser; tests/test_browser.py drives them in one)."""
import json

import matplotlib
import pytest
import torch

import labkit as lk
from labkit import lab, memory, widgets

matplotlib.use("Agg")
SMOL = widgets.model_configs()["SmolLM2-135M"]


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert lab.scaling(8, 16) == 2.0 and lab.scaling(64, 16) == 0.25
    assert lab.scaling(64, 16, rslora=True) == 2.0 and lab.scaling(1, 16, rslora=True) == lab.scaling(1, 16)
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        lab.scaling(0, 16)
    assert lab.run_key(1, 16, 2e-3, rslora=True) == lab.run_key(1, 16, 2e-3) == "q,v r=1 a=16 lr=0.002"
    # plain LoRA's early update size is alpha x lr whatever r; rsLoRA's grows like sqrt(r)
    assert lab.step_scale(8, 16, 2e-3) == pytest.approx(lab.step_scale(64, 16, 2e-3)) == pytest.approx(16 * 2e-3)
    assert lab.step_scale(64, 16, 2e-3, rslora=True) == pytest.approx(16 * 8 * 2e-3)
    assert lab.run_key(8, 16, 1e-3, rslora=True, targets="all") == "all r=8 a=16 lr=0.001 rs"


@pytest.mark.parametrize("targets", [lab.QV, lab.QKVO, lab.ALL, ["down_proj"]])
def test_lora_parameter_arithmetic_matches_an_injected_model(targets):
    model = lk.tiny_llama(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
                          num_hidden_layers=3, vocab_size=500)
    lk.inject_lora(model, targets, r=4, alpha=8)
    trainable, total = lk.count_parameters(model)
    assert trainable == model.config.num_hidden_layers * lab.lora_params_per_layer(model.config, targets, 4)
    assert memory.config_counts(model.config, "lora", targets, 4) == {
        "total": total, "trainable": trainable, "quantized": 0,
        "largest_trainable": max(p.numel() for p in model.parameters() if p.requires_grad)}


def test_equal_budgets_on_smollm2():
    budget = lab.lora_params_per_layer(SMOL, lab.QV, 16)                  # 30,720 per layer
    assert budget == 30_720
    assert lab.equal_budget_rank(SMOL, lab.QKVO, budget) == 8
    assert lab.equal_budget_rank(SMOL, lab.ALL, budget) == 3
    with pytest.raises(ValueError, match="targets must be among"):
        lab.lora_params_per_layer(SMOL, ["qproj"], 8)


def test_subspace_similarity_against_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(8, 100, generator=g), torch.randn(64, 100, generator=g)
    phi = lab.subspace_similarity(A1, A2)
    U1 = torch.linalg.svd(A1.double().T, full_matrices=False).U          # right-singular vectors of A, columns
    U2 = torch.linalg.svd(A2.double().T, full_matrices=False).U
    for i, j in [(1, 1), (3, 10), (8, 64), (8, 5)]:
        direct = (U1[:, :i].T @ U2[:, :j]).pow(2).sum() / min(i, j)
        assert abs(phi[i - 1, j - 1].item() - direct.item()) < 1e-6
    assert phi.shape == (8, 64) and phi.min() >= 0 and phi.max() <= 1 + 1e-6


def test_subspace_similarity_limits():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 50, generator=g)
    assert torch.allclose(lab.subspace_similarity(A, A), torch.ones(6, 6), atol=1e-6)   # a subspace contains itself
    Q = torch.linalg.qr(torch.randn(50, 12, generator=g)).Q.T                           # 12 orthonormal rows
    assert lab.subspace_similarity(Q[:6], Q[6:]).abs().max() < 1e-6                       # orthogonal subspaces
    # the whole row space is what counts at (r1, r2): mixing A's rows changes nothing there
    M = torch.randn(6, 6, generator=g)
    assert abs(lab.subspace_similarity(M @ A, Q)[-1, -1] - lab.subspace_similarity(A, Q)[-1, -1]) < 1e-5
    rand = lab.random_similarity(8, 64, 576)
    assert abs(rand[-1, -1].item() - 64 / 576) < 0.03                                     # about j / d
    with pytest.raises(ValueError, match="same d"):
        lab.subspace_similarity(torch.randn(4, 10), torch.randn(4, 11))


@pytest.fixture(scope="module")
def tok():
    return lk.load_tokenizer()


def test_lora_run_repeats_itself_and_reports_progress(tok):
    rows = lk.data.load_task("people")
    rows = {"train": rows["train"][:8], "test": rows["test"][:2]}
    steps = []
    runs = [lab.lora_run(lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256), tok, rows, r=4, alpha=8,
                         lr=1e-2, rslora=rs, steps=3, batch_size=2, on_step=lambda s, n: steps.append((s, n)))[0]
            for rs in (False, False, True)]
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["test_loss"] == runs[1]["test_loss"]
    assert runs[2]["losses"][0] == runs[0]["losses"][0] and runs[2]["losses"][1] != runs[0]["losses"][1]
    assert runs[2]["scaling"] == 4.0 and runs[0]["scaling"] == 2.0 and runs[0]["trainable"] > 0
    assert 0 <= runs[0]["exact_match"] <= 1 and steps[:3] == [(1, 3), (2, 3), (3, 3)]


# --- the cached sweep ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    return lab.load_results()


def test_the_cache_holds_every_configured_run(results):
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_rank_lab", lab.RESULTS.parents[2] / "scripts" / "run_rank_lab.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    keys = [k for k, _ in script.configs(list(script.SWEEPS))]
    assert sorted(keys) == sorted(results["runs"])
    steps = results["settings"]["steps"]
    for key, run in results["runs"].items():
        assert lab.run_key(run["r"], run["alpha"], run["lr"], run["rslora"], run["targets"]) == key
        assert len(run["losses"]) == steps and 0 <= run["exact_match"] <= 1
        assert run["scaling"] == pytest.approx(lab.scaling(run["r"], run["alpha"], run["rslora"]))
        targets = lab.TARGET_SETS[run["targets"]]
        assert run["trainable"] == SMOL.num_hidden_layers * lab.lora_params_per_layer(SMOL, targets, run["r"])
    sim = results["similarity"]
    assert len(sim["modules"]) == 2 * SMOL.num_hidden_layers
    for m in sim["modules"].values():
        assert len(m["A"]) == 8 and len(m["A"][0]) == 64 and len(m["B"]) == 8


# --- memory from a config alone -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_config_prediction_equals_the_model_prediction(method):
    model = lk.tiny_llama(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
                          num_hidden_layers=3, vocab_size=500)
    torch.manual_seed(0)
    model = lk.finetune.prepare(model, method, lab.QV, r=4, alpha=8)
    assert memory.predict_peak(model, 4, 32, method, lab.QV, 4) == \
        memory.predict_peak_config(model.config, 4, 32, method, lab.QV, 4)


def test_config_counts_of_published_models():
    configs = widgets.model_configs()
    assert memory.config_counts(configs["SmolLM2-135M"])["total"] == 134_515_008          # count_parameters of the real one
    assert memory.config_counts(configs["Llama-2-7B"])["total"] == 6_738_415_616
    assert memory.config_counts(configs["Llama-2-70B"])["total"] == 68_976_648_192
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        memory.config_counts(SMOL, "lora", lab.QV, 0)
    with pytest.raises(ValueError, match="method must be"):
        memory.config_counts(SMOL, "prefix")


# --- widgets: the pure functions and the callbacks ----------------------------------------------

def test_lowrank_summary_is_eckart_young():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    s = widgets.lowrank_summary(W, 5)
    direct = (W - lk.lowrank.low_rank_approx(W, 5)).norm() / W.norm()
    assert abs(s["error"] - direct.item()) < 1e-5
    assert (s["full_params"], s["lora_params"]) == (1200, 350)
    with pytest.raises(ValueError, match=r"rank r must be an integer in \[1, 30\]"):
        widgets.lowrank_summary(W, 31)


def test_lowrank_explorer_follows_its_controls():
    model = lk.tiny_llama()
    e = widgets.lowrank_explorer(model, layer=0, projection="q_proj", r=4)
    before, png = e.summary.value, e.png
    e.controls["r"].value = 9                                   # what a slider in a browser does
    assert e.summary.value != before and "r = 9" in e.summary.value and e.png != png
    e.controls["projection"].value = "down_proj"
    assert "down_proj" in e.summary.value
    W = widgets.projection_weight(model, 0, "down_proj")
    assert f"{widgets.lowrank_summary(W, 9)['error']:.3f}" in e.summary.value
    with pytest.raises(ValueError, match="projection must be one of"):
        widgets.projection_weight(model, 0, "qkv")
    with pytest.raises(ValueError, match="layer must be in"):
        widgets.projection_weight(model, 99, "q_proj")


def test_explorer_degrades_to_a_png_and_a_line_of_text():
    e = widgets.lowrank_explorer(lk.tiny_llama(), r=4)
    bundle = e._repr_mimebundle_()
    assert bundle["text/plain"].startswith("Low-rank explorer: layer 0 q_proj") and "<b>" not in bundle["text/plain"]
    import base64
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "application/vnd.jupyter.widget-view+json" in bundle


FAKE = {"runs": {lab.run_key(r, a, 2e-3): {"r": r, "alpha": a, "lr": 2e-3, "rslora": False, "targets": "q,v",
                                          "trainable": 100 * r, "losses": [2.0, 1.0 / a], "test_loss": 0.5,
                                          "exact_match": 0.5} for r, a in [(8, 16), (8, 32), (64, 16)]}}


def test_rank_alpha_summary_finds_cached_and_live_runs():
    s = widgets.rank_alpha_summary(FAKE, 8, 16, 2e-3)
    assert s["source"] == "cache" and s["scaling"] == 2.0 and s["step_scale"] == pytest.approx(2 * 8 * 2e-3)
    assert [x["alpha"] for x in s["neighbours"]] == [32]
    missing = widgets.rank_alpha_summary(FAKE, 64, 32, 2e-3)
    assert missing["run"] is None and "not in the cache" in widgets.rank_alpha_text(missing)
    live = {missing["key"]: {"losses": [1.0], "trainable": 1, "test_loss": 0.1}}
    assert widgets.rank_alpha_summary(FAKE, 64, 32, 2e-3, live=live)["source"] == "live"


def test_rank_alpha_explorer_trains_live_only_what_the_cache_lacks():
    calls = []

    def train_fn(r, alpha, lr, rslora, on_step):
        calls.append((r, alpha, lr, rslora))
        on_step(1, 1)
        return {"losses": [0.25], "trainable": 7, "test_loss": 0.2}

    e = widgets.rank_alpha_explorer(FAKE, train_fn, r=8, alpha=16, lr=2e-3)
    e.button.click()
    assert calls == []                                          # cached: nothing to train
    e.controls["r"].value = 64
    e.controls["alpha"].value = 32
    assert "not in the cache" in e.summary.value
    e.button.click()
    assert calls == [(64, 32, 2e-3, False)] and "live: 7 trainable" in e.summary.value
    e.controls["rslora"].value = True
    assert "rs</b>" in e.summary.value and "not in the cache" in e.summary.value


def test_memory_summary_and_measured_figures():
    measured = [{"model": "SmolLM2-135M", "method": "full", "r": None, "targets": None, "batch": 8, "seq": 100,
                 "bytes": 2e9}]
    s = widgets.memory_summary("SmolLM2-135M", "full", 8, lab.QKVO, 8, 100, measured)
    assert s["measured"] == 2e9 and s["bill"] == memory.predict_peak_config(SMOL, 8, 100, "full")
    assert widgets.memory_summary("SmolLM2-135M", "full", 8, lab.QKVO, 8, 101, measured)["measured"] is None
    q = widgets.memory_summary("Llama-2-7B", "qlora", 16, lab.ALL, 1, 512)
    assert q["bill"]["weights"] < memory.config_counts(widgets.model_configs()["Llama-2-7B"])["total"]  # < 1 byte each
    with pytest.raises(ValueError, match="model must be one of"):
        widgets.memory_summary("GPT-5", "lora")


def test_memory_calculator_follows_its_controls():
    e = widgets.memory_calculator()
    assert "SmolLM2-135M, lora" in e.summary.value
    e.controls["model"].value = "Llama-2-7B"
    seven = e.summary.value
    assert "Llama-2-7B, lora" in seven
    e.controls["batch"].value = 32
    assert e.summary.value != seven
    e.controls["targets"].value = ()
    assert "choose at least one target" in e.summary.value


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_first_step_on_a_padded_batch_is_predicted_with_its_two_options(method):
    """What chapter 6 measured: AdamW's first step (no states during backward) on a padded batch
    (the attention mask makes CPU attention save more); predicted within 2% of MemTracker."""
    model = lk.tiny_llama(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
                          num_hidden_layers=3, vocab_size=500)
    torch.manual_seed(0)
    model = lk.finetune.prepare(model, method, lab.QKVO, r=4, alpha=8).train()
    ids = torch.randint(0, 500, (4, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0                                                      # padding at the end
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    with memory.count_saved_tensors(model) as padded:
        model(**batch).loss.backward()
    with memory.count_saved_tensors(model) as plain:
        model(input_ids=ids, labels=batch["labels"]).loss.backward()
    model.zero_grad(set_to_none=True)
    extra = padded["bytes"] - plain["bytes"]
    assert extra > 0                                                      # the mask costs something here
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        model(**batch).loss.backward()
        opt.step()
    _, peak = memory.tracked_peak(step, model, opt)
    steady = memory.predict_peak_config(model.config, 4, 40, method, lab.QKVO, 4)["total"]
    first = memory.predict_peak_config(model.config, 4, 40, method, lab.QKVO, 4, fresh_optimizer=True,
                                       extra_saved=extra)["total"]
    assert abs(first / peak["total"] - 1) < 0.02, (first, steady, peak["total"])
