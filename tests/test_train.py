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
    batches = stream()
    ckpt = tmp_path / "run.pt"
    train(resumed, batches, steps=2, lr=1e-2, warmup=2, schedule="cosine", checkpoint=ckpt, progress=False)
    again = lora_model()                                 # a fresh model, as after a restart
    losses = train(again, batches, steps=4, lr=1e-2, warmup=2, schedule="cosine", checkpoint=ckpt, progress=False)
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
