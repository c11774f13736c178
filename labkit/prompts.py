"""Prompt methods from scratch (chapter 8): prompt tuning, prefix tuning and P-Tuning v2.

All three freeze the model and learn `n` *virtual tokens* that every real token can attend to.
- Prompt tuning (Lester et al., 2021): n learned input embeddings, put before the prompt's
  embeddings. Only the first layer sees them directly.
- Prefix tuning (Li and Liang, 2021): n learned keys and values *at every layer*, put in the KV
  cache before the prompt. They are made by a small MLP from an n x d table (the
  reparameterisation that Li and Liang found made training stable); after training only the
  keys and values are needed.
- P-Tuning v2 (Liu et al., 2022): the same deep prompts, one per layer, learned directly
  (no MLP).

Each `PromptModel` takes the same inputs as the model it wraps and numbers the prompt's
positions after the n virtual tokens, as peft does, so that the numbers match peft's
`PeftModelForCausalLM` (tests/test_prompts.py, 1e-5). Start: no prefix is exactly "no change"
(zero keys still take attention, zero values dilute it), so `init="text"` starts from what the
model itself computes on a short text: its embeddings (prompt tuning) or its keys and values
(the prefix methods). The model then starts as if it had read that text first.
"""
import inspect

import torch
import torch.nn as nn

from .text import chat_prompt, left_padded, register_generator

KINDS = ("prompt_tuning", "prefix", "ptuning_v2")
INITS = ("random", "zero", "text")


def _cache_argument(model):
    """The name under which `model.forward` takes a KV cache: "cache" (transformers 5.2x),
    "past_key_values" (older), or None when it takes none."""
    names = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in names), None)


def _output_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def kv_layout(config):
    """(layers, key/value heads, head size) of a decoder's attention, from its config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixMLP(nn.Module):
    """Prefix tuning's reparameterisation: an n x d table through Linear, tanh, Linear gives every
    layer's keys and values, (n, layers * 2 * kv_width). `start` is a fixed offset (zero unless
    text-initialised) that the MLP's output is added to."""

    def __init__(self, n, width, hidden, out):
        super().__init__()
        self.embedding = nn.Embedding(n, width)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        self.register_buffer("start", torch.zeros(n, out))

    def forward(self):
        return self.start + self.transform(self.embedding.weight)


class DeepPrompt(nn.Module):
    """P-Tuning v2: every layer's keys and values, learned directly: (n, layers * 2 * kv_width)."""

    def __init__(self, n, out):
        super().__init__()
        self.embedding = nn.Embedding(n, out)

    def forward(self):
        return self.embedding.weight


class SoftPrompt(nn.Module):
    """Prompt tuning: n learned input embeddings, (n, hidden size)."""

    def __init__(self, n, hidden):
        super().__init__()
        self.embedding = nn.Embedding(n, hidden)

    def forward(self):
        return self.embedding.weight


class PromptModel(nn.Module):
    """A frozen causal LM with `n` learned virtual tokens in front of every input (see the module
    docstring for the three `kind`s). Call it like the model: input_ids, attention_mask, labels."""

    def __init__(self, model, kind, n=16, init="text", tok=None, text=None, hidden=64):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of virtual tokens must be an int >= 1, got {n!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.cache_argument = _cache_argument(model)
        if self.cache_argument is None:
            raise TypeError(f"{type(model).__name__}.forward takes no KV cache (no `cache` or `past_key_values` "
                            "argument): prompt methods need a decoder that can be given keys and values to attend to")
        self.model, self.kind, self.n = model, kind, n
        for p in model.parameters():
            p.requires_grad_(False)
        config = model.config
        self.layers, self.kv_heads, self.head_dim = kv_layout(config)
        kv_width = self.kv_heads * self.head_dim
        out = self.layers * 2 * kv_width
        self.prompt = (SoftPrompt(n, config.hidden_size) if kind == "prompt_tuning"
                       else PrefixMLP(n, kv_width, hidden, out) if kind == "prefix" else DeepPrompt(n, out))
        self.prompt.to(next(model.parameters()).device)
        if init == "zero":
            zero_init(self)
        elif init == "text":
            if tok is None or not text:
                raise ValueError("init='text' needs a tokenizer (tok=) and a text (text=)")
            text_init(self, tok, text)
        self.config = config                   # what train() and the scoring code read

    def prefix_cache(self, batch_size):
        """A fresh DynamicCache holding the virtual tokens' keys and values at every layer."""
        from transformers import DynamicCache
        dtype = next(self.model.parameters()).dtype
        kv = self.prompt().to(dtype).view(self.n, self.layers, 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 3, 0, 4).unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)  # L, 2, B, H, n, hd
        return DynamicCache([(kv[l, 0], kv[l, 1]) for l in range(self.layers)])

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, use_cache=False, **kwargs):
        """The wrapped model's forward with the virtual tokens in front. `position_ids`, if given, number
        the real tokens as the wrapped model would (from 0); they are moved after the n virtual tokens,
        as peft does. Other keyword arguments (e.g. logits_to_keep) go to the wrapped model."""
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([torch.ones(B, self.n, dtype=attention_mask.dtype, device=device), attention_mask], 1)
        if position_ids is not None:
            position_ids = position_ids + self.n
        if self.kind == "prompt_tuning":
            embeds = self.model.get_input_embeddings()(input_ids)
            prompt = self.prompt().to(embeds.dtype).unsqueeze(0).expand(B, -1, -1)
            if labels is not None:
                labels = torch.cat([torch.full((B, self.n), -100, dtype=labels.dtype, device=device), labels], 1)
            if position_ids is not None:       # the virtual tokens take positions 0..n-1
                position_ids = torch.cat([torch.arange(self.n, device=device).expand(B, -1), position_ids], 1)
            return self.model(inputs_embeds=torch.cat([prompt, embeds], 1), attention_mask=mask, labels=labels,
                              position_ids=position_ids, use_cache=use_cache, **kwargs)
        # prefix tuning, P-Tuning v2: the prompt's positions start at n, after the cached prefix
        return self.model(input_ids=input_ids, attention_mask=mask, labels=labels, position_ids=position_ids,
                          use_cache=use_cache, **{self.cache_argument: self.prefix_cache(B)}, **kwargs)


def zero_init(pm):
    """Zero keys and values (prefix methods: the last Linear of the MLP, as peft's init_weights="zero")
    or zero embeddings (prompt tuning)."""
    with torch.no_grad():
        if pm.kind == "prefix":
            nn.init.zeros_(pm.prompt.transform[-1].weight)
            nn.init.zeros_(pm.prompt.transform[-1].bias)
        else:
            nn.init.zeros_(pm.prompt.embedding.weight)


def text_ids(pm, tok, text):
    """The text's token ids, repeated to fill the n virtual tokens (as peft's TEXT init does)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > pm.n:
        raise ValueError(f"the initialisation text is {len(ids)} tokens long, more than the {pm.n} virtual "
                         "tokens: shorten it or use more virtual tokens")
    if not ids:
        raise ValueError("the initialisation text is empty")
    return (ids * (pm.n // len(ids) + 1))[:pm.n]


@torch.no_grad()
def text_init(pm, tok, text):
    """Start from the model's own view of `text`: its token embeddings (prompt tuning), or the keys
    and values that every layer computes for it (P-Tuning v2). Prefix tuning keeps those keys and
    values as its fixed `start` and zero-initialises the MLP's last layer, so the MLP learns a
    change from them. (Solving the last layer so that the MLP outputs them exactly also works, but
    its weights come out huge and the first update throws the prefix far off: loss 0.44 -> 12.9.)"""
    device = next(pm.model.parameters()).device
    ids = torch.tensor([text_ids(pm, tok, text)], device=device)
    if pm.kind == "prompt_tuning":
        pm.prompt.embedding.weight.copy_(pm.model.get_input_embeddings()(ids)[0].float())
        return
    cache = _output_cache(pm.model(input_ids=ids, use_cache=True))
    layers = [(cache.layers[l].keys, cache.layers[l].values) if hasattr(cache, "layers") else cache[l]
              for l in range(pm.layers)]
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])   # L, 2, H, n, hd
    target = kv.permute(3, 0, 1, 2, 4).reshape(pm.n, -1).float()        # n, L * 2 * H * hd
    if pm.kind == "ptuning_v2":
        pm.prompt.embedding.weight.copy_(target)
        return
    pm.prompt.start.copy_(target)
    nn.init.zeros_(pm.prompt.transform[-1].weight)
    nn.init.zeros_(pm.prompt.transform[-1].bias)


def from_peft(peft_model):
    """A PromptModel with the same virtual tokens as a peft prompt-tuning or prefix-tuning model,
    on the same (shared) base model: labkit's decoder can then generate with it."""
    config = peft_model.active_peft_config
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type == "PROMPT_TUNING":
        kind = "prompt_tuning"
    elif peft_type == "PREFIX_TUNING":
        # a prefix model loaded for inference keeps only the keys and values its MLP made
        kind = "prefix" if config.prefix_projection and not config.inference_mode else "ptuning_v2"
    else:
        raise ValueError(f"labkit's prompt methods are prompt tuning and prefix tuning, not {peft_type}")
    with torch.random.fork_rng(devices=[]):             # building it draws random numbers; leave the caller's RNG alone
        pm = PromptModel(peft_model.get_base_model(), kind, config.num_virtual_tokens, init="random",
                         hidden=getattr(config, "encoder_hidden_size", None) or 64)
    state = dict(peft_model.prompt_encoder[peft_model.active_adapter].state_dict())
    if kind == "prefix":
        state["start"] = pm.prompt.start                   # peft's prefix MLP has no fixed offset
    pm.prompt.load_state_dict(state)
    return pm


def first_pass(pm, enc):
    """The decoder's first forward pass over a left-padded batch `enc` (input_ids, attention_mask):
    the prompt's real tokens are numbered from n on, as in training, whatever the padding. Only
    the last position's logits are computed. Returns (output, positions used, n included)."""
    mask = enc["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return pm(enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1), pos + pm.n


@torch.no_grad()
def greedy_ids(pm, tok, prompts, max_new_tokens=48, batch_size=16, stop_at_eos=True):
    """The new token ids of each prompt's greedy answer (up to and with its first end-of-turn).
    Left-padded batches, the virtual tokens in the KV cache: the first pass runs the PromptModel on
    the prompts; each new token then goes to the frozen model with that cache. Positions are
    numbered as in training: the prompt's real tokens from n on (left padding does not count), each
    new token one further. `stop_at_eos=False` makes exactly `max_new_tokens` (for timing)."""
    pm.eval()
    device = next(pm.model.parameters()).device
    answers = []
    with left_padded(tok):
        for i in range(0, len(prompts), batch_size):
            enc = tok([chat_prompt(tok, p) for p in prompts[i:i + batch_size]], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(device)
            out, pos = first_pass(pm, enc)
            mask = enc["attention_mask"]
            mask = torch.cat([torch.ones(len(mask), pm.n, dtype=mask.dtype, device=device), mask], 1)
            new = torch.empty(len(mask), 0, dtype=torch.long, device=device)
            done = torch.zeros(len(mask), dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                new = torch.cat([new, nxt[:, None]], 1)
                done |= (nxt == tok.eos_token_id) & stop_at_eos
                if done.all() or step == max_new_tokens - 1:    # the last token needs no forward pass
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
                out = pm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                               logits_to_keep=1, **{pm.cache_argument: _output_cache(out)})
            for row in new.tolist():                        # a finished row ran on: cut it at its end
                answers.append(row[:row.index(tok.eos_token_id) + 1] if stop_at_eos and tok.eos_token_id in row else row)
    return answers


def greedy(pm, tok, prompts, max_new_tokens=48, batch_size=16, stop_at_eos=True):
    """Greedy answers of a PromptModel as strings (see greedy_ids). peft's own `generate` cannot be
    used for prefix methods here: with transformers 5.2x it drops the prefix (tests/test_prompts.py)."""
    ids = greedy_ids(pm, tok, prompts, max_new_tokens, batch_size, stop_at_eos)
    return [tok.decode(a, skip_special_tokens=True).strip() for a in ids]


def _is_prompt_learning(model):
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@register_generator
def _own_decoder(model):
    """lk.text.generate's route for prompt methods: a PromptModel, or a peft prompt-tuning or prefix
    model (whose own generate drops the prefix here, tests/test_prompts.py), answers through greedy."""
    if _is_prompt_learning(model):
        model = from_peft(model)
    if isinstance(model, PromptModel):
        return lambda tok, prompts, max_new_tokens, batch_size: greedy(model, tok, prompts, max_new_tokens, batch_size)
    return None
