"""labkit: the helper package of the LoRA / QLoRA workbook. Import it as `import labkit as lk`."""
from .lora import (LoRALinear, count_parameters, find_targets, inject_lora, load_adapter,
                   lora_layers, lora_report, lora_state_dict, merge_lora, save_adapter, unmerge_lora)
from .models import (MINILM, SMOLLM2, ModelUnavailable, cache_dir, load_model, minilm_path,
                     smollm2_path, tiny_bert, tiny_llama)

__version__ = "0.1.0"
from .compare import peft_config, peft_lora_grads, to_peft
