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


class _NoFloat64(torch.Tensor):
    """A CPU tensor standing in for one on Apple's MPS, which has no float64: .double() raises as
    MPS does, .cpu() gives an ordinary tensor."""

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")

    def cpu(self):
        return torch.Tensor.cpu(self).as_subclass(torch.Tensor)


def test_a_device_without_float64_computes_on_the_cpu_in_float64(monkeypatch):
    """On MPS (no float64) the SVD runs in float64 on the CPU: the same values as on the CPU, and the
    approximation comes back in W's dtype."""
    import labkit as lk
    assert not lk.session.has_float64("mps") and lk.session.has_float64("cpu") and lk.session.has_float64("cuda")
    monkeypatch.setattr(lr, "has_float64", lambda device: False)
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    fake = W.clone().as_subclass(_NoFloat64)
    S = lr.singular_values(fake)
    assert S.dtype == torch.float64 and torch.equal(S, torch.linalg.svdvals(W.double()))
    Wr = lr.low_rank_approx(fake, 3)
    assert Wr.dtype == torch.float32 and Wr.device == W.device
    assert torch.equal(Wr, lr.low_rank_approx(W, 3))
    sim = lk.lab.subspace_similarity(fake[:4], fake[4:8])            # chapter 7's SVD: on the CPU already
    assert torch.equal(sim, lk.lab.subspace_similarity(W[:4], W[4:8]))


def test_the_update_spectrum_cache_is_chapter_1s_run():
    """data/results/update_spectrum.json's 10-step row (chapter 1's solutions read it) is the row
    chapter 1 prints for layer 10's q_proj after its own 10 steps: the same run, measured on the way."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    cache = json.loads((root / "data" / "results" / "update_spectrum.json").read_text())
    assert cache["settings"]["steps"] == 40 and list(cache["measured"]) == ["10", "20", "40"]
    nb = json.loads((root / "notebooks" / "01_low_rank_mathematics.ipynb").read_text())
    printed = [line for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
               for line in "".join(o.get("text", "")).splitlines() if line.startswith("q_proj ")]
    assert len(printed) == 1, printed
    rank90, top8 = printed[0].split()[3], printed[0].split()[5]     # q_proj (576, 576) r90 random top8 random
    ten = cache["measured"]["10"]
    assert (int(rank90), float(top8)) == (ten["layer10_rank90"], round(ten["layer10_top8"], 2))
    assert len(ten["top8_by_layer"]) == 30 and len(cache["losses"]) == 40
