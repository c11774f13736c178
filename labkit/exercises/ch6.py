"""Chapter 6 (fine-tuning for real): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ..lora import count_parameters, inject_lora
from ._common import _attempt, _ok, _todo, _first_diff


def check_answer_fraction(fn, tok, rows):
    """fn(batch) -> fraction of label positions that are not IGNORE."""
    from ..text import IGNORE, batches
    for size, seed in ((1, 0), (4, 1), (8, 2)):
        batch = next(batches(tok, rows, size, seed=seed))
        done, got = _attempt(fn, batch)
        if not done:
            return _todo("answer fraction")
        want = (batch["labels"] != IGNORE).sum().item() / batch["labels"].numel()
        assert got is not None and abs(float(got) - want) < 1e-6, (
            f"for a batch of {size} you gave {got}; expected {want:.4f}: count the labels that are not "
            f"IGNORE ({IGNORE}), over all positions, padding included")
    return _ok("answer fraction: the loss sees only the answer tokens (prompt and padding are IGNORE)")


def check_adapter_mib(fn):
    """fn(n_layers, d_model, d_kv, r, targets) -> MiB of an fp32 LoRA adapter on attention."""
    from ..models import tiny_llama
    cases = [(30, 576, 192, 8, ("q_proj", "k_proj", "v_proj", "o_proj")), (30, 576, 192, 16, ("q_proj", "v_proj")),
             (2, 64, 32, 4, ("k_proj", "o_proj"))]
    for n_layers, d, d_kv, r, targets in cases:
        done, got = _attempt(fn, n_layers, d, d_kv, r, list(targets))
        if not done:
            return _todo("adapter size")
        if n_layers == 2:                                   # count a real model, not a formula
            m = inject_lora(tiny_llama(hidden_size=d, num_attention_heads=4, num_key_value_heads=2), list(targets), r=r,
                            alpha=2 * r)
            want = 4 * count_parameters(m)[0] / 2**20
        else:
            shapes = {"q_proj": (d, d), "k_proj": (d, d_kv), "v_proj": (d, d_kv), "o_proj": (d, d)}
            want = 4 * n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) / 2**20
        assert got is not None and abs(got - want) < 1e-6 * max(1, want), (
            f"for {n_layers} layers, r={r}, {list(targets)} you gave {got} MiB; expected {want:.4f}: each adapted "
            "layer has A (r x in) and B (out x r), 4 bytes a number, 2**20 bytes a MiB")
    return _ok("adapter size: r x (in + out) numbers per adapted layer, 4 bytes each")


def check_largest_batch(fn):
    """fn(method, limit_bytes, seq) -> the largest batch whose predicted peak fits under the limit."""
    from ..finetune import prepare
    from ..memory import predict_peak
    from ..models import load_model
    model = None
    for method, limit, seq in (("lora", 2 * 2**30, 96), ("full", 3 * 2**30, 96), ("lora", 1.5 * 2**30, 64)):
        done, got = _attempt(fn, method, limit, seq)
        if not done:
            return _todo("largest batch")
        model = prepare(load_model()[0], method)
        fits = [b for b in range(1, 257) if predict_peak(model, b, seq, method, foreach=False)["total"] <= limit]
        want = max(fits) if fits else 0
        assert got == want, (f"{method}, under {limit / 2**30:.1f} GiB at length {seq}: you gave {got}, expected "
                             f"{want}. Use lk.memory.predict_peak(model, batch, {seq}, '{method}', foreach=False) (a CPU's "
                             f"AdamW) on a model prepared with lk.finetune.prepare(model, '{method}')")
    return _ok("largest batch: activations grow with batch x length; full fine-tuning's fixed cost leaves less room")


# Chapter 6 · Build it: prompt-masked labels and one training step ---------------------------

_PAD = 2                                                   # the pad id of the checkers' batches


def _label_batch(lengths, g, pad_id=_PAD, vocab=256):
    """A right-padded batch as lk.text.collate makes it, from random token ids: rows of `lengths`
    (prompt, answer) tokens, each answer ending in the pad id (SmolLM2 pads with its end-of-turn
    token, which ends every answer). Returns (batch with labels, prompt_lengths)."""
    from ..text import IGNORE, collate
    examples = []
    for p, a in lengths:
        ids = torch.randint(3, vocab, (p + a,), generator=g).tolist()
        ids[-1] = pad_id
        examples.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return collate(examples, pad_id), torch.tensor([p for p, _ in lengths])


_LABEL_CASES = ([(5, 4)], [(7, 3), (4, 5), (6, 6), (3, 1)], [(9, 2), (2, 9), (8, 3)])


def check_make_labels(fn):
    """fn(input_ids, prompt_lengths, attention_mask) -> labels (B, T), torch.long: each token's own id
    where it is an answer token, IGNORE (-100) over the first prompt_lengths[i] tokens of row i and
    over the padding (attention_mask 0, on the right). Not shifted: transformers shifts inside the loss.
    Compared exactly with the labels lk.text.encode and collate make."""
    from ..text import IGNORE
    g = torch.Generator().manual_seed(0)
    for lengths in _LABEL_CASES:
        batch, prompt_lengths = _label_batch(lengths, g)
        ids, mask, want = batch["input_ids"], batch["attention_mask"], batch["labels"]
        ids_before = ids.clone()
        done, got = _attempt(fn, ids, prompt_lengths.clone(), mask.clone())
        if not done:
            return _todo("prompt-masked labels")
        size = f"batch of {len(lengths)} x {ids.shape[1]}"
        assert torch.equal(ids, ids_before), (f"{size}: your function changed input_ids in place (labels = "
                                              "input_ids shares its memory): start from input_ids.clone()")
        assert torch.is_tensor(got), f"{size}: return a tensor, not a {type(got).__name__}"
        assert got.shape == want.shape, f"{size}: labels of shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert got.dtype == torch.long, f"{size}: labels of dtype {got.dtype}; cross-entropy wants torch.long (int64)"
        if torch.equal(got, want):
            continue
        if torch.equal(got[:, :-1], want[:, 1:]) or torch.equal(got[:, 1:], want[:, :-1]):
            raise AssertionError(f"{size}: your labels are shifted by one position. transformers shifts them "
                                 "itself inside the loss (logits at t predict labels at t + 1); give labels "
                                 "aligned with input_ids, or every token is shifted twice")
        i, j = (int(k) for k in (got != want).nonzero()[0])
        p, w, v = int(prompt_lengths[i]), int(want[i, j]), int(got[i, j])
        where = f"{size}, row {i}, column {j}: got {v}, want {w}"
        if j < p:
            raise AssertionError(f"{where}. That is a prompt token (row {i}'s prompt is its first {p} tokens): it "
                                 f"must be IGNORE ({IGNORE}), or the loss trains the model to write the question")
        if mask[i, j] == 0:
            raise AssertionError(f"{where}. That is padding (attention_mask 0): it must be IGNORE ({IGNORE}) too")
        if v == IGNORE and ids[i, j] == _PAD:
            raise AssertionError(f"{where}. That is the answer's end-of-turn token, whose id is also the pad "
                                 "id: find the padding from attention_mask, not from the token id")
        if v == IGNORE:
            raise AssertionError(f"{where}. That is an answer token (the answer starts at column {p}): its label "
                                 "is the token itself; only positions 0 .. prompt_length - 1 are the prompt")
        raise AssertionError(f"{where}. An answer token's label is the token itself, input_ids[{i}, {j}]")
    return _ok("labels: the answer's own token ids, IGNORE over the prompt and the padding, no shift")


_STEP_LR = 0.5


def _step_batches(g):
    """Two right-padded batches of unequal rows, so that a mean per row differs from a mean per token."""
    return [_label_batch(lengths, g)[0] for lengths in ([(6, 9), (8, 2), (3, 5)], [(4, 3), (5, 11)])]


def _reference_step(model, batch, opt, zero=True):
    """One step as chapter 6's loop takes it: the model's own loss (transformers shifts the labels
    and averages over the tokens whose label is not IGNORE), backward, step, gradients cleared."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    if zero:
        opt.zero_grad(set_to_none=True)
    return loss.item()


def _other_losses(model, batch):
    """The losses of typical mistakes on `batch`, for the checker's messages."""
    from ..text import IGNORE
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]

    def ce(logits, labels, per_row=False):
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                   reduction="none")
        keep = (labels != IGNORE).float()
        if per_row:
            return ((losses * keep).sum(1) / keep.sum(1)).mean().item()
        return ((losses * keep).sum() / keep.sum()).item()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
    return {
        "per_row": (ce(logits[:, :-1], labels[:, 1:], per_row=True),
                    "a mean per row, then a mean of the rows: transformers averages over all the batch's answer "
                    "tokens, each token weighing the same (a row with few answer tokens does not count more)"),
        "double_shift": (ce(logits[:, :-1], shifted[:, 1:]),
                         "the labels shifted by hand: the model shifts them again inside its loss, so each "
                         "position is scored on the token two places ahead. Pass batch['labels'] as it is"),
        "no_shift": (ce(logits, labels),
                     "logits at t scored against the token at t, not t + 1: shift logits[:, :-1] against "
                     "labels[:, 1:], or let the model do it (model(**batch).loss)"),
        "everything": (ce(logits[:, :-1], ids[:, 1:]),
                       "every position counted, prompt and padding: the labels must be batch['labels'] (IGNORE "
                       "over the prompt and the padding), not the input ids"),
        "prompt": (ce(logits[:, :-1], torch.where(mask == 1, ids, IGNORE)[:, 1:]),
                   "the prompt tokens counted: the labels must be batch['labels'] (IGNORE over the prompt), "
                   "not the input ids"),
    }


def _compare_params(model, ref, what):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad and not torch.allclose(p, q, rtol=1e-5, atol=1e-6):
            return f"{what}: {name} differs from the reference step's at {_first_diff(p.detach(), q.detach())}"
    return None


def check_train_step(fn):
    """fn(model, batch, optimizer) -> the loss of one training step on `batch` (a float or a 0-d tensor):
    the model's loss on the batch, backward, optimizer step, gradients cleared for the next step.

    Two steps on two tiny models (a random Llama with LoRA on q, v, and one trained in full), each with
    two right-padded prompt-masked batches and plain SGD (lr 0.5; with momentum for the second):
    each loss must equal transformers' own model(**batch).loss within 1e-5 (relative), and the
    trainable parameters after each step a reference step's within 1e-5 relative plus 1e-6 absolute."""
    import copy

    from ..lora import inject_lora, lora_layers
    from ..models import tiny_llama
    with torch.random.fork_rng(devices=[]):                 # the notebook's random state is left as it was
        lora = inject_lora(tiny_llama(seed=3, initializer_range=0.2), ["q_proj", "v_proj"], r=4, alpha=8)
        for _, m in lora_layers(lora):                       # B = 0 would leave A without a gradient
            torch.nn.init.normal_(m.lora_B, std=0.2)
        # weights 10x larger than transformers' default (initializer_range 0.02) make the tokens' losses
        # differ, so that the typical mistakes give losses at least 1% away from the right one
        cases = [("LoRA on q, v", lora, dict(lr=_STEP_LR)),
                 ("full fine-tuning", tiny_llama(seed=4, initializer_range=0.2), dict(lr=_STEP_LR, momentum=0.9))]
        for what, model, sgd in cases:
            model.train()
            ref, no_zero = copy.deepcopy(model), copy.deepcopy(model)
            trained = lambda m: [p for p in m.parameters() if p.requires_grad]     # noqa: E731
            opts = [torch.optim.SGD(trained(m), **sgd) for m in (model, ref, no_zero)]
            for step, batch in enumerate(_step_batches(torch.Generator().manual_seed(5)), 1):
                at = f"[{what}] step {step}"
                others = _other_losses(ref, batch)
                want = _reference_step(ref, batch, opts[1])
                _reference_step(no_zero, batch, opts[2], zero=False)
                before = [p.detach().clone() for p in trained(model)]
                done, got = _attempt(fn, model, {k: v.clone() for k, v in batch.items()}, opts[0])
                if not done:
                    return _todo("one training step")
                assert got is not None, f"{at}: return the loss (loss.item(), or the tensor)"
                assert not torch.is_tensor(got) or got.numel() == 1, (
                    f"{at}: you returned a tensor of shape {tuple(got.shape)}; return one number, the mean loss "
                    "over the batch's answer tokens")
                got = float(got.detach() if torch.is_tensor(got) else got)
                if not math.isclose(got, want, rel_tol=1e-5):
                    why = [hint for value, hint in others.values() if math.isclose(got, value, rel_tol=1e-5)]
                    raise AssertionError(f"{at}: your loss {got:.6f}, transformers' model(**batch).loss "
                                         f"{want:.6f}" + (f": it is {why[0]}" if why else ""))
                wrong = _compare_params(model, ref, at)
                if wrong is None:
                    continue
                if all(torch.equal(p, q) for p, q in zip(trained(model), before)):
                    raise AssertionError(f"{at}: no trainable parameter changed. Call loss.backward(), then "
                                         "optimizer.step(); clear the gradients before the backward or after the "
                                         "step, not between the two")
                if _compare_params(model, no_zero, at) is None:
                    raise AssertionError(f"{at}: the parameters moved by the sum of this step's gradient and the "
                                         "last one's: the gradients were not cleared. Call optimizer.zero_grad() "
                                         "once every step (backward adds to .grad)")
                raise AssertionError(wrong + ". Is it loss.backward(), then optimizer.step(), on the model's loss?")
    return _ok("one step: the model's own loss on the answer tokens, backward, step, gradients cleared; "
               "losses and parameters equal a reference step's")
