"""The "Build it" checkers of chapters 3 and 6 tell right from wrong.

Each checker is fed a correct implementation written differently from labkit's (it must pass and
print ✓), typical wrong ones (each must fail with an AssertionError that says what is wrong), and
the notebook's skeleton (reported as not attempted). The checkers' references are peft (chapter 3)
and transformers' own loss (chapter 6), so a correct answer that labkit did not write must pass.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit as lk
from labkit import exercises as ex

IGNORE = -100


def todo(*args):
    raise NotImplementedError


# Chapter 3: inject(model, targets, r, alpha) --------------------------------------------------

class Adapter(nn.Module):
    """A LoRA wrapper that is not lk.LoRALinear: A and B as bias-free nn.Linear layers, as peft
    stores them, with A initialised as Gaussian noise; h = W0 x + (alpha / r) B (A x)."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.down = nn.Linear(base.in_features, r, bias=False)        # A: weight (r, in)
        self.up = nn.Linear(r, base.out_features, bias=False)         # B: weight (out, r)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def inject_own(model, targets, r, alpha):
    """Collect first, then replace: matching the last name part exactly, through the parent."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[-1] in set(targets)]
    if not found:
        raise ValueError(f"no module named {targets}")
    for p in model.parameters():
        p.requires_grad = False
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Adapter(m, r, alpha))
    # returns None: the model is changed in place


def inject_variant(match=None, freeze=True, freeze_after=False, first_layer_only=False, on_root=False,
                   refuse=True, new_linear=False, wrapper=None):
    """The reference injection with one typical mistake switched on."""
    match = match or (lambda name, targets: name.split(".")[-1] in targets)
    wrapper = wrapper or lk.LoRALinear

    def inject(model, targets, r, alpha):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and match(n, targets)]
        if first_layer_only:
            names = [n for n in names if ".layers.0." in n]
        if not names and refuse:
            raise ValueError("nothing matches")
        if freeze:
            model.requires_grad_(False)
        for n in names:
            base = model.get_submodule(n)
            if new_linear:
                base = nn.Linear(base.in_features, base.out_features, bias=False)
            parent, _, child = n.rpartition(".")
            setattr(model if on_root else model.get_submodule(parent), child, wrapper(base, r, alpha))
        if freeze_after:
            model.requires_grad_(False)
        return model
    return inject


class Unscaled(lk.LoRALinear):
    def forward(self, x):                     # forgot alpha / r
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


class RandomB(lk.LoRALinear):
    def reset_lora_parameters(self, init=None):
        super().reset_lora_parameters("random")


def test_inject_checker_passes_a_correct_injection_unlike_labkits(capsys):
    ex.check_inject(inject_own)
    assert "✓" in capsys.readouterr().out
    ex.check_inject(lambda model, targets, r, alpha: lk.inject_lora(model, targets, r=r, alpha=alpha))
    assert "✓" in capsys.readouterr().out


def test_inject_checker_reports_the_skeleton_as_not_attempted(capsys):
    ex.check_inject(todo)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, match", [
    (dict(freeze=False), r"own weights still train: model\.embed_tokens\.weight"),
    (dict(freeze_after=True), "nothing trains: freeze the model first, then wrap"),
    (dict(first_layer_only=True), r"no LoRA on model\.layers\.1\..*only layer 0 got LoRA"),
    (dict(match=lambda n, t: any(x in n for x in t)),                       # substring: catches qkv_proj
     r"LoRA on model\.layers\.0\.self_attn\.qkv_proj.*'qkv_proj' is not 'v_proj'.*not a substring"),
    (dict(match=lambda n, t: any(n.endswith(x) for x in t)),                # no dot before the name
     r"self_attn\.qkv_proj.*not a substring"),
    (dict(match=lambda n, t: n != "lm_head" and ("attn" in n or "mlp" in n)),   # the MLP too
     r"LoRA on model\.layers\.0\.mlp\.gate_proj.*not in targets"),
    (dict(on_root=True), r"model\.layers\.0\.self_attn\.q_proj is still the plain nn\.Linear, but a module "
                         r"appeared at 'q_proj': the wrapper was set on the wrong parent"),
    (dict(refuse=False), r"\['query', 'value'\].*accepted them silently"),
    (dict(new_linear=True), "does not hold the model's own nn.Linear"),
    (dict(wrapper=Unscaled), r"logits differ from peft's beyond 1e-5 \(largest at \[.*alpha / r"),
    (dict(wrapper=RandomB), "straight after injection the logits differ.*B must start at zero"),
], ids=["not frozen", "frozen after", "first layer only", "substring", "endswith without dot", "mlp too",
        "wrong parent", "no match accepted", "new linear", "no scaling", "B not zero"])
def test_inject_checker_refuses_typical_mistakes(mistake, match):
    with pytest.raises(AssertionError, match=match):
        ex.check_inject(inject_variant(**mistake))


def test_inject_checker_reports_wrong_shapes_and_other_errors():
    with pytest.raises(AssertionError, match=r"expected A \(r, in\) = \(4, 64\)"):     # r and alpha swapped
        ex.check_inject(lambda model, targets, r, alpha: inject_variant()(model, targets, alpha, r))
    with pytest.raises(AssertionError, match="raised KeyError"):
        def no_match_keyerror(model, targets, r, alpha):
            if "query" in targets:
                raise KeyError("query")
            return lk.inject_lora(model, targets, r=r, alpha=alpha)
        ex.check_inject(no_match_keyerror)


def test_inject_checker_leaves_the_random_state_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    ex.check_inject(inject_own)
    assert torch.equal(torch.rand(3), want)


# Chapter 6: make_labels(input_ids, prompt_lengths, attention_mask) ----------------------------

def labels_own(input_ids, prompt_lengths, attention_mask):
    """Vectorised: a position is an answer token if it is past the prompt and not padding."""
    position = torch.arange(input_ids.shape[1])
    answer = (position[None, :] >= prompt_lengths[:, None]) & attention_mask.bool()
    return torch.where(answer, input_ids, torch.full_like(input_ids, IGNORE))


def labels_variant(kind):
    def make_labels(input_ids, prompt_lengths, attention_mask):
        labels = input_ids if kind == "in place" else input_ids.clone()
        for i, p in enumerate(prompt_lengths.tolist()):
            if kind != "prompt kept":
                labels[i, :p + (kind == "one too many")] = IGNORE
        if kind == "pad by id":
            labels[input_ids == 2] = IGNORE                   # the checker's pad id, also the end-of-turn
        elif kind != "padding kept":
            labels[attention_mask == 0] = IGNORE
        if kind == "shifted":
            labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
        return labels.float() if kind == "float" else labels
    return make_labels


def test_labels_checker_passes_a_correct_alternative(capsys):
    ex.check_make_labels(labels_own)
    assert "✓" in capsys.readouterr().out
    ex.check_make_labels(todo)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("kind, match", [
    ("prompt kept", r"row 0, column 0: got \d+, want -100\. That is a prompt token"),
    ("padding kept", r"row 0, column 10: got 2, want -100\. That is padding"),
    ("shifted", "shifted by one position. transformers shifts them itself"),
    ("one too many", r"row 0, column 5: got -100, want \d+\. That is an answer token"),
    ("pad by id", "end-of-turn token, whose id is also the pad id: find the padding from attention_mask"),
    ("in place", r"changed input_ids in place.*clone\(\)"),
    ("float", "dtype torch.float32; cross-entropy wants torch.long"),
])
def test_labels_checker_refuses_typical_mistakes(kind, match):
    with pytest.raises(AssertionError, match=match):
        ex.check_make_labels(labels_variant(kind))


# Chapter 6: train_step(model, batch, optimizer) -----------------------------------------------

def step_own(model, batch, optimizer):
    """The loss computed by hand (shift, then a mean over the answer tokens), gradients cleared first."""
    optimizer.zero_grad(set_to_none=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted, target = logits[:, :-1], batch["labels"][:, 1:]
    loss = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    optimizer.step()
    return loss                                                # a tensor is fine too


def step_variant(kind):
    def train_step(model, batch, optimizer):
        if kind != "no zero_grad":
            optimizer.zero_grad()
        labels = batch["labels"]
        if kind == "double shift":
            labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
        if kind == "prompt counted":
            labels = batch["input_ids"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        loss = out.loss
        if kind == "mean per row":
            losses = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                     reduction="none")
            keep = (labels[:, 1:] != IGNORE).float()
            loss = ((losses * keep).sum(1) / keep.sum(1)).mean()
        if kind == "no shift":
            loss = F.cross_entropy(out.logits.transpose(1, 2), labels, ignore_index=IGNORE)
        loss.backward()
        if kind == "zero_grad before step":
            optimizer.zero_grad()
        optimizer.step()
        return loss.item()
    return train_step


def test_step_checker_passes_a_correct_alternative(capsys):
    ex.check_train_step(step_own)
    assert "✓" in capsys.readouterr().out

    def step_model_loss(model, batch, optimizer):               # the model's own loss, gradients cleared after
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    ex.check_train_step(step_model_loss)
    assert "✓" in capsys.readouterr().out
    ex.check_train_step(todo)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("kind, match", [
    ("no zero_grad", r"step 2: the parameters moved by the sum of this step's gradient and the last one's"),
    ("double shift", r"step 1: your loss [\d.]+, transformers' model\(\*\*batch\)\.loss [\d.]+: it is the labels "
                     "shifted by hand"),
    ("mean per row", "it is a mean per row, then a mean of the rows"),
    ("prompt counted", "it is every position counted, prompt and padding"),
    ("no shift", r"it is logits at t scored against the token at t"),
    ("zero_grad before step", "no trainable parameter changed"),
])
def test_step_checker_refuses_typical_mistakes(kind, match):
    with pytest.raises(AssertionError, match=match):
        ex.check_train_step(step_variant(kind))


def test_step_checker_refuses_a_loss_per_token_and_a_missing_return():
    def unreduced(model, batch, optimizer):
        step_own(model, batch, optimizer)
        return torch.ones(3)
    with pytest.raises(AssertionError, match=r"tensor of shape \(3,\); return one number"):
        ex.check_train_step(unreduced)
    with pytest.raises(AssertionError, match="return the loss"):
        ex.check_train_step(lambda model, batch, optimizer: None)
