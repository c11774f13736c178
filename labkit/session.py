"""The first cell of every chapter: seeds, device, the model setting, versions."""
import os
import random

import torch

# On a CPU the chapters use the offline SmolLM2-135M-Instruct. On a GPU, set LABKIT_MODEL to a
# larger hub model (e.g. HuggingFaceTB/SmolLM2-1.7B-Instruct) when online: that one setting scales
# every chapter up.
DEFAULT_MODEL = "smollm2"


def setup(seed=0, show=True):
    """Seed everything, pick the device and model; returns (device, model name)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = os.environ.get("LABKIT_MODEL", DEFAULT_MODEL)
    if show:
        import peft
        import transformers
        gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
        print(f"device: {device}{gpu}, {torch.get_num_threads()} CPU threads; model: {model}; seed {seed}")
    return device, model
