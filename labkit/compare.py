"""Bridges to the reference libraries, so each from-scratch piece can be checked against them."""
import torch


def peft_config(lora_config):
    """The peft LoraConfig equivalent to the settings inject_lora stored on a model."""
    from peft import LoraConfig
    c = lora_config
    return LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"],
                      target_modules=c["target_modules"], use_rslora=c["use_rslora"], bias="none")


@torch.no_grad()
def to_peft(lk_model, fresh_base):
    """Wrap `fresh_base` (an un-adapted copy of the same model) with peft's LoRA, using the same
    settings as `lk_model`, and copy every A and B across. Returns the peft model."""
    from peft import get_peft_model
    from .lora import lora_layers
    if not hasattr(lk_model, "lora_config"):
        raise ValueError("lk_model has no LoRA layers: call labkit.inject_lora first")
    peft_model = get_peft_model(fresh_base, peft_config(lk_model.lora_config))
    inner = peft_model.base_model.model
    for name, layer in lora_layers(lk_model):
        twin = inner.get_submodule(name)
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model


def peft_lora_grads(peft_model):
    """{layer name: (grad of A, grad of B)} of a peft LoRA model, named as labkit names them."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
    return out
