"""labkit: the helper package of the LoRA / QLoRA workbook. Import it as `import labkit as lk`.

What each chapter builds lives here once; the notebooks show it and test it against peft,
bitsandbytes and transformers."""
import warnings

# peft (0.21) calls a transformers method that transformers 5 deprecates; harmless, and noisy in
# every notebook that touches peft.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# peft's prefix tuning passes past_key_values, which transformers 5 is renaming; also harmless.
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)

from .session import quiet_machine_noise

quiet_machine_noise()     # before any library that logs machine-dependent lines is imported

from . import (adapter_files, adapters, bnb_cpu, data, exercises, export, finetune, lab, loftq, lora, lowrank, measure, memory,
               pissa, prompts, qinit, qlora, quant, serving, stats, tasks, text, train, widgets)
from .adapter_files import load_adapter, save_adapter
from .compare import peft_config, peft_lora_grads, to_peft
from .lora import (LoRALinear, count_parameters, find_targets, inject_lora, lora_layers, lora_report,
                   lora_state_dict, merge_lora, replace_module, unmerge_lora)
from .models import (MINILM, SMOLLM2, ModelUnavailable, cache_dir, load_model, load_tokenizer, minilm_path,
                     smollm2_path, tiny_bert, tiny_llama)
from .qlora import LinearNF4, inject_qlora, model_bytes, quantize_model
from .quant import dequantize_nf4, nf4_codebook, quantize_nf4
from .session import amp_dtype, setup

# The adapter file formats left lora.py for adapter_files.py (which imports lora, so lora cannot
# import them back): lk.lora.save_adapter, lk.lora.load_adapter, ... still name the same functions.
for _name in adapter_files.__all__:
    setattr(lora, _name, getattr(adapter_files, _name))
del _name

__version__ = "0.1.0"

# The chapter that introduces each module: the first chapter whose notebook uses it (lk.<module>.<name>,
# `from labkit import <module>`, or a name re-exported from it, as lk.load_model is lk.models').
# A module may import only modules of its own chapter or earlier ones, and no import goes round in a
# circle: tests/test_rooms.py reads every module's imports and checks both, and checks this map
# against the notebooks. exercises (the checkers of every chapter) and this file are outside the map.
CHAPTERS = {
    "session": 0, "models": 0, "data": 0, "text": 0, "train": 0, "measure": 0, "memory": 0, "lora": 0,
    "lowrank": 1,
    "compare": 2,
    "adapter_files": 3,
    "quant": 4, "nf4_cpu": 4,                      # nf4_cpu: quant's compiled CPU decode (numba)
    "qlora": 5, "bnb_cpu": 5,
    "finetune": 6,
    "lab": 7, "widgets": 7,
    "adapters": 8, "prompts": 8, "stats": 8,      # stats: chapter 8's fair comparison (scripts/run_peft_fair.py)
    "serving": 9, "tasks": 9, "export": 9,        # export: llama.cpp GGUF, merged models, Ollama
    "loftq": 10, "pissa": 10, "qinit": 10,        # chapter 10 (issue 21): LoftQ, PiSSA, QLoRA's starts; no notebook yet
}
