"""The training loop: its default is plain AdamW, and each option does what it says."""
import itertools
import math

import pytest
import torch

import labkit as lk
from labkit.train import lr_factor, train


def stream(seed=0, batch=4, T=12):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, 256, (batch, T), generator=g)
        yield {"input_ids": x, "labels": x}


def lora_model(seed=0):
    model = lk.inject_lora(lk.tiny_llama(seed=seed), ["q_proj", "v_proj"], r=4, alpha=8)
    torch.manual_seed(seed)
    return model


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_default_is_plain_adamw_bit_for_bit():
    ours = lora_model()
    losses = train(ours, stream(), steps=3, lr=1e-2, progress=False)
    ref = lora_model()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)          # train()'s default
    ref.train()
    ref_losses = []
    for batch in itertools.islice(stream(), 3):
        loss = ref(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(state(ours).values(), state(ref).values()))


def test_lr_schedules():
    assert [lr_factor(s, 10, warmup=4) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, warmup=4, schedule="linear") == 1.0 and lr_factor(9, 10, 4, "linear") == pytest.approx(1 / 6)
    assert lr_factor(0, 10, schedule="cosine") == 1.0 and lr_factor(5, 10, schedule="cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule must be"):
        lr_factor(0, 10, schedule="step")


def test_gradient_accumulation_matches_one_big_batch():
    big = lora_model()
    train(big, stream(batch=8), steps=1, lr=1e-2, progress=False)
    halves = ({k: v[i:i + 4] for k, v in b.items()} for b in stream(batch=8) for i in (0, 4))
    small = lora_model()
    train(small, halves, steps=1, lr=1e-2, grad_accum=2, progress=False)
    for a, b in zip(state(big).values(), state(small).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def masked_batch(lengths, masked, seed):
    """Rows of the given lengths, right-padded to the longest; the first `masked` labels of each row
    are -100 (the prompt), as lk.text.collate makes them."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, m) in enumerate(zip(lengths, masked)):
        ids[i, :n] = torch.randint(1, 256, (n,), generator=g)
        att[i, :n] = 1
        labels[i, m:n] = ids[i, m:n]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def pad_to(batch, T):
    pad = T - batch["input_ids"].shape[1]
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, pad), value=fill[k]) for k, v in batch.items()}


def trained_lora_model():
    """A LoRA model whose B is not zero, so that every adapter weight has a gradient."""
    model = lora_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def gradients_of_one_step(batches, grad_accum):
    """The gradient train() steps with, caught by after_step before it is cleared."""
    model, grads = trained_lora_model(), {}
    def catch(step):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    train(model, iter(batches), steps=1, lr=1e-2, grad_accum=grad_accum, progress=False, after_step=catch)
    return grads


def test_accumulation_weights_tokens_as_one_large_batch_does():
    """Two masked batches of unequal length and unequal numbers of answer tokens, accumulated, give
    the gradient of the one batch that holds them both: the mean over all their answer tokens."""
    short = masked_batch([6, 9], masked=[5, 2], seed=1)            # 1 + 7 = 8 tokens to predict
    long = masked_batch([16, 12], masked=[3, 10], seed=2)          # 13 + 2 = 15 tokens to predict
    both = {k: torch.cat([pad_to(short, 16)[k], long[k]]) for k in short}
    one = gradients_of_one_step([both], grad_accum=1)
    accumulated = gradients_of_one_step([short, long], grad_accum=2)
    for n, g in one.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(accumulated[n], g, rtol=0, atol=1e-5 * g.abs().max().item())
    # Averaging the two batches' means instead (what dividing each by grad_accum does) is not that gradient:
    model = trained_lora_model()
    ((model(**short).loss + model(**long).loss) / 2).backward()
    worst = max((p.grad - one[n]).abs().max() / one[n].abs().max()
                for n, p in model.named_parameters() if p.requires_grad)
    assert worst > 1e-2


def test_accumulation_needs_tokens_to_predict():
    nothing = masked_batch([6, 6], masked=[6, 6], seed=0)
    with pytest.raises(ValueError, match="no token to predict"):
        train(lora_model(), iter([nothing, nothing]), steps=1, grad_accum=2, progress=False)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_train import dropout_model, stream
from labkit.train import train
def die(step):
    if step == {die_after}:
        os.kill(os.getpid(), signal.SIGKILL)          # no clean-up, no final save: as a crash or a pre-emption
train(dropout_model(), stream(), steps={steps}, lr=1e-2, warmup=2, schedule="cosine", checkpoint={ckpt!r},
      checkpoint_every=2, progress=False, after_step=die)
"""


def dropout_model(seed=0):
    """LoRA with dropout, so that a resumed run matches only if the RNG state was restored too."""
    model = lk.inject_lora(lk.tiny_llama(seed=seed), ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.2)
    torch.manual_seed(seed)
    return model


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """A run killed (SIGKILL) after step 5 of 7, checkpointing every 2 steps, resumed in a fresh process
    from the checkpoint of step 4: the same losses and weights as a run that was never stopped."""
    import subprocess
    import sys
    from pathlib import Path
    steps, ckpt = 7, tmp_path / "run.pt"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), die_after=4, steps=steps, ckpt=str(ckpt))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]                    # really killed
    assert len(torch.load(ckpt, weights_only=True)["losses"]) == 4       # the step-4 checkpoint survived
    straight = dropout_model()
    expected = train(straight, stream(), steps=steps, lr=1e-2, warmup=2, schedule="cosine", progress=False)
    resumed = dropout_model()
    with torch.no_grad():                        # other adapter weights and RNG: the file must restore both
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    torch.manual_seed(123)
    losses = train(resumed, stream(), steps=steps, lr=1e-2, warmup=2, schedule="cosine", checkpoint=ckpt,
                   progress=False)
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(state(straight).values(), state(resumed).values()))


def test_resume_with_accumulation_and_global_rng_streams(tmp_path):
    """grad_accum=2, a stream that draws from the global RNG, and dropout: a run stopped after 2 of
    4 steps and resumed from its checkpoint (fresh model, fresh stream) matches the straight run.
    The consumed batches are skipped before the RNG state is restored."""
    def global_stream():
        while True:
            x = torch.randint(0, 256, (2, 12))                          # the global RNG, as a sampler would
            yield {"input_ids": x, "labels": x}
    straight = dropout_model()
    expected = train(straight, global_stream(), steps=4, lr=1e-2, grad_accum=2, progress=False)
    ckpt = tmp_path / "run.pt"
    train(dropout_model(), global_stream(), steps=2, lr=1e-2, grad_accum=2, checkpoint=ckpt, progress=False)
    resumed = dropout_model()
    losses = train(resumed, global_stream(), steps=4, lr=1e-2, grad_accum=2, checkpoint=ckpt, progress=False)
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(state(straight).values(), state(resumed).values()))


def test_checkpoint_edges(tmp_path):
    import numpy as np
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        train(lora_model(), stream(), steps=2, checkpoint_every=1, progress=False)
    history = []                              # numpy and 0-d torch numbers from an eval_fn survive the round trip
    train(lora_model(), stream(), steps=2, eval_fn=lambda m: {"acc": np.float32(0.5), "loss": torch.tensor(0.25)},
          eval_every=1, history=history, checkpoint=tmp_path / "a.pt", progress=False)
    assert torch.load(tmp_path / "a.pt", weights_only=True)["history"] == [{"step": 1, "acc": 0.5, "loss": 0.25},
                                                                           {"step": 2, "acc": 0.5, "loss": 0.25}]
    for many in ([1, 2], torch.ones(2), np.ones(2)):
        with pytest.raises(TypeError, match="numbers and strings only"):
            train(lora_model(), stream(), steps=1, eval_fn=lambda m: {"x": many}, eval_every=1,
                  checkpoint=tmp_path / "b.pt", progress=False)


def test_a_batch_with_nothing_to_predict_is_skipped_not_nan():
    """One of two accumulated batches fully masked (an answer cut off by truncation): the step is
    the other batch's, and the logged loss is a number."""
    nothing, some = masked_batch([6, 6], masked=[6, 6], seed=0), masked_batch([6, 6], masked=[2, 2], seed=1)
    both = train(lora_model(), iter([nothing, some]), steps=1, grad_accum=2, progress=False)
    alone = train(lora_model(), iter([some]), steps=1, progress=False)
    assert both == alone and not math.isnan(both[0])


def test_clipping_bounds_the_gradient_norm():
    model = lora_model()
    seen = []
    orig = torch.nn.utils.clip_grad_norm_
    def spy(params, max_norm):
        params = list(params)
        total = orig(params, max_norm)
        seen.append(math.sqrt(sum(p.grad.pow(2).sum().item() for p in params)))
        return total
    torch.nn.utils.clip_grad_norm_ = spy
    try:
        train(model, stream(), steps=2, lr=1e-2, max_grad_norm=1e-3, progress=False)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    assert len(seen) == 2 and all(n <= 1e-3 * 1.0001 for n in seen)


def test_eval_every_n_steps():
    history = []
    train(lora_model(), stream(), steps=4, eval_fn=lambda m: {"training": m.training}, eval_every=2,
          history=history, progress=False)
    assert history == [{"step": 2, "training": False}, {"step": 4, "training": False}]


def test_resume_from_a_checkpoint_gives_the_same_run(tmp_path):
    straight = lora_model()
    full = train(straight, stream(), steps=4, lr=1e-2, warmup=2, schedule="cosine", progress=False)
    resumed = lora_model()
    ckpt = tmp_path / "run.pt"
    train(resumed, stream(), steps=2, lr=1e-2, warmup=2, schedule="cosine", checkpoint=ckpt, progress=False)
    again = lora_model()                       # a fresh model and a fresh stream, as after a restart
    losses = train(again, stream(), steps=4, lr=1e-2, warmup=2, schedule="cosine", checkpoint=ckpt, progress=False)
    assert losses == full
    assert all(torch.equal(a, b) for a, b in zip(state(straight).values(), state(again).values()))


def test_resume_into_a_model_without_the_adapters_is_an_error(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(lora_model(), stream(), steps=1, checkpoint=ckpt, progress=False)
    other = lk.inject_lora(lk.tiny_llama(), ["k_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="does not fit this model"):
        train(other, stream(), steps=2, checkpoint=ckpt, progress=False)


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        train(lk.tiny_llama().requires_grad_(False), stream(), steps=1, progress=False)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_are_transformers_schedules(schedule):
    """The factor at every step equals transformers' get_*_schedule_with_warmup (Trainer's)."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)
    steps, warmup = 12, 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = {"constant": lambda: get_constant_schedule_with_warmup(opt, warmup),
              "linear": lambda: get_linear_schedule_with_warmup(opt, warmup, steps),
              "cosine": lambda: get_cosine_schedule_with_warmup(opt, warmup, steps)}[schedule]()
    factors = []
    for _ in range(steps):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        theirs.step()
    assert factors == pytest.approx([lr_factor(s, steps, warmup, schedule) for s in range(steps)], abs=1e-12)


def test_resume_refuses_other_shapes_even_from_an_older_checkpoint(tmp_path):
    """A rank-1 checkpoint resumed into a rank-8 model: copy_ would broadcast A (1, in) into (8, in)."""
    ckpt = tmp_path / "r1.pt"
    train(lk.inject_lora(lk.tiny_llama(), ["q_proj", "v_proj"], r=1, alpha=8), stream(), steps=1, checkpoint=ckpt,
          progress=False)
    for older in (False, True):
        if older:                                  # as an older labkit wrote it: tensors, no settings
            saved = torch.load(ckpt, weights_only=True)
            torch.save({k: v for k, v in saved.items() if k in ("params", "optimizer", "scheduler", "losses",
                                                                "history")}, ckpt)
        rank8 = lk.inject_lora(lk.tiny_llama(), ["q_proj", "v_proj"], r=8, alpha=8)
        before = state(rank8)
        with pytest.raises(ValueError, match=r"shapes.*q_proj\.lora_A: checkpoint \(1, 64\) vs model \(8, 64\)"):
            train(rank8, stream(), steps=2, checkpoint=ckpt, progress=False)
        assert all(torch.equal(before[n], p) for n, p in state(rank8).items())


def test_resume_refuses_other_lora_settings_or_optimizer_settings(tmp_path):
    """Same names, same shapes: an alpha (or rsLoRA) changed between the runs would go unnoticed, and
    the saved optimizer state would silently put the old learning rate back."""
    ckpt = tmp_path / "run.pt"
    train(lora_model(), stream(), steps=1, lr=1e-2, checkpoint=ckpt, progress=False)
    for other, message in ((dict(alpha=16), r"alpha.*\(8, 16\)"), (dict(use_rslora=True), r"use_rslora.*\(False, True\)")):
        model = lk.inject_lora(lk.tiny_llama(), ["q_proj", "v_proj"], **(dict(r=4, alpha=8) | other))
        with pytest.raises(ValueError, match=rf"other LoRA settings.*{message}"):
            train(model, stream(), steps=2, lr=1e-2, checkpoint=ckpt, progress=False)
    for other, message in ((dict(lr=1e-3), r"'lr': \(0\.01, 0\.001\)"), (dict(weight_decay=0.1), "weight_decay"),
                           (dict(warmup=1), "warmup"), (dict(grad_accum=2), "grad_accum")):
        with pytest.raises(ValueError, match=rf"other settings.*{message}"):
            train(lora_model(), stream(), steps=2, checkpoint=ckpt, progress=False, **(dict(lr=1e-2) | other))
    assert len(train(lora_model(), stream(), steps=2, lr=1e-2, checkpoint=ckpt, progress=False)) == 2   # same: fine


def test_an_older_checkpoint_without_settings_still_resumes(tmp_path):
    straight = lora_model()
    full = train(straight, stream(), steps=4, lr=1e-2, progress=False)
    ckpt = tmp_path / "run.pt"
    train(lora_model(), stream(), steps=2, lr=1e-2, checkpoint=ckpt, progress=False)
    saved = torch.load(ckpt, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k in ("params", "optimizer", "scheduler", "losses", "history")}, ckpt)
    again = lora_model()
    assert train(again, stream(), steps=4, lr=1e-2, checkpoint=ckpt, progress=False) == full
    assert all(torch.equal(a, b) for a, b in zip(state(straight).values(), state(again).values()))


def test_the_docs_say_that_the_default_autocasts_on_cuda():
    """The defaults are plain fp32 AdamW on a CPU only: on CUDA, amp=None autocasts (train.autocast)."""
    import re
    import labkit.train as module
    plain = re.search(r"[^.]*plain AdamW[^.]*\.", " ".join(module.__doc__.split())).group()
    assert "CUDA" in plain and "amp=False" in plain, plain
    doc = " ".join(train.__doc__.split())
    assert "amp=None" in doc and "CUDA" in doc, "train's docstring does not say what amp=None does"


def test_resume_into_a_model_that_trains_more_is_refused_before_anything_changes(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(lora_model(), stream(), steps=1, checkpoint=ckpt, progress=False)
    more = lk.inject_lora(lk.tiny_llama(), ["q_proj", "k_proj", "v_proj"], r=4, alpha=8)
    before = state(more)
    with pytest.raises(ValueError, match=r"does not fit this model.*this model trains \['model\.layers\.0\.self_attn\.k"):
        train(more, stream(), steps=2, checkpoint=ckpt, progress=False)
    assert all(torch.equal(before[n], p) for n, p in state(more).items())
