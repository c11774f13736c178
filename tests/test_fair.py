"""Chapter 8's fair comparison: validation on the task loss alone (AdaLoRA's regulariser kept
out), the bootstrap interval and per-method summary of lk.stats, and the selection and resume
logic of scripts/run_peft_fair.py run with a fake trainer (no real training)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import labkit as lk
from labkit import finetune, stats, text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return lk.load_tokenizer()


@pytest.fixture(scope="module")
def val_rows():
    return lk.data.load_task("people", splits=("val",))["val"][:4]


def tiny(tok, seed=0):
    return lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256, seed=seed)


def returned_loss(model, tok, rows):
    """What answer_loss computed before: the loss the model returns (all rows in one batch, so its
    mean over answer tokens is answer_loss's)."""
    batch = text.collate([text.encode(tok, r["prompt"], r["response"]) for r in rows], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def adalora_regulariser(model):
    """peft's orthogonality term, recomputed: mean over lora_A / lora_B of ||P P^T - I||_F, weighted."""
    terms = []
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0])).item())
    return model.peft_config["default"].orth_reg_weight * sum(terms) / len(terms)


def test_adalora_validation_loss_holds_no_regulariser(tok, val_rows):
    """peft adds AdaLoRA's regulariser to the loss it returns, in eval mode too. The validation
    loss must be the task's cross-entropy: the returned loss minus exactly that regulariser (the
    old answer_loss, which read the returned loss, gave the sum and fails here)."""
    torch.manual_seed(0)
    model = finetune.prepare(tiny(tok), "adalora", r=4, steps=4)
    reg = adalora_regulariser(model)
    assert reg > 1e-3                                   # B starts at zero: ||B^T B - I|| = sqrt(r) per B
    with_reg = returned_loss(model, tok, val_rows)
    ours = text.answer_loss(model, tok, val_rows, batch_size=len(val_rows))
    assert ours == pytest.approx(with_reg - reg, abs=1e-5)
    # the same through run()'s validation (what the learning-rate search selects on)
    people = lk.data.load_task("people", splits=("train",))
    row = finetune.run("adalora", {"train": people["train"][:8], "val": val_rows}, model=tiny(tok), tok=tok, steps=4,
                       batch_size=2, progress=False, scoring="val", measure_peak=False)
    m = row["model"]
    assert row["val_loss"] == pytest.approx(returned_loss(m, tok, val_rows) - adalora_regulariser(m), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "prefix"])
def test_answer_loss_is_unchanged_for_methods_without_a_regulariser(tok, val_rows, method):
    """For the other methods the logits' cross-entropy is the loss the model returns (prompt tuning:
    its logits are longer than the input by its virtual tokens, which answer_loss skips)."""
    torch.manual_seed(0)
    model = finetune.prepare(tiny(tok), method, tok=tok)
    for p in model.parameters():                        # move off the start, where LoRA is the base model
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    by_batch = [text.answer_loss(model, tok, val_rows, batch_size=b) for b in (1, len(val_rows))]
    assert by_batch[1] == pytest.approx(returned_loss(model, tok, val_rows), rel=1e-5)
    assert by_batch[0] == pytest.approx(by_batch[1], rel=1e-5)
