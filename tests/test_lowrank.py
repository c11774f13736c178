"""Low-rank tools against the definitions: Eckart-Young, energies, effective rank, counts."""
import pytest
import torch

from labkit import lowrank as lr


def test_low_rank_approx_has_rank_r_and_eckart_young_error():
    torch.manual_seed(0)
    W = torch.randn(40, 30, dtype=torch.float64)
    S = lr.singular_values(W)
    for r in (0, 1, 5, 29, 30):
        Wr = lr.low_rank_approx(W, r)
        assert torch.linalg.matrix_rank(Wr).item() == r
        assert abs(torch.linalg.norm(W - Wr).item() - lr.eckart_young_error(S, r)) < 1e-9


def test_truncated_svd_beats_another_rank_r_matrix():
    torch.manual_seed(0)
    W = torch.randn(20, 20, dtype=torch.float64)
    other = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)
    assert torch.linalg.norm(W - lr.low_rank_approx(W, 3)) < torch.linalg.norm(W - other)


def test_energy_and_rank_for_energy():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)      # energies 9, 4, 1, 0 of 14
    assert lr.energy_captured(S, 1) == pytest.approx(9 / 14)
    assert lr.energy_captured(S, 4) == pytest.approx(1.0)
    assert lr.rank_for_energy(S, 0.9) == 2 and lr.rank_for_energy(S, 1.0) == 3


def test_effective_rank_bounds():
    assert lr.effective_rank(torch.ones(10, dtype=torch.float64)) == pytest.approx(10)
    assert lr.effective_rank(torch.tensor([5.0, 0, 0], dtype=torch.float64)) == pytest.approx(1)


def test_param_counts():
    assert lr.lora_param_count(576, 576, 8) == (331_776, 9_216)


@pytest.mark.parametrize("r", [-1, 31, 2.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="rank r must be"):
        lr.low_rank_approx(torch.randn(40, 30), r)


def test_not_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        lr.singular_values(torch.randn(3, 4, 5))
