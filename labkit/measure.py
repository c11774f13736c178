"""Memory, measured (chapters 0, 5 and 6). lk.memory predicts the same bills from counts and shapes.

Two measurements: tracked_peak accounts for every tensor with PyTorch's MemTracker and labels
it (weights, gradients, optimizer, activations), repeatably; peak_memory reads the process's
resident memory on a CPU (Linux /proc, sampled every half millisecond), or
torch.cuda.max_memory_allocated on CUDA. count_saved_tensors counts what autograd keeps for backward.

Off Linux (macOS) there is no /proc: peak_memory and held_memory on a CPU say so, and tracked_peak
(tensor accounting, any system and device) measures instead. Apple's MPS keeps no peak statistic
as CUDA does: there too, tracked_peak.
"""
import ctypes
import inspect
import sys
import threading
import time
import warnings
from contextlib import contextmanager

import torch

from .session import synchronize

_STATM = "/proc/self/statm"          # Linux's count of the process's pages: size, resident, ...


def _rss():
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        raise RuntimeError(
            f"peak_memory and held_memory read a CPU process's resident memory from Linux's /proc ({_STATM}), "
            f"which this system ({sys.platform}) does not have: use lk.measure.tracked_peak(fn, model, optimizer) "
            "instead (PyTorch's MemTracker counts every tensor, on any system), or a Linux machine or Colab") from None


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


def held_memory():
    """Bytes this process holds now (resident memory, after giving freed heap back to the OS; Linux only)."""
    _trim()
    return _rss()


def peak_memory(fn, device="cpu"):
    """Run fn(); return (its result, peak extra memory in bytes above the memory in use before): on a
    CPU the process's resident memory (Linux only), on CUDA the allocator's. Elsewhere (macOS, MPS)
    it raises, naming tracked_peak, which measures there."""
    kind = torch.device(device).type
    if kind == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated() - before
    if kind != "cpu":
        raise RuntimeError(f"peak_memory measures on a CPU or CUDA; torch keeps no peak-memory statistic for "
                           f"{kind}: use lk.measure.tracked_peak(fn, model, optimizer) (PyTorch's MemTracker counts "
                           "every tensor on any device)")
    _rss()                                   # off Linux: the error that says what to use instead
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


_CATEGORIES = {"PARAM": "weights", "GRAD": "gradients", "OPT": "optimizer", "ACT": "activations",
               "TEMP": "temporaries", "BUFFER": "buffers", "OTH": "other"}


# MemTracker is not public API (torch.distributed._tools, since torch 2.5): labkit overrides one of
# its methods and uses these private parts, which _mem_tracker checks this torch has.
_PRIVATE_METHODS = ("_track_module_params_and_buffers", "_update_and_maybe_create_winfos")
_PRIVATE_FIELDS = ("_param_to_grad_hook_handles",)


def _missing(what):
    return RuntimeError(
        f"lk.measure.tracked_peak builds on private parts of PyTorch's MemTracker "
        f"(torch.distributed._tools.mem_tracker), and this torch {torch.__version__} lacks {what}: they were "
        "checked with torch 2.13 (the version scripts/workbook.sh installs). Install that, or measure with "
        "lk.measure.peak_memory (the process's memory on Linux, or CUDA's allocator) instead")


def _mem_tracker():
    """torch's MemTracker, taught to leave frozen parameters alone: as shipped it installs a
    gradient hook on every parameter of every module it enters, which raises for parameters that
    do not require grad, i.e. for every LoRA or QLoRA model."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    except ImportError as e:
        raise _missing(f"the module itself ({e})") from None
    absent = [f"MemTracker.{name}" for name in _PRIVATE_METHODS if not hasattr(MemTracker, name)]
    track = getattr(MemTracker, "_track_module_params_and_buffers", None)
    if track is not None and "install_grad_hooks" not in inspect.signature(track).parameters:
        absent.append("the install_grad_hooks argument of MemTracker._track_module_params_and_buffers")
    if not hasattr(_MemRefType, "GRAD"):
        absent.append("_MemRefType.GRAD")
    tracker = _frozen_aware(MemTracker, _MemRefType)()
    absent += [f"MemTracker().{name}" for name in _PRIVATE_FIELDS if not hasattr(tracker, name)]
    if absent:
        raise _missing(", ".join(absent))
    return tracker


def _frozen_aware(MemTracker, _MemRefType):
    class FrozenAwareMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                def hook(grad):                                     # must return None
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(hook),
                            p.register_post_accumulate_grad_hook(lambda q: hook(q.grad)))
            return out

    return FrozenAwareMemTracker


# MemTracker's ModTracker names each module by its path from the first module it sees, and a module
# outside that tree by its class name alone. transformers 5.25 runs some functions through the
# `kernels` package's wrapper modules, all of class Func and none a child of the model, so a Func
# called inside another Func looks to ModTracker like a module entered twice, and it warns. The
# names only attribute memory to modules; tracked_peak reads the totals by kind, which they do
# not change (checked: the same counts under transformers 5.24 and 5.25), so the warning is noise.
_HIERARCHY_WARNING = "The module hierarchy tracking maybe be messed up"


def tracked_peak(fn, *tracked):
    """Run fn() while PyTorch's MemTracker accounts for every tensor; return (fn's result,
    {category: bytes} at the moment of peak memory, on the device that peaked highest).

    `tracked` are the model(s) and optimizer(s), so that their tensors are labelled weights,
    gradients and optimizer states. This counts tensors, not the allocator's pages: it repeats
    exactly from run to run, unlike the process's resident memory (see peak_memory)."""
    tracker = _mem_tracker()
    tracker.track_external(*tracked)
    formatwarning = warnings.formatwarning
    with warnings.catch_warnings(), tracker:
        warnings.filterwarnings("ignore", message=_HIERARCHY_WARNING)
        result = fn()
    warnings.formatwarning = formatwarning     # ModTracker replaces it, for the whole process, as it warns
    snapshot = tracker.get_tracker_snapshot("peak")
    device = max(snapshot, key=lambda d: snapshot[d].get("Total", 0))
    peak = {}
    for key, value in snapshot[device].items():
        name = getattr(key, "name", str(key)).rsplit(".", 1)[-1]
        peak[_CATEGORIES.get(name, name.lower())] = value
    return result, peak
