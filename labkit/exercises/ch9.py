"""Chapter 9 (many adapters): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ._common import _attempt, _ok, _todo, _first_wrong


def check_router(fn, need=0.95):
    """fn(text) -> "people", "dates" or "units", for the text part of a prompt (its lines after the
    first, the instruction). Scored on the three tasks' test sets (never seen in training)."""
    from ..data import load_task
    from ..serving import TASKS
    right, total, wrong = 0, 0, []
    for task in TASKS:
        for row in load_task(task, splits=("test",))["test"]:
            text = row["prompt"].split("\n", 1)[1]
            done, got = _attempt(fn, text)
            if not done:
                return _todo("routing a prompt to an adapter")
            assert got in TASKS, f"route({text!r}) gave {got!r}: return one of {TASKS}"
            right += got == task
            total += 1
            if got != task and len(wrong) < 3:
                wrong.append(f"{text!r} -> {got} (it is {task})")
    assert right / total >= need, (f"{right}/{total} routed right ({right / total:.0%}), below {need:.0%}; for "
                                   f"example: {'; '.join(wrong)}. Look at which words only one task's training "
                                   "texts use (month names, units, ages and jobs)")
    return _ok(f"{right}/{total} test prompts routed to their task's adapter ({right / total:.0%})")


def check_best_other(fn, scores):
    """fn(scores) -> {task: (adapter, score)}: the best adapter on each task other than the task's own and the base."""
    from ..serving import TASKS
    done, got = _attempt(fn, scores)
    if not done:
        return _todo("the best other adapter per task")
    assert set(got) == set(TASKS), f"give one entry per task {TASKS}, got keys {sorted(got)}"
    for task in TASKS:
        others = {n: s[task] for n, s in scores.items() if n not in (task, "base")}
        best = max(others.values())
        name, score = got[task]
        assert name in others, f"{task}: {name!r} is not an adapter other than {task!r} and the base"
        assert math.isclose(score, others[name]) and math.isclose(score, best), (
            f"{task}: you gave {name} at {score:.0%}; the best other adapter scores {best:.0%} "
            f"({', '.join(n for n, s in others.items() if s == best)})")
    return _ok("the best stand-in for each task's own adapter")


def check_fsdp_bytes(fn):
    """fn(n_params, n_trainable, gpus, param_bytes) -> bytes on each GPU under FSDP (ZeRO-3),
    mixed-precision AdamW: weights, 2-byte gradients and 12 bytes of states, all sharded."""
    from ..memory import per_device_bill
    cases = ((6_738_415_616, 6_738_415_616, 8, 2), (68_976_648_192, 16_384_000, 2, 0.5),
             (135_000_000, 460_800, 1, 2), (1000, 10, 4, 2))
    for n, trainable, gpus, param_bytes in cases:
        done, got = _attempt(fn, n, trainable, gpus, param_bytes)
        if not done:
            return _todo("the FSDP bill per GPU")
        want = sum(per_device_bill(n, trainable, gpus, 3, param_bytes=param_bytes).values())
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"{n:,} parameters ({trainable:,} trained) on {gpus} GPUs at {param_bytes} bytes a weight: you gave "
            f"{got:,.0f} bytes, expected {want:,.0f}. Under FSDP everything is divided by the GPUs: weights, "
            "2-byte gradients and 12 bytes of AdamW states per trained parameter")
    return _ok("FSDP: (weights + 2 + 12 bytes per trained parameter) / GPUs")


def _peft_adapters_on_one_layer(W0, adapters):
    """peft's LoRA on one nn.Linear holding W0, one named adapter per (A, B, alpha) in `adapters`
    (each at its own rank): the reference for check_mixed_lora."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=False)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(W0)
    model = None
    for k, (A, B, alpha) in enumerate(adapters):
        config = LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"])
        if model is None:
            model = get_peft_model(holder, config, adapter_name=str(k))
        else:
            model.add_adapter(str(k), config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A[str(k)].weight.copy_(A)
            layer.lora_B[str(k)].weight.copy_(B)
    return model.eval()


def check_mixed_lora(fn):
    """fn(x, W0, A, B, scaling, index) -> h, one forward pass of a batch whose rows each use their
    own LoRA adapter:  h[b] = x[b] W0^T + scaling[k] x[b] A[k]^T B[k]^T  with k = index[b], and
    h[b] = x[b] W0^T where index[b] = -1 (the base alone).
    x (batch, tokens, in); W0 (out, in); A (n_adapters, r_max, in); B (n_adapters, out, r_max),
    adapters of smaller rank zero-padded to r_max; scaling (n_adapters,); index (batch,) long.

    Checked against each row run alone through peft, with that row's adapter set (or peft's
    adapters disabled for -1), within 1e-5 + 1e-5 x |value| (fp32)."""
    g = torch.Generator().manual_seed(9)
    cases = (((5, 3), 16, 12, (4, 8, 2), (8, 16, 2), [0, 2, -1, 1, 0]),
             ((4, 1), 24, 24, (2, 2), (4, 2), [1, 1, 0, -1]),
             ((3, 2), 8, 10, (3,), (6,), [-1, 0, -1]))
    for (batch, tokens), d_in, d_out, ranks, alphas, index in cases:
        W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        adapters = [(torch.randn(r, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, r, generator=g) * 0.5, a)
                    for r, a in zip(ranks, alphas)]
        r_max = max(ranks)
        A = torch.zeros(len(ranks), r_max, d_in)
        B = torch.zeros(len(ranks), d_out, r_max)
        for k, (a, b, _) in enumerate(adapters):
            A[k, :a.shape[0]], B[k, :, :b.shape[1]] = a, b
        scaling = torch.tensor([alpha / r for r, alpha in zip(ranks, alphas)])
        x = torch.randn(batch, tokens, d_in, generator=g)
        idx = torch.tensor(index)
        done, got = _attempt(fn, x, W0.clone(), A.clone(), B.clone(), scaling.clone(), idx.clone())
        if not done:
            return _todo("the mixed-adapter forward pass")
        assert isinstance(got, torch.Tensor) and tuple(got.shape) == (batch, tokens, d_out), (
            f"for x of shape {tuple(x.shape)}, W0 {tuple(W0.shape)} (out x in), A {tuple(A.shape)} and "
            f"B {tuple(B.shape)} you returned {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}"
            f"; expected {(batch, tokens, d_out)}: one row of out values per token")
        peft_model = _peft_adapters_on_one_layer(W0, adapters)
        with torch.no_grad():
            for b, k in enumerate(index):
                if k < 0:
                    with peft_model.disable_adapter():
                        want = peft_model(x[b:b + 1])[0]
                else:
                    peft_model.set_adapter(str(k))
                    want = peft_model(x[b:b + 1])[0]
                bad = _first_wrong(got[b], want, 1e-5, 1e-5)
                if bad is None:
                    continue
                base_only = (got[b] - x[b] @ W0.T).abs().max() <= 1e-5
                other = [j for j in range(len(ranks)) if j != k and (
                    got[b] - x[b] @ W0.T - scaling[j] * x[b] @ A[j].T @ B[j].T).abs().max() <= 1e-4]
                if k < 0:
                    hint = (f"Index -1 means the base alone, but your row used adapter {other[0]}"
                            + (" (A[-1] is the last adapter in Python: mask the rows with index -1)"
                               if other == [len(ranks) - 1] else "") if other else
                            "Index -1 means the base alone: x W0^T and nothing added")
                elif base_only:
                    hint = f"Your row is the base alone, without adapter {k}'s update"
                elif other:
                    hint = (f"Your row used adapter {other[0]}'s A and B, not its own ({k}): each row gathers "
                            "A[index[b]] and B[index[b]]")
                else:
                    hint = (f"Each row adds scaling[k] x A[k]^T B[k]^T, with its own adapter's scaling "
                            f"({scaling[k].item():g} for adapter {k}), to x W0^T")
                raise AssertionError(f"row {b} (adapter {k}, of a batch using {index}) differs from that row run "
                                     f"alone through peft: {bad}. {hint}")
    return _ok("each row of your mixed batch equals that row run alone through peft with its adapter "
               "(to 1e-5), the base-alone rows too")
