"""lk.session: the one device synchronisation that timing uses, float64 by device, and the device
the chapters pick (Apple's MPS only when asked for). MPS and CUDA are stood in for on the CPU."""
import pytest
import torch

from labkit import session


@pytest.fixture
def waits(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps",)))
    return calls


def test_synchronize_waits_for_cuda_and_mps_and_not_for_a_cpu(waits):
    session.synchronize("cpu")
    session.synchronize(torch.device("cpu"))
    assert waits == []                                     # a CPU's operations are done when their call returns
    session.synchronize("mps")
    session.synchronize(torch.device("cuda", 1))
    session.synchronize("cuda")
    assert waits == [("mps",), ("cuda", torch.device("cuda", 1)), ("cuda", torch.device("cuda"))]


def test_has_float64():
    assert session.has_float64("cpu") and session.has_float64(torch.device("cuda", 0))
    assert not session.has_float64("mps") and not session.has_float64(torch.device("mps"))


def test_pick_device_takes_cuda_where_there_is_one_and_mps_only_when_asked(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)      # a Mac: still the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert session.pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert session.pick_device() == torch.device("cuda")
    monkeypatch.setenv("LABKIT_DEVICE", "MPS ")
    assert session.pick_device() == torch.device("mps")
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    assert session.pick_device() == torch.device("cpu")


def test_pick_device_refuses_what_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("LABKIT_DEVICE", "mps")
    with pytest.raises(RuntimeError, match="LABKIT_DEVICE=mps, but this torch .* sees no mps device"):
        session.pick_device()
    monkeypatch.setenv("LABKIT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="LABKIT_DEVICE must be one of cpu, cuda, mps, got 'tpu'"):
        session.pick_device()
