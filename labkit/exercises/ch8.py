"""Chapter 8 (the PEFT family): the checkers of its exercises and its Build-it lab."""
import math

import torch

from ..lora import count_parameters
from ._common import _attempt, _ok, _todo, _first_wrong


def check_bottleneck_params(fn):
    """fn(d, m, n_layers, per_layer) -> trainable parameters of bottleneck adapters with biases."""
    from ..adapters import inject_adapters
    from ..models import tiny_llama
    for d, m, n_layers, per_layer in ((64, 8, 2, 2), (64, 4, 3, 1), (576, 16, 30, 2)):
        done, got = _attempt(fn, d, m, n_layers, per_layer)
        if not done:
            return _todo("bottleneck adapter parameters")
        if d == 64:                                         # count a real model
            targets = ("o_proj", "mlp") if per_layer == 2 else ("mlp",)
            model = inject_adapters(tiny_llama(num_hidden_layers=n_layers), "serial", bottleneck=m, targets=targets)
            want = count_parameters(model)[0]
        else:
            want = n_layers * per_layer * (d * m + m + m * d + d)
        assert got == want, (f"d={d}, m={m}, {n_layers} layers x {per_layer}: you gave {got:,}, expected {want:,}: "
                             "down is d x m plus m biases, up is m x d plus d biases")
    return _ok("bottleneck adapters: 2dm + m + d per adapter")


def check_ia3_params(fn):
    """fn(config) -> entries of IA3's vectors: keys, values (kv heads x head dim) and MLP width, per layer."""
    from ..adapters import inject_ia3
    from ..models import tiny_llama
    for kv_heads, layers in ((2, 2), (4, 3), (1, 2)):
        model = inject_ia3(tiny_llama(num_key_value_heads=kv_heads, num_hidden_layers=layers))
        done, got = _attempt(fn, model.config)
        if not done:
            return _todo("IA3 parameters")
        want = count_parameters(model)[0]
        assert got == want, (f"{layers} layers, {kv_heads} key/value heads: you gave {got}, expected {want}. Keys "
                             "and values have num_key_value_heads x head_dim entries (grouped-query attention), "
                             "the MLP's inner activation intermediate_size")
    return _ok("IA3: 2 x kv_heads x head_dim + intermediate_size per layer")


def check_prompt_params(fn):
    """fn(config, n, kind) -> trainable parameters of a prompt method with n virtual tokens:
    kind "prompt_tuning" (input embeddings), "ptuning_v2" (keys and values of every layer) or
    "prefix" (an n x kv-width table and a 2-layer MLP of width 64 that makes those keys and values)."""
    from ..models import tiny_llama
    from ..prompts import PromptModel
    for kv_heads, layers, n in ((2, 2, 4), (4, 3, 8), (1, 2, 16)):
        config_model = tiny_llama(num_key_value_heads=kv_heads, num_hidden_layers=layers)
        for kind in ("prompt_tuning", "ptuning_v2", "prefix"):
            done, got = _attempt(fn, config_model.config, n, kind)
            if not done:
                return _todo("prompt method parameters")
            want = count_parameters(PromptModel(config_model, kind, n, init="zero"))[0]
            assert got == want, (f"{kind}, {n} virtual tokens, {layers} layers, {kv_heads} key/value heads: you gave "
                                 f"{got}, expected {want}. Prompt tuning learns n x hidden_size; the prefix methods "
                                 "learn keys and values (num_key_value_heads x head_dim each) in every layer; prefix "
                                 "tuning makes them with embedding (n x kv width) -> Linear(kv width, 64) -> tanh -> "
                                 "Linear(64, layers x 2 x kv width), biases included")
    return _ok("prompt tuning n*d; P-Tuning v2 n*L*2*kv; prefix tuning n*kv + (kv*64 + 64) + (64*L*2*kv + L*2*kv)")


def check_virtual_tokens(fn):
    """fn(embeds, attention_mask, labels, prompt) -> (embeds, attention_mask, labels) with prompt
    tuning's n virtual tokens in front of every row: embeds (B, T, d), attention_mask (B, T),
    labels (B, T), prompt (n, d) -> (B, n + T, d), (B, n + T), (B, n + T).

    Checked on a small random Llama against peft's prompt tuning (PromptTuningConfig) holding the
    same virtual tokens: the logits within 1e-5, the loss within 1e-6 relative, and the gradient of
    the virtual tokens within 1e-5 of its largest value; and, before that, the shapes, dtypes and
    values of what you return."""
    from peft import PromptTuningConfig, get_peft_model
    from ..models import tiny_llama
    g = torch.Generator().manual_seed(8)
    for B, T, n, pad in ((2, 7, 4, (0, 2)), (3, 5, 6, (1, 0, 3)), (1, 9, 1, (0,))):
        ids = torch.randint(0, 256, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        for b, p in enumerate(pad):                                   # right padding, as training batches have
            if p:
                mask[b, -p:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :2] = -100                                           # a prompt the loss does not see
        theirs = get_peft_model(tiny_llama(seed=1), PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM"))
        prompt_ref = theirs.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            prompt_ref.copy_(0.5 * torch.randn(n, prompt_ref.shape[1], generator=g))
        model = tiny_llama(seed=1).requires_grad_(False)
        prompt = prompt_ref.detach().clone().requires_grad_()
        embeds = model.get_input_embeddings()(ids)
        done, got = _attempt(fn, embeds, mask.clone(), labels.clone(), prompt)
        if not done:
            return _todo("the virtual tokens of prompt tuning")
        assert isinstance(got, (tuple, list)) and len(got) == 3, \
            "return three things: (embeds, attention_mask, labels), each with the n virtual tokens in front"
        e, m, lab = got
        d = embeds.shape[-1]
        for what, t, shape in (("embeds", e, (B, n + T, d)), ("attention_mask", m, (B, n + T)),
                               ("labels", lab, (B, n + T))):
            assert isinstance(t, torch.Tensor) and tuple(t.shape) == shape, (
                f"for a batch of {B} rows of {T} tokens and {n} virtual tokens, your {what}: shape "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}, expected {shape}"
                + (": the prompt is (n, d), one copy in front of every row (expand it over the batch)"
                   if what == "embeds" else ""))
        assert m.dtype == mask.dtype and lab.dtype == labels.dtype, (
            f"keep the dtypes: attention_mask {m.dtype} (given {mask.dtype}), labels {lab.dtype} (given {labels.dtype})")
        assert e.grad_fn is not None, ("your embeds carry no gradient back to the prompt: concatenate the prompt "
                                       "tensor itself (torch.cat), not a detached copy or its .data")
        assert torch.equal(m[:, n:], mask) and torch.equal(lab[:, n:], labels) and torch.equal(e[:, n:], embeds), (
            "the last T positions must be the input as it was: the virtual tokens go in FRONT of each row")
        assert torch.equal(m[:, :n], torch.ones_like(m[:, :n])), (
            f"the attention mask of the virtual tokens is {m[0, :n].tolist()}: it must be 1, or no token attends to them")
        assert (lab[:, :n] == -100).all(), (
            f"the labels of the virtual tokens are {lab[0, :n].tolist()}: they must be -100 (the loss ignores them; "
            "there is no token to predict there)")
        bad = _first_wrong(e[:, :n].detach(), prompt.detach().expand(B, -1, -1), 0.0)
        assert bad is None, f"the first n embeddings of every row must be the prompt, in order: {bad}"
        mine, ref = model(inputs_embeds=e, attention_mask=m, labels=lab), theirs(input_ids=ids, attention_mask=mask,
                                                                              labels=labels)
        bad = _first_wrong(mine.logits.detach(), ref.logits.detach(), 1e-5)
        assert bad is None, f"the logits differ from peft's prompt tuning: {bad}"
        assert math.isclose(mine.loss.item(), ref.loss.item(), rel_tol=1e-6), \
            f"your loss {mine.loss.item():.6f}, peft's {ref.loss.item():.6f}"
        mine.loss.backward()
        ref.loss.backward()
        bad = _first_wrong(prompt.grad, prompt_ref.grad, 1e-5 * prompt_ref.grad.abs().max().item())
        assert bad is None, f"the gradient of the virtual tokens differs from peft's: {bad}"
    return _ok("your virtual tokens give peft's prompt tuning: the same logits, loss and gradient of the prompt")
