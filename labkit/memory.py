"""Memory: the bill of a training step on paper, and measured (chapter 0, then chapters 5 and 6).

On a CPU the measurement is the process's resident memory (RSS, Linux /proc), sampled every
half millisecond while the step runs; on CUDA it is torch.cuda.max_memory_allocated.
"""
import ctypes
import threading
import time
from contextlib import contextmanager

import torch

GB = 1024 ** 3
MB = 1024 ** 2


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


try:
    import os
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE = 4096


def _trim():
    """Give freed heap memory back to the OS, so the baseline is not inflated by earlier cells."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn, device="cpu"):
    """Run fn(); return (its result, peak extra memory in bytes above the memory in use before)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    try:
        _rss()
    except OSError:
        raise RuntimeError("measuring CPU memory needs Linux's /proc (use a Linux machine or Colab)") from None
    _trim()
    before = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return result, max(peak, _rss()) - before


@contextmanager
def count_saved_tensors(model=None):
    """Counts the bytes autograd saves for backward inside the block: the activations. Each storage
    is counted once, and the model's own parameters (also saved, but already in memory) not at all.

        with count_saved_tensors(model) as saved:
            loss = model(**batch).loss
        saved["bytes"], saved["tensors"]
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    seen, info = set(), {"bytes": 0, "tensors": 0}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen and key not in params and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            info["bytes"] += st.nbytes()
            info["tensors"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield info


def training_bill(n_params, n_trainable=None, param_bytes=4, grad_bytes=None, optimizer="adamw",
                  state_bytes=4, activations=0):
    """Bytes for one training step: weights, gradients, optimizer states and activations.

    AdamW keeps two states (m and v) per trainable parameter; SGD with momentum one; plain SGD none."""
    states = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
    if optimizer not in states:
        raise ValueError(f"optimizer must be one of {sorted(states)}, got {optimizer!r}")
    n_trainable = n_params if n_trainable is None else n_trainable
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    return {"weights": n_params * param_bytes,
            "gradients": n_trainable * grad_bytes,
            "optimizer": n_trainable * states[optimizer] * state_bytes,
            "activations": activations}


def parameter_groups(model):
    """Parameters of a transformer grouped by role: embeddings, attention, MLP, norms, other."""
    groups, seen = {}, set()
    for name, p in model.named_parameters():
        if id(p) in seen:                     # a tied output head shares the embedding's tensor
            continue
        seen.add(id(p))
        if "norm" in name.lower():
            key = "norms"
        elif "embed" in name:
            key = "embeddings"
        elif any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "attention")):
            key = "attention"
        elif any(k in name for k in ("mlp", "intermediate", "output.dense")):
            key = "mlp"
        else:
            key = "other"
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


def fmt_bytes(n):
    """Bytes as a short human string (binary units)."""
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GB), ("MiB", MB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


_CATEGORIES = {"PARAM": "weights", "GRAD": "gradients", "OPT": "optimizer", "ACT": "activations",
               "TEMP": "temporaries", "BUFFER": "buffers", "OTH": "other"}


def tracked_peak(fn, *tracked):
    """Run fn() while PyTorch's MemTracker accounts for every tensor; return (fn's result,
    {category: bytes} at the moment of peak memory, on the device that peaked highest).

    `tracked` are the model(s) and optimizer(s), so that their tensors are labelled weights,
    gradients and optimizer states. This counts tensors, not the allocator's pages: it repeats
    exactly from run to run, unlike the process's resident memory (see peak_memory)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(*tracked)
    with tracker:
        result = fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    device = max(snapshot, key=lambda d: snapshot[d].get("Total", 0))
    peak = {}
    for key, value in snapshot[device].items():
        name = getattr(key, "name", str(key)).rsplit(".", 1)[-1]
        peak[_CATEGORIES.get(name, name.lower())] = value
    return result, peak
