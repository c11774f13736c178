"""Chapter 7 (the rank and alpha laboratory): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ..lora import count_parameters, inject_lora
from ._common import _attempt, _ok, _todo


def check_lora_params(fn):
    """fn(config, targets, r) -> trainable LoRA parameters of the whole model (every layer)."""
    from ..models import tiny_llama
    cases = ((2, ["q_proj", "v_proj"], 4), (4, ["q_proj", "k_proj", "v_proj", "o_proj"], 2),
             (1, ["gate_proj", "up_proj", "down_proj"], 3), (2, ["k_proj"], 8))
    for kv_heads, targets, r in cases:
        model = tiny_llama(num_key_value_heads=kv_heads, num_hidden_layers=2)
        done, got = _attempt(fn, model.config, targets, r)
        if not done:
            return _todo("LoRA parameters of a model")
        want = count_parameters(inject_lora(model, targets, r=r, alpha=r))[0]
        assert got == want, (f"{targets} at r={r} with {kv_heads} key/value heads: you gave {got:,}, the injected "
                             f"model has {want:,}: each target adds r x (in + out), and k/v are "
                             "num_key_value_heads x head_dim wide")
    return _ok("LoRA parameters: r (in + out) per target per layer; k and v are narrower with grouped-query attention")


def check_subspace_similarity(fn):
    """fn(A1, A2) -> the LoRA paper's phi(i, j) for every i <= r1, j <= r2, as an (r1, r2) tensor."""
    from ..lab import subspace_similarity
    g = torch.Generator().manual_seed(7)
    for r1, r2, d in ((2, 3, 10), (8, 64, 200), (5, 5, 50)):
        A1, A2 = torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g)
        done, got = _attempt(fn, A1, A2)
        if not done:
            return _todo("subspace similarity")
        want = subspace_similarity(A1, A2)
        got = torch.as_tensor(got, dtype=torch.float32)
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)} (one value per i, j)"
        err = (got - want).abs().max().item()
        assert err < 1e-4, (f"({r1}, {r2}): off by up to {err:.3g}. Use the right-singular vectors of A (rows of "
                            "Vh, best first), sum squared cosines over the top i and top j, divide by min(i, j)")
    return _ok("phi matches lk.lab.subspace_similarity to 1e-4")


def check_same_step_scale(fn, results):
    """fn(results, key) -> the keys of the other cached q,v runs whose scaling x r x lr equals that of `key`."""
    from ..lab import step_scale
    runs = results["runs"]
    for key in ("q,v r=8 a=16 lr=0.002", "q,v r=8 a=8 lr=0.001"):
        done, got = _attempt(fn, results, key)
        if not done:
            return _todo("runs with the same step scale")
        x = runs[key]
        target = step_scale(x["r"], x["alpha"], x["lr"], x["rslora"])
        want = {k for k, y in runs.items() if k != key and y["targets"] == "q,v"
                and math.isclose(step_scale(y["r"], y["alpha"], y["lr"], y["rslora"]), target, rel_tol=1e-9)}
        assert set(got) == want, (f"for {key}: you gave {sorted(got)}, expected {sorted(want)} "
                                  "(scaling is alpha / r, or alpha / sqrt(r) with rsLoRA; then times r and lr)")
    return _ok("same scaling x r x lr: compare their final losses in the cache")


def check_rank_under_budget(fn):
    """fn(config, targets, limit_bytes) -> the largest r whose adapters (fp32 weights, gradients and
    AdamW's two states: 16 bytes per parameter) fit in limit_bytes."""
    from ..memory import config_counts
    from ..widgets import model_configs
    configs = model_configs()
    for name, targets, limit in (("Llama-2-7B", ["q_proj", "v_proj"], 2**30),
                                 ("Llama-2-7B", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], 2**30),
                                 ("SmolLM2-135M", ["q_proj", "k_proj", "v_proj", "o_proj"], 50 * 2**20)):
        done, got = _attempt(fn, configs[name], targets, limit)
        if not done:
            return _todo("largest rank under a memory budget")
        per_rank = config_counts(configs[name], "lora", targets, 1)["trainable"]
        want = limit // (16 * per_rank)
        assert got == want, (f"{name}, {targets}, {limit / 2**20:.0f} MiB: you gave r={got}, expected r={want} "
                             f"({per_rank:,} parameters per unit of rank, 16 bytes each)")
    return _ok("the adapters' bill grows linearly in r: 16 bytes x r x sum(in + out) over targets and layers")


# Build it (chapter 7): alpha as a step size. The hidden cases, (r, alpha, lr, new_alpha, rslora,
# new_rslora): for the rule, and (others) for the live peft runs.
STEP_RULE_CASES = ((8, 16, 2e-3, 32, False, False), (16, 32, 1e-3, 4, False, True), (64, 16, 2e-3, 4, True, True),
                   (64, 16, 2e-3, 128, True, False), (4, 8, 1e-4, 2, False, False))
STEP_LIVE_CASES = ((8, 16, 2e-3, 64, False, False), (16, 32, 1e-3, 16, False, True), (64, 16, 2e-3, 64, True, False))
STEP_LIVE_TOL = (1e-2, 0.15, 0.15)        # ||ΔW_yours - ΔW_reference|| / ||ΔW_reference|| after steps 1, 2, 3


def _setting(r, alpha, rslora):
    from ..lora import lora_scaling
    s = lora_scaling(alpha, r, rslora)
    return f"{'rsLoRA' if rslora else 'LoRA'} r={r} alpha={alpha:g} (scaling {s:.4g})"


def _live_delta_w(r, alpha, lr, rslora, steps=3):
    """peft's LoRA on q and v of a tiny random Llama (tiny_llama(seed=0): hidden 64, 2 layers), its A
    drawn from seed 1 whatever alpha, lr and rslora, trained `steps` AdamW steps (weight decay 0, as
    lk.train.train) on one fixed batch of 4 x 16 random tokens, fp32 on the CPU. Returns, after each
    step, ΔW = scaling B A of every adapted module (peft's get_delta_weight), flattened and joined."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from ..models import tiny_llama
    with torch.random.fork_rng(devices=[]):                 # the notebook's random state is left as it was
        base = tiny_llama(seed=0)
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                use_rslora=rslora)).train()
        ids = torch.randint(0, base.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        out = []
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                out.append(torch.cat([m.get_delta_weight("default").reshape(-1) for m in layers]))
    return out


def _live_gaps(r, alpha, lr, new_alpha, rslora, new_rslora, new_lr):
    """||ΔW_new - ΔW_ref|| / ||ΔW_ref|| after each step, and ΔW_new's size in units of ΔW_ref's."""
    ref = _live_delta_w(r, alpha, lr, rslora)
    new = _live_delta_w(r, new_alpha, new_lr, new_rslora)
    return ([((b - a).norm() / a.norm()).item() for a, b in zip(ref, new)],
            [(b @ a / (a @ a)).item() for a, b in zip(ref, new)])


def check_matching_lr(fn):
    """Build it, chapter 7. fn(r, alpha, lr, new_alpha, rslora, new_rslora) -> the learning rate at
    which a LoRA of the same rank r with new_alpha (rsLoRA if new_rslora) makes the same first
    updates ΔW = scaling B A as the one at (alpha, lr) (rsLoRA if rslora). Adam moves each entry of
    B by about lr in its first steps, whatever the gradient's size, so ΔW moves by about scaling x lr:
    the answer is lr x scaling / new_scaling, with scaling alpha / r, or alpha / sqrt(r) with rsLoRA.

    First the numbers, on 5 hidden cases, against that rule to 1e-9 relative, with a diagnosis when
    wrong. Then live runs with peft, on 3 other cases: a tiny random Llama with LoRA on q and v, the
    same A at the start, 3 AdamW steps on one fixed batch at (alpha, lr) and at (new_alpha, your lr);
    ΔW after each step must agree within 1e-2 (step 1) and 0.15 (steps 2 and 3) of the reference's
    norm. Measured with the exact rule: at most 0.2% after step 1 (Adam's eps, 1e-8, is not scale-free
    for the smallest gradients) and 7% after step 3 (A moves by about lr per step too, and the lrs
    differ: "close, not equal", the chapter's section 3)."""
    from ..lora import lora_scaling
    for r, alpha, lr, new_alpha, rslora, new_rslora in STEP_RULE_CASES:
        done, got = _attempt(fn, r, alpha, lr, new_alpha, rslora, new_rslora)
        if not done:
            return _todo("the learning rate that matches a new alpha")
        where = f"from {_setting(r, alpha, rslora)} at lr={lr:g} to {_setting(r, new_alpha, new_rslora)}"
        try:
            if isinstance(got, (str, bytes)):
                raise TypeError
            got = float(got)
        except (TypeError, ValueError):
            raise AssertionError(f"{where}: you returned {type(got).__name__}; return the learning rate, a number") \
                from None
        s, s_new = lora_scaling(alpha, r, rslora), lora_scaling(new_alpha, r, new_rslora)
        want = lr * s / s_new
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        near = lambda x: math.isclose(got, x, rel_tol=1e-9)   # noqa: E731
        hints = [(near(lr), f"you returned lr unchanged, but the scaling goes from {s:.4g} to {s_new:.4g}: "
                            "the learning rate must make up the difference"),
                 (near(lr * s_new / s), "the ratio is upside down (lr x new_scaling / scaling): a larger scaling "
                                        "makes larger steps, so it needs a SMALLER learning rate"),
                 (any(near(x) for x in (s, s_new, s / s_new, s_new / s)),
                  "that is a scaling (or a ratio of scalings), not a learning rate: multiply lr by it"),
                 (near(lr * alpha / new_alpha), "you kept lr x alpha constant (one rule for both settings), which "
                                                "holds when both scale alike; here one is rsLoRA, whose scaling is "
                                                "alpha / sqrt(r), the other plain LoRA's alpha / r"),
                 (near(lr * lora_scaling(alpha, r, new_rslora) / lora_scaling(new_alpha, r, rslora)),
                  "you swapped the two rules: `rslora` is the first setting's, `new_rslora` the new one's")]
        hint = next((h for cond, h in hints if cond), "keep scaling x lr the same: lr x scaling / new_scaling")
        raise AssertionError(f"{where}: you gave lr={got:.6g}, expected {want:.6g} = {lr:g} x {s:.4g} / {s_new:.4g}: "
                             f"{hint}")
    worst = [0.0] * len(STEP_LIVE_TOL)
    for r, alpha, lr, new_alpha, rslora, new_rslora in STEP_LIVE_CASES:
        done, got = _attempt(fn, r, alpha, lr, new_alpha, rslora, new_rslora)
        if not done:
            return _todo("the learning rate that matches a new alpha")
        got = float(got)
        gaps, sizes = _live_gaps(r, alpha, lr, new_alpha, rslora, new_rslora, got)
        for step, (gap, size, tol) in enumerate(zip(gaps, sizes, STEP_LIVE_TOL), start=1):
            if gap > tol:
                s, s_new = lora_scaling(alpha, r, rslora), lora_scaling(new_alpha, r, new_rslora)
                raise AssertionError(
                    f"live peft runs (tiny Llama, LoRA on q and v, AdamW), {_setting(r, alpha, rslora)} at lr={lr:g} "
                    f"against {_setting(r, new_alpha, new_rslora)} at your lr={got:.6g}: after step {step} of "
                    f"{len(STEP_LIVE_TOL)} the two ΔW = scaling B A differ by {100 * gap:.3g}% of the reference's norm "
                    f"(tolerance {100 * tol:g}%); yours is {size:.3g} x the reference's. Adam moves B by about lr per "
                    f"entry, so ΔW moves by about scaling x lr: {s:.4g} x {lr:g} = {s * lr:.3g} there, "
                    f"{s_new:.4g} x {got:.3g} = {s_new * got:.3g} in yours")
            worst[step - 1] = max(worst[step - 1], gap)
    return _ok(f"lr x scaling / new_scaling on {len(STEP_RULE_CASES)} hidden cases (to 1e-9); in live peft runs "
               f"({len(STEP_LIVE_CASES)} cases, 3 AdamW steps) your lr's ΔW is within {worst[0]:.1%} of the reference's "
               f"after step 1 and {worst[-1]:.0%} after step 3: A moves by lr too, so close, not equal")
