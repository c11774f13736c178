"""Fine-tuning runs (chapter 6): the activation and peak-memory arithmetic against measurement,
the method runner, the Trainer route against labkit's loop, and their errors."""
import pytest
import torch

import labkit as lk
from labkit import finetune, memory, text

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]
SHAPE = dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=500)


def prepared(method, targets=QKVO, seed=0):
    model = lk.tiny_llama(seed=seed, **SHAPE)
    torch.manual_seed(seed)
    return finetune.prepare(model, method, targets, r=8, alpha=16).train()


@pytest.mark.parametrize("method, targets", [("full", QKVO), ("lora", QKVO), ("lora", ["q_proj", "v_proj"]),
                                             ("lora", ALL), ("lora", ["down_proj"]), ("lora", ["o_proj"]),
                                             ("lora", ["up_proj"]), ("lora", ["gate_proj"])])
@pytest.mark.parametrize("B, T", [(2, 16), (4, 40)])
def test_activation_arithmetic_matches_what_autograd_saves(method, targets, B, T):
    model = prepared(method, targets)
    ids = torch.randint(0, SHAPE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    with memory.count_saved_tensors(model) as saved:
        model(input_ids=ids, labels=ids)
    predicted = memory.activation_bytes(model.config, B, T, method, targets, r=8)
    # The arithmetic leaves out a few fixed-size tensors (full fine-tuning's int64 input ids for the
    # embedding's backward, the mask, the loss's scratch): measured 0.22% to 0.61% under the count on
    # this toy model, never over it. Hence: under, by less than 1%. (The README's 0.03% is the whole
    # step's peak on SmolLM2, where those tensors weigh far less.)
    assert -0.01 < predicted / saved["bytes"] - 1 <= 0, (predicted, saved["bytes"])


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_predicted_peak_within_1_percent_of_memtracker(method):
    """The README quotes the benchmark's 0.1% on SmolLM2 (scripts/bench_finetune.py). On this toy model
    the small tensors the prediction leaves out (norms, buffers) weigh more: measured 0.08% (full),
    0.13% (LoRA) and 0.68% (QLoRA) under the count. 1% holds all three."""
    model = prepared(method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 48), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _, measured = memory.tracked_peak(step, model, opt)
    predicted = memory.predict_peak(model, 4, 48, method, QKVO, r=8)
    assert abs(predicted["total"] / measured["total"] - 1) < 0.01, (predicted, measured)


def test_activation_arithmetic_rejects_bad_input():
    config = lk.tiny_llama().config
    with pytest.raises(ValueError, match="method must be"):
        memory.activation_bytes(config, 1, 8, "prefix")
    with pytest.raises(ValueError, match="targets must be among"):
        memory.activation_bytes(config, 1, 8, "lora", ["query"])


def test_prepare_sets_what_trains_and_rejects_unknown_methods():
    full = prepared("full")
    assert all(p.requires_grad for p in full.parameters())
    lora = prepared("lora")
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    qlora = prepared("qlora")
    assert sum(isinstance(m, lk.LinearNF4) for m in qlora.modules()) == 3 * 7
    assert lk.count_parameters(qlora)[0] == lk.count_parameters(lora)[0]
    with pytest.raises(ValueError, match="unknown method 'adapter'.*full, lora, qlora, dora"):
        finetune.prepare(lk.tiny_llama(), "adapter")
    with pytest.raises(ValueError, match="matches no module"):
        finetune.prepare(lk.tiny_llama(), "lora", ["query"])


def test_checkpoint_is_the_adapter_or_the_whole_model():
    lora, full = prepared("lora"), prepared("full")
    n_lora, n_total = lk.count_parameters(lora)[0], lk.count_parameters(full)[1]
    assert 4 * n_lora < finetune.checkpoint_bytes(lora, "lora") < 4 * n_lora + 64 * 1024       # + header
    assert 4 * n_total < finetune.checkpoint_bytes(full, "full") < 4 * n_total + 64 * 1024


def test_table_prints_a_dash_where_a_row_has_no_value():
    out = finetune.table([{"method": "base", "trainable": 0, "trainable_pct": 0.0, "exact_match": 0.0, "probe": 1.0},
                          {"method": "lora", "trainable": 1000, "trainable_pct": 1.5, "exact_match": 0.5, "probe": 0.75,
                           "peak_mib": 12.0, "s_per_step": 0.5, "checkpoint_mib": 0.1}], show=False).splitlines()
    assert out[0].split()[:3] == ["method", "trainable", "%"]
    assert out[1].split() == ["base", "0", "0.00", "0%", "100%", "-", "-", "-"]
    assert out[2].split() == ["lora", "1,000", "1.50", "50%", "75%", "12", "0.5", "0.1"]


@pytest.fixture(scope="module")
def tok():
    return lk.load_tokenizer()


def tiny_for(tok):
    return lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256)


def test_run_returns_one_measured_row(tok):
    rows = lk.data.load_task("people")
    rows = {"train": rows["train"][:8], "test": rows["test"][:3]}
    probe = lk.data.load_probe()[:2]
    row = finetune.run("lora", rows, probe, model=tiny_for(tok), tok=tok, steps=2, batch_size=2, progress=False)
    assert row["method"] == "lora" and len(row["losses"]) == 2 and len(row["answers"]) == 3
    assert row["trainable"] == lk.count_parameters(row["model"])[0] > 0
    assert row["s_per_step"] > 0 and row["checkpoint_mib"] > 0
    assert 0 <= row["exact_match"] <= 1 and 0 <= row["probe"] <= 1


def test_trainer_takes_the_same_step_as_labkit_loop(tok):
    """Two steps over one batch (Trainer's order does not matter: the loss is a mean over the
    answer tokens) must give the same loss and the same adapter weights, within 1e-5. trainer_run
    keeps Trainer's clipping at norm 1.0, which bites here: labkit's loop must clip the same."""
    from peft import LoraConfig, get_peft_model
    rows = lk.data.load_task("people")["train"][:4]
    config = LoraConfig(r=4, lora_alpha=512, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights="gaussian")      # scaling 128: gradient norms above 1 on a toy model
    twins = []
    for _ in range(3):
        torch.manual_seed(0)
        twins.append(get_peft_model(tiny_for(tok), config))
    ours, theirs, unclipped = twins
    batch = text.collate([text.encode(tok, r["prompt"], r["response"]) for r in rows], tok.pad_token_id)
    our_loss = lk.train.train(ours, iter([batch, batch]), 2, lr=1e-2, max_grad_norm=1.0, progress=False)
    lk.train.train(unclipped, iter([batch, batch]), 2, lr=1e-2, progress=False)
    their_loss, _ = finetune.trainer_run(theirs, tok, rows, 2, lr=1e-2, batch_size=4, progress=False)
    c = {n: p for n, p in unclipped.named_parameters() if p.requires_grad}
    assert max((c[n] - p).abs().max().item() for n, p in theirs.named_parameters() if p.requires_grad) > 1e-4
    assert len(their_loss) == 2 and max(abs(a - b) for a, b in zip(our_loss, their_loss)) < 1e-5
    a = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    b = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


def test_length_stats_and_answer_loss(tok):
    rows = lk.data.load_task("people")["val"][:5]
    stats = text.length_stats(tok, rows)
    encoded = [text.encode(tok, r["prompt"], r["response"]) for r in rows]
    assert stats["total"] == (min(len(e["input_ids"]) for e in encoded),
                              sorted(len(e["input_ids"]) for e in encoded)[2],
                              max(len(e["input_ids"]) for e in encoded))
    assert all(lo <= mid <= hi for lo, mid, hi in stats.values())
    model = tiny_for(tok)
    assert text.answer_loss(model, tok, rows, batch_size=2) == pytest.approx(
        text.answer_loss(model, tok, rows, batch_size=5), rel=1e-5)


def test_answer_loss_never_puts_more_than_loss_batch_rows_in_one_pass(tok, monkeypatch):
    """Large batches cost more than they save here: the logits of 64 rows are 1.3 GB (44 s against 15 s
    for 60 rows, measured). Whatever batch_size asks, a forward pass sees at most LOSS_BATCH rows."""
    rows = lk.data.load_task("people")["val"][:7]
    model = tiny_for(tok)
    sizes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    monkeypatch.setattr(text, "LOSS_BATCH", 3)
    capped = text.answer_loss(model, tok, rows, batch_size=64)
    assert sizes == [3, 3, 1]
    assert capped == pytest.approx(text.answer_loss(model, tok, rows, batch_size=3), rel=1e-6)


def forward_clock(monkeypatch, module):
    """A fake clock for lk.finetune: its time.perf_counter() counts the forward passes of `module`,
    so latency_per_token returns forward passes per generated token, whatever the machine."""
    from types import SimpleNamespace
    passes = [0]
    module.register_forward_pre_hook(lambda m, args: passes.__setitem__(0, passes[0] + 1))
    monkeypatch.setattr(finetune, "time", SimpleNamespace(perf_counter=lambda: float(passes[0])))


@pytest.mark.parametrize("prompt_method", [False, True])
@pytest.mark.parametrize("n_prompts", [1, 20])        # 20: more than the decoder's default batch of 16
def test_latency_is_one_forward_pass_per_token(tok, monkeypatch, prompt_method, n_prompts):
    """One decoding step makes one token per row: timed with a clock that ticks once per forward
    pass, a batch of any size costs 1.0 per token, with or without virtual tokens."""
    model = tiny_for(tok)
    if prompt_method:
        model = lk.prompts.PromptModel(model, "ptuning_v2", 4, init="random")
    forward_clock(monkeypatch, model.model if prompt_method else model)
    prompts = "Hi" if n_prompts == 1 else [f"Hi {i}" for i in range(n_prompts)]
    assert finetune.latency_per_token(model, tok, prompts, new_tokens=4, repeats=2) == 1.0


def test_latency_waits_for_the_models_device_and_gives_the_padding_side_back(tok, monkeypatch):
    """The clock is read after the device has run its kernels: latency_per_token synchronizes the
    model's device (CUDA or MPS alike, lk.session.synchronize) before and after every repeat, and
    hands the tokenizer back with the padding side it had."""
    waited = []
    monkeypatch.setattr(finetune, "synchronize", waited.append)
    side = tok.padding_side
    finetune.latency_per_token(tiny_for(tok), tok, ["Hi", "Hello there"], new_tokens=2, repeats=2)
    assert waited == [torch.device("cpu")] * 4 and tok.padding_side == side


@pytest.mark.parametrize("device, use_cpu", [("cpu", True), ("mps", False), ("cuda", False)])
def test_trainer_stays_on_the_models_device(monkeypatch, device, use_cpu):
    """use_cpu=True would make Trainer move a model on Apple's MPS to the CPU: only a model on the
    CPU asks for it. Mixed precision is asked for on CUDA only. TrainingArguments is replaced by a
    recorder, so no Trainer runs and no device is needed."""
    import transformers
    from types import SimpleNamespace

    class Recorded(Exception):
        pass

    def recorder(**kwargs):
        raise Recorded(kwargs)

    monkeypatch.setattr(transformers, "TrainingArguments", recorder)
    monkeypatch.setattr(finetune, "amp_dtype", lambda d: torch.bfloat16)
    model = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))
    with pytest.raises(Recorded) as got:
        finetune.trainer_run(model, None, None, 1, encoded=[])
    args = got.value.args[0]
    assert args["use_cpu"] is use_cpu
    assert (args["bf16"], args["fp16"]) == ((True, False) if device == "cuda" else (False, False))


def stream(vocab=256, B=2, T=10):
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(0, vocab, (B, T), generator=g)
        yield {"input_ids": x, "labels": x}


def base_name(model, name):
    """The name a parameter or module of a prepared model had in the model before: wrappers put a
    prefix in front (peft's "base_model.model.", a PromptModel's "model.") and a step into the
    layer they wrap ("base." in labkit's wrappers, "base_layer." in peft's)."""
    prefix = "model." if isinstance(model, lk.prompts.PromptModel) else "base_model.model."
    name = name.removeprefix(prefix) if name.startswith(prefix) else name
    return ".".join(part for part in name.split(".") if part not in ("base", "base_layer"))


@pytest.mark.parametrize("method", finetune.METHODS)
def test_every_method_trains_only_its_own_parameters(method):
    """Each base weight is found by its name (not by its value: every RMSNorm weight starts as all
    ones), and is frozen and unchanged after training; full fine-tuning trains and moves them all;
    QLoRA keeps the linear layers' weights as NF4 buffers, which training must not change."""
    model = lk.tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = finetune.prepare(model, method, steps=4, prompt_init="zero")       # text init needs a tokenizer
    trainable, total = lk.count_parameters(model)
    assert 0 < trainable <= total
    if method != "full":
        assert trainable < 0.5 * total
    nf4 = {base_name(model, n): m for n, m in model.named_modules() if isinstance(m, lk.LinearNF4)}
    packed = {n: m.packed.clone() for n, m in nf4.items()}
    losses = lk.train.train(model, stream(), 4, lr=1e-3, progress=False,
                            after_step=finetune.after_step_hook(model, method))
    assert len(losses) == 4 and all(l == l for l in losses)            # no NaN
    params = dict(model.named_parameters())
    if method == "full":
        assert params.keys() == before.keys()
        for n, p in params.items():
            assert p.requires_grad and not torch.equal(p, before[n]), n
        return
    frozen = {base_name(model, n): p for n, p in params.items() if not p.requires_grad}
    leaked = [n for n, p in params.items() if p.requires_grad and base_name(model, n) in before]
    assert not leaked, f"base weights that train: {leaked}"
    if method == "qlora":                    # every linear layer but the head is now NF4 bytes
        assert nf4 and all(n + ".weight" in before and n + ".weight" not in frozen for n in nf4)
        for n, m in nf4.items():
            assert torch.equal(m.packed, packed[n]), n
        before = {n: p for n, p in before.items() if n.removesuffix(".weight") not in nf4}
    assert before.keys() <= frozen.keys()              # (peft's AdaLoRA adds a frozen rank count per layer)
    for n, p in before.items():                                       # the base weights did not move
        assert torch.equal(frozen[n], p), n


def test_adalora_spreads_its_rank_budget():
    model = finetune.prepare(lk.tiny_llama(), "adalora", r=4, steps=12)
    lk.train.train(model, stream(), 12, lr=1e-2, progress=False, after_step=finetune.after_step_hook(model, "adalora"))
    ranks = finetune.adalora_ranks(model)
    assert sorted(ranks) == sorted(f"model.layers.{l}.self_attn.{p}" for l in range(2) for p in QKVO)
    assert sum(ranks.values()) == 4 * len(ranks)                        # the budget: target r on average
    assert all(0 <= r <= 6 for r in ranks.values())                     # at most init_r = 1.5 r


def test_an_adalora_run_leaves_no_hook_behind(tok):
    """run() records AdaLoRA's task loss through a forward hook while it trains; the model it
    returns must not keep recording (the hook would grow a list with every later training pass)."""
    people = lk.data.load_task("people")
    rows = {"train": people["train"][:8], "val": people["val"][:2]}
    row = finetune.run("adalora", rows, model=tiny_for(tok), tok=tok, steps=4, batch_size=2, progress=False,
                       scoring="val", measure_peak=False)
    assert len(row["losses"]) == 4
    assert [n for n, m in row["model"].named_modules() if m._forward_hooks] == []


def test_adalora_rows_report_the_task_loss_apart_from_the_regulariser():
    """peft adds AdaLoRA's orthogonality regulariser to the loss it returns; run() reports the
    task's cross-entropy, recorded before that, and keeps the sum apart."""
    model = finetune.prepare(lk.tiny_llama(), "adalora", r=4, steps=4)
    with finetune._record_task_loss(model) as task:
        logged = lk.train.train(model, stream(), 4, lr=1e-2, progress=False,
                                after_step=finetune.after_step_hook(model, "adalora"))
    assert len(task) == 4
    weight = model.peft_config["default"].orth_reg_weight
    for t, total in zip(task, logged):
        assert 0 < total - t < weight * 10                              # a positive regulariser, weighted


def test_he_et_al_parallel_adapter_sits_beside_each_mlp_at_scale_4():
    model = finetune.prepare(lk.tiny_llama(), "parallel_ffn_s4", bottleneck=4)
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, lk.adapters.ParallelAdapter)]
    assert [n for n, _ in wrapped] == [f"model.layers.{l}.mlp" for l in range(2)]
    assert all(m.scale == 4.0 and m.adapter.down.out_features == 8 for _, m in wrapped)


def test_seed_summary_takes_the_best_rate_and_averages_its_seeds():
    def run(method, lr, seed, em, **kw):
        return {"method": method, "lr": lr, "seed": seed, "exact_match": em, "probe": 0.5, "trainable": 10,
                "trainable_pct": 1.0, "s_per_step": 2.0, "checkpoint_mib": 0.1, "val_loss": 0.2,
                "peak_mib": kw.get("peak"), "ms_per_token": kw.get("ms")}
    runs = [run("lora", 1e-3, 0, 0.2), run("lora", 2e-3, 0, 0.9), run("lora", 2e-3, 1, 0.8, peak=100, ms=5.0),
            run("lora", 2e-3, 2, 1.0), {"method": "ia3", "lr": 1e-2, "seed": 0, "val_loss": 0.3},  # ia3: not scored
            {**run("lora", 2e-3, 0, 0.0), "steps": 36}]                                          # another budget
    rows = finetune.seed_summary(runs, {"lora": 2e-3, "ia3": 1e-2})
    lora = rows[0]
    assert lora["method"] == "lora" and lora["seeds"] == [0, 1, 2]
    assert lora["exact_match"] == pytest.approx(0.9) and lora["em_sd"] == pytest.approx(0.1)
    assert (lora["em_min"], lora["em_max"], lora["peak_mib"], lora["ms_per_token"]) == (0.8, 1.0, 100, 5.0)
    assert [r["method"] for r in finetune.seed_summary(runs, {"ia3": 1e-2, "lora": 2e-3})] == ["lora"]


def test_time_per_step_leaves_out_evaluation():
    """An eval_fn that sleeps 0.5 s after every step must not show in s_per_step (a toy model's step
    takes a few milliseconds)."""
    import time
    model = lk.inject_lora(lk.tiny_llama(), ["q_proj"], r=2, alpha=4)
    x = torch.randint(0, 256, (2, 8))
    history = []
    fit = finetune.timed_training(model, iter(lambda: {"input_ids": x, "labels": x}, None), 2, measure_peak=False,
                                  progress=False, eval_fn=lambda m: time.sleep(0.5) or {"slept": True}, eval_every=1,
                                  history=history)
    assert [h["step"] for h in history] == [1, 2]
    assert fit["s_per_step"] < 0.25
