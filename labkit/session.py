"""The first cell of every chapter: seeds, device, the model setting, versions; and what differs
between the machines a learner brings (CPU kinds, GPUs, Colab)."""
import logging
import os
import random

import torch

# On a CPU the chapters use the offline SmolLM2-135M-Instruct. On a GPU, set LABKIT_MODEL to a
# larger hub model (e.g. HuggingFaceTB/SmolLM2-1.7B-Instruct) when online: that one setting scales
# every chapter up.
DEFAULT_MODEL = "smollm2"

# Log lines that libraries print on some machines and not on others. Each says that an optional
# fast path is missing, not that anything is wrong; labkit keeps them (`quieted_messages()`) instead
# of letting them into a notebook's output, where they would differ from machine to machine.
_MACHINE_NOISE = {
    # bitsandbytes, on a CPU with AVX512-BF16: the optional `kernels` package (which would fetch a
    # kernel from the Hugging Face hub) is missing; bitsandbytes uses its own compiled kernel.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    # torch, a CUDA build on a machine without a GPU (a Colab CPU runtime), when a C++ extension is looked up.
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
_quieted = []


class _MachineNoise(logging.Filter):
    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        if record.getMessage().startswith(self.prefix):
            _quieted.append(f"{record.name}: {record.getMessage()}")
            return False
        return True


def quiet_machine_noise():
    """Keep the machine-dependent log lines above out of notebook outputs (idempotent)."""
    for name, prefix in _MACHINE_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MachineNoise) for f in logger.filters):
            logger.addFilter(_MachineNoise(prefix))


def quieted_messages():
    """The log lines quiet_machine_noise() kept out of sight in this process."""
    return list(_quieted)


def cpu_has_avx512_bf16():
    """Whether this CPU has AVX512-BF16 instructions, as bitsandbytes asks its own library; on such
    a CPU bitsandbytes computes 4-bit layers in inference through a fused bf16 kernel (chapter 5)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def amp_dtype(device):
    """The autocast dtype for mixed precision on `device`: bf16 where the hardware has it, fp16 on
    a GPU without it (a T4: torch reports bf16 there through emulation, which is slow, so that is
    not counted), bf16 on a CPU (torch emulates it where the CPU lacks bf16 instructions)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            real_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:                    # an older torch without the argument: ask the hardware (Ampere+)
            real_bf16 = torch.cuda.get_device_capability()[0] >= 8
        return torch.bfloat16 if real_bf16 else torch.float16
    return torch.bfloat16


def synchronize(device):
    """Wait until every kernel queued on `device` has run, so that a clock read next counts them.
    CUDA and Apple's MPS run kernels asynchronously (a call returns before its kernel has run);
    on a CPU an operation is done when its call returns, and there is nothing to wait for. Time
    with it on both sides: synchronize(device); t0 = time.perf_counter(); ...; synchronize(device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def has_float64(device):
    """Whether `device` computes in float64 (and complex128): Apple's MPS has neither."""
    return torch.device(device).type != "mps"


_DEVICES = ("cpu", "cuda", "mps")


def pick_device():
    """The device the chapters run on: LABKIT_DEVICE if set (cpu, cuda or mps), else cuda where
    there is a GPU, else the CPU. Apple's MPS is only ever used when asked for (LABKIT_DEVICE=mps):
    the saved outputs are the CPU's, and no chapter has run on MPS (README, Hardware notes)."""
    asked = os.environ.get("LABKIT_DEVICE", "").strip().lower()
    if not asked:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if asked not in _DEVICES:
        raise ValueError(f"LABKIT_DEVICE must be one of {', '.join(_DEVICES)}, got {asked!r}")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}[asked]
    if not available:
        raise RuntimeError(f"LABKIT_DEVICE={asked}, but this torch {torch.__version__} sees no {asked} device "
                           "on this machine: unset LABKIT_DEVICE to run on the CPU")
    return torch.device(asked)


def setup(seed=0, show=True):
    """Seed everything, pick the device (pick_device) and the model; returns (device, model name).

    What it prints (versions, device, threads, CPU kind) differs from machine to machine: the
    chapters keep this cell's output out of nbval's strict comparison."""
    quiet_machine_noise()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    device = pick_device()
    model = os.environ.get("LABKIT_MODEL", DEFAULT_MODEL)
    if show:
        import peft
        import transformers
        if device.type == "cuda":
            where = f"cuda ({torch.cuda.get_device_name()}, mixed precision in {amp_dtype(device)})"
        elif device.type == "mps":
            where = "mps (Apple's GPU, asked for with LABKIT_DEVICE; untested: README, Hardware notes)"
        else:
            where = f"cpu, {torch.get_num_threads()} threads, AVX512-BF16: {'yes' if cpu_has_avx512_bf16() else 'no'}"
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
        print(f"device: {where}; model: {model}; seed {seed}")
    return device, model
