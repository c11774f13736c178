"""Chapter 9's Build-it lab: check_mixed_lora accepts a right mixed-adapter forward written another
way than labkit's, refuses the typical mistakes with a message that says which, and reports the
unattempted skeleton."""
import pytest
import torch

from labkit import exercises as ex


def right(x, W0, A, B, scaling, index):
    """A loop over rows and einsum, unlike labkit's gather and bmm."""
    h = torch.einsum("bti,oi->bto", x, W0)
    for b, k in enumerate(index.tolist()):
        if k >= 0:
            h[b] += scaling[k] * torch.einsum("ti,ri,or->to", x[b], A[k], B[k])
    return h


def gather_no_mask(x, W0, A, B, scaling, index):        # A[-1] is the last adapter, not "none"
    return x @ W0.T + scaling[index][:, None, None] * (x @ A[index].transpose(1, 2) @ B[index].transpose(1, 2))


def first_rows_adapter(x, W0, A, B, scaling, index):    # the whole batch on the first row's adapter
    k = index[0].clamp(min=0)
    return x @ W0.T + scaling[k] * (x @ A[k].T @ B[k].T)


def one_scaling(x, W0, A, B, scaling, index):           # every row scaled by adapter 0's scaling
    use = index.clamp(min=0)
    update = x @ A[use].transpose(1, 2) @ B[use].transpose(1, 2)
    return x @ W0.T + scaling[0] * update * (index >= 0)[:, None, None]


def no_update(x, W0, A, B, scaling, index):             # the base alone for every row
    return x @ W0.T


def flat_2d(x, W0, A, B, scaling, index):               # tokens folded into the batch: the wrong shape
    return right(x, W0, A, B, scaling, index).reshape(-1, W0.shape[0])


def skeleton(x, W0, A, B, scaling, index):
    raise NotImplementedError


def test_a_right_implementation_written_another_way_passes(capsys):
    ex.check_mixed_lora(right)
    assert "✓" in capsys.readouterr().out


def test_the_skeleton_is_reported_not_attempted(capsys):
    ex.check_mixed_lora(skeleton)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (gather_no_mask, r"row 2 \(adapter -1.*Index -1 means the base alone, but your row used adapter 2 \(A\[-1\] is the last adapter"),
    (first_rows_adapter, r"row 1 \(adapter 2.*Your row used adapter 0's A and B, not its own \(2\)"),
    (one_scaling, r"row 1 \(adapter 2.*its own adapter's scaling \(1 for adapter 2\)"),
    (no_update, r"row 0 \(adapter 0.*Your row is the base alone, without adapter 0's update"),
    (flat_2d, r"you returned \(15, 12\); expected \(5, 3, 12\)"),
])
def test_typical_mistakes_are_refused_with_what_is_wrong(wrong, message):
    with pytest.raises(AssertionError, match=message):
        ex.check_mixed_lora(wrong)
