"""The exercise checkers accept right answers, reject wrong ones, and report unattempted ones."""
import math

import pytest
import torch

from labkit import exercises as ex
from labkit.models import tiny_llama


def todo(*args):
    raise NotImplementedError


def test_full_finetune_bytes(capsys):
    ex.check_full_finetune_bytes(lambda n: 16 * n)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="AdamW"):
        ex.check_full_finetune_bytes(lambda n: 12 * n)
    ex.check_full_finetune_bytes(todo)
    assert "not attempted" in capsys.readouterr().out


def test_low_rank_and_savings():
    ex.check_low_rank_approx(lambda W, r: (lambda U, S, Vh: U[:, :r] * S[:r] @ Vh[:r])(*torch.linalg.svd(W, full_matrices=False)))
    with pytest.raises(AssertionError):
        ex.check_low_rank_approx(lambda W, r: W)                       # not rank r
    ex.check_lora_savings(lambda d, k, r: r * (d + k) / (d * k))
    with pytest.raises(AssertionError):
        ex.check_lora_savings(lambda d, k, r: r * d / (d * k))


def test_lora_forward_and_rslora():
    ex.check_lora_forward(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha / r * (x @ A.T @ B.T))
    with pytest.raises(AssertionError, match="alpha / r"):
        ex.check_lora_forward(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + (x @ A.T @ B.T))
    ex.check_rslora_scaling(lambda a, r: a / math.sqrt(r))
    with pytest.raises(AssertionError):
        ex.check_rslora_scaling(lambda a, r: a / r)


def test_trainable_count():
    cfg = tiny_llama().config                                        # hidden 64, kv 32, 2 layers
    ex.check_trainable_count(lambda c, t, r: 2 * r * ((64 + 64) + (64 + 32)), cfg, ["q_proj", "v_proj"], r=4)
    with pytest.raises(AssertionError, match="you counted"):
        ex.check_trainable_count(lambda c, t, r: 2 * r * (64 + 64) * 2, cfg, ["q_proj", "v_proj"], r=4)


def test_chapter6_checkers(capsys):
    import labkit as lk
    tok = lk.load_tokenizer()
    rows = lk.data.load_task("people")["train"][:20]
    ex.check_answer_fraction(lambda b: (b["labels"] != -100).float().mean().item(), tok, rows)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="IGNORE"):               # forgot the padding positions
        ex.check_answer_fraction(lambda b: (b["labels"] != -100).sum().item() / b["attention_mask"].sum().item(),
                                 tok, rows)
    ex.check_answer_fraction(todo, tok, rows)
    assert "not attempted" in capsys.readouterr().out

    def mib(n_layers, d, d_kv, r, targets):
        out = {"q_proj": d, "k_proj": d_kv, "v_proj": d_kv, "o_proj": d}
        return 4 * n_layers * sum(r * (d + out[t]) for t in targets) / 2**20
    ex.check_adapter_mib(mib)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="A \\(r x in\\) and B"):
        ex.check_adapter_mib(lambda n, d, d_kv, r, targets: 4 * n * len(targets) * r * 2 * d / 2**20)


@pytest.mark.slow
def test_largest_batch_checker(capsys):
    import labkit as lk

    def largest(method, limit, seq):
        model = lk.finetune.prepare(lk.load_model()[0], method)
        return max((b for b in range(1, 257) if lk.memory.predict_peak(model, b, seq, method)["total"] <= limit),
                   default=0)
    ex.check_largest_batch(largest)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="predict_peak"):
        ex.check_largest_batch(lambda method, limit, seq: largest(method, limit, seq) + 1)


def test_chapter8_checkers(capsys):
    ex.check_bottleneck_params(lambda d, m, n, k: n * k * (2 * d * m + m + d))
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="biases"):
        ex.check_bottleneck_params(lambda d, m, n, k: n * k * 2 * d * m)
    ex.check_bottleneck_params(todo)
    assert "not attempted" in capsys.readouterr().out

    def ia3(c):
        return c.num_hidden_layers * (2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
                                      + c.intermediate_size)
    ex.check_ia3_params(ia3)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="grouped-query"):
        ex.check_ia3_params(lambda c: c.num_hidden_layers * (2 * c.hidden_size + c.intermediate_size))

    def prompt_params(c, n, kind, hidden=64):
        kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        out = c.num_hidden_layers * 2 * kv
        return {"prompt_tuning": n * c.hidden_size, "ptuning_v2": n * out,
                "prefix": n * kv + kv * hidden + hidden + hidden * out + out}[kind]
    ex.check_prompt_params(prompt_params)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="ptuning_v2"):               # keys and values at full width
        ex.check_prompt_params(lambda c, n, k: prompt_params(c, n, k) if k != "ptuning_v2"
                               else n * c.num_hidden_layers * 2 * c.hidden_size)
    ex.check_prompt_params(todo)
    assert "not attempted" in capsys.readouterr().out


def test_chapter7_checkers(capsys):
    import torch

    from labkit import lab
    from labkit.memory import config_counts

    def lora_params(c, targets, r):
        return c.num_hidden_layers * lab.lora_params_per_layer(c, targets, r)
    ex.check_lora_params(lora_params)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="num_key_value_heads"):          # k and v taken as hidden-wide
        ex.check_lora_params(lambda c, t, r: c.num_hidden_layers * len(t) * r * 2 * c.hidden_size)
    ex.check_lora_params(todo)
    assert "not attempted" in capsys.readouterr().out

    # The checker's reference is lab.subspace_similarity itself: give it an answer computed another
    # way, so that a wrong reference fails here (the right-singular vectors as eigenvectors of A^T A,
    # largest first, and the paper's phi(i, j) entry by entry).
    def by_definition(A1, A2):
        U1, U2 = (torch.linalg.eigh(A.double().T @ A.double()).eigenvectors.flip(1)[:, :len(A)] for A in (A1, A2))
        return torch.tensor([[(U1[:, :i].T @ U2[:, :j]).pow(2).sum().item() / min(i, j)
                              for j in range(1, len(A2) + 1)] for i in range(1, len(A1) + 1)])
    ex.check_subspace_similarity(by_definition)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="min"):                            # forgot to divide by min(i, j)
        ex.check_subspace_similarity(lambda a, b: by_definition(a, b)
                                     * torch.minimum(torch.arange(1, len(a) + 1)[:, None], torch.arange(1, len(b) + 1)))

    runs = {lab.run_key(r, a, lr): {"r": r, "alpha": a, "lr": lr, "rslora": False, "targets": "q,v"}
            for r, a, lr in [(8, 16, 2e-3), (8, 32, 1e-3), (8, 8, 4e-3), (8, 8, 1e-3), (8, 16, 5e-4), (4, 8, 1e-3),
                                 (4, 4, 1e-3)]}
    results = {"runs": runs}

    def same(results, key):
        x = results["runs"][key]
        s = lab.scaling(x["r"], x["alpha"]) * x["r"] * x["lr"]
        return [k for k, y in results["runs"].items()
                if k != key and abs(lab.scaling(y["r"], y["alpha"]) * y["r"] * y["lr"] - s) < 1e-12]
    ex.check_same_step_scale(same, results)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="alpha / r"):
        ex.check_same_step_scale(lambda res, key: [k for k in res["runs"] if k != key and res["runs"][k]["lr"] == res["runs"][key]["lr"]], results)

    ex.check_rank_under_budget(lambda c, t, limit: limit // (16 * config_counts(c, "lora", t, 1)["trainable"]))
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="16 bytes"):                       # 4 bytes: only the weights
        ex.check_rank_under_budget(lambda c, t, limit: limit // (4 * config_counts(c, "lora", t, 1)["trainable"]))


def test_chapter9_checkers(capsys):
    from labkit import data
    from labkit.memory import per_device_bill
    from labkit.serving import TASKS
    # a router that reads the right answer off the test files (the checker's own data) must pass;
    # one that always answers "dates" must fail, and so must a name that is not a task
    answer = {r["prompt"].split("\n", 1)[1]: t for t in TASKS for r in data.load_task(t, splits=("test",))["test"]}
    ex.check_router(answer.get)
    assert "180/180" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="below 95%"):
        ex.check_router(lambda text: "dates")
    with pytest.raises(AssertionError, match="return one of"):
        ex.check_router(lambda text: "legal")
    ex.check_router(todo)
    assert "not attempted" in capsys.readouterr().out

    scores = {"base": {"people": 0.0, "dates": 0.1, "units": 0.0},
              "people": {"people": 0.9, "dates": 0.2, "units": 0.0},
              "dates": {"people": 0.0, "dates": 0.95, "units": 0.3},
              "units": {"people": 0.1, "dates": 0.0, "units": 0.8},
              "union": {"people": 0.85, "dates": 0.9, "units": 0.7}}
    right = {"people": ("union", 0.85), "dates": ("union", 0.9), "units": ("union", 0.7)}
    ex.check_best_other(lambda s: right, scores)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="units"):                  # the own adapter counted as "other"
        ex.check_best_other(lambda s: {**right, "units": ("units", 0.8)}, scores)
    with pytest.raises(AssertionError, match="one entry per task"):
        ex.check_best_other(lambda s: {"people": right["people"]}, scores)

    ex.check_fsdp_bytes(lambda n, t, g, b: (n * b + 14 * t) / g)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="divided by the GPUs"):     # DDP: nothing sharded
        ex.check_fsdp_bytes(lambda n, t, g, b: sum(per_device_bill(n, t, g, 0, param_bytes=b).values()))
    ex.check_fsdp_bytes(todo)
    assert "not attempted" in capsys.readouterr().out


def test_low_rank_lab_refuses_typical_mistakes_and_says_which():
    def svd(W):
        return torch.linalg.svd(W, full_matrices=False)

    def by_outer_products(W, r):                                     # right, written as a sum of rank-1 pieces
        U, S, Vh = svd(W)
        return sum(S[i] * torch.outer(U[:, i], Vh[i]) for i in range(r))

    ex.check_low_rank_approx(by_outer_products)
    wrong = {"SMALLEST": lambda W, r: (lambda U, S, Vh: U[:, -r:] * S[-r:] @ Vh[-r:])(*svd(W)),
             "singular values are missing": lambda W, r: (lambda U, S, Vh: U[:, :r] @ Vh[:r])(*svd(W)),
             "more than r": lambda W, r: W,
             "not float32": lambda W, r: (lambda U, S, Vh: (U[:, :r] * S[:r] @ Vh[:r]).double())(*svd(W.float())),
             "keep W's dtype": lambda W, r: (lambda U, S, Vh: U[:, :r] * S[:r] @ Vh[:r])(*svd(W.float()))}
    for message, fn in wrong.items():
        with pytest.raises(AssertionError, match=message):
            ex.check_low_rank_approx(fn)


def test_eckart_young_lab_refuses_typical_mistakes_and_says_which(capsys):
    ex.check_eckart_young_error(lambda S, r: math.sqrt(sum(s * s for s in S.tolist()[r:])))   # a loop, not torch
    assert "✓" in capsys.readouterr().out
    ex.check_eckart_young_error(todo)
    assert "not attempted" in capsys.readouterr().out
    wrong = {"take the square root": lambda S, r: S[r:].pow(2).sum(),
             "must be squared": lambda S, r: S[r:].sum(),
             "what the approximation keeps": lambda S, r: S[:r].pow(2).sum().sqrt(),
             "off by one": lambda S, r: S[r + 1:].pow(2).sum().sqrt()}
    for message, fn in wrong.items():
        with pytest.raises(AssertionError, match=message):
            ex.check_eckart_young_error(fn)


def _not_yet(*args):
    raise NotImplementedError


def test_graded_gives_marks_only_when_every_part_passed():
    """ex.graded (the grade cells of scripts/build_assignments.py): a checker that passes
    gives the marks; one that is not attempted, a part of one left undone, or no checker at all, raise."""
    with ex.graded():
        ex.check_rslora_scaling(lambda alpha, r: alpha / r ** 0.5)
    with pytest.raises(AssertionError, match="not attempted"):
        with ex.graded():
            ex.check_rslora_scaling(lambda alpha, r: _not_yet())
    with pytest.raises(AssertionError, match="not attempted"):      # one part done, one not: no marks
        with ex.graded():
            ex._common._ok("first part")
            ex._common._todo("second part")
    with pytest.raises(AssertionError, match="no checker ran"):
        with ex.graded():
            pass
    assert ex._common._VERDICTS == []                                         # nothing is left behind for the next cell
    ex.check_rslora_scaling(lambda alpha, r: alpha / r ** 0.5)                # outside graded(): nothing recorded
    assert ex._common._VERDICTS == [] and ex._common._GRADING == []
