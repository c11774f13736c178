"""Chapter 8's Build-it lab: check_virtual_tokens accepts a right prompt-tuning input written another
way than labkit's, refuses the typical mistakes with a message that says which, and reports the
unattempted skeleton."""
import pytest
import torch
import torch.nn.functional as F

from labkit import exercises as ex


def right(embeds, attention_mask, labels, prompt):
    """Fills a new tensor and pads, where labkit concatenates."""
    B, T, d = embeds.shape
    n = prompt.shape[0]
    out = embeds.new_empty(B, n + T, d)
    out[:, :n] = prompt
    out[:, n:] = embeds
    return out, F.pad(attention_mask, (n, 0), value=1), F.pad(labels, (n, 0), value=-100)


def after(embeds, attention_mask, labels, prompt):          # the virtual tokens at the end of each row
    B, n = embeds.shape[0], prompt.shape[0]
    return (torch.cat([embeds, prompt.expand(B, -1, -1)], 1), F.pad(attention_mask, (0, n), value=1),
            F.pad(labels, (0, n), value=-100))


def masked_out(embeds, attention_mask, labels, prompt):     # padded with 0: nothing attends to them
    e, _, lab = right(embeds, attention_mask, labels, prompt)
    return e, F.pad(attention_mask, (prompt.shape[0], 0), value=0), lab


def labels_zero(embeds, attention_mask, labels, prompt):    # labels padded with token 0: the loss counts them
    e, m, _ = right(embeds, attention_mask, labels, prompt)
    return e, m, F.pad(labels, (prompt.shape[0], 0), value=0)


def detached(embeds, attention_mask, labels, prompt):       # .data: the prompt gets no gradient
    return right(embeds, attention_mask, labels, prompt.data)


def unpadded_labels(embeds, attention_mask, labels, prompt):   # labels left at length T
    e, m, _ = right(embeds, attention_mask, labels, prompt)
    return e, m, labels


def skeleton(embeds, attention_mask, labels, prompt):
    raise NotImplementedError


def test_a_right_implementation_written_another_way_passes(capsys):
    ex.check_virtual_tokens(right)
    assert "✓" in capsys.readouterr().out


def test_the_skeleton_is_reported_not_attempted(capsys):
    ex.check_virtual_tokens(skeleton)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (after, "the virtual tokens go in FRONT of each row"),
    (masked_out, r"the attention mask of the virtual tokens is \[0, 0, 0, 0\]: it must be 1"),
    (labels_zero, r"the labels of the virtual tokens are \[0, 0, 0, 0\]: they must be -100"),
    (detached, "your embeds carry no gradient back to the prompt"),
    (unpadded_labels, r"your labels: shape \(2, 7\), expected \(2, 11\)"),
])
def test_typical_mistakes_are_refused_with_what_is_wrong(wrong, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_virtual_tokens(wrong)
