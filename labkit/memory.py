"""Memory on paper: the bill of a training step from parameter counts and the model's shape
(chapter 0, then chapters 5 to 7). Measuring lives in lk.measure; its functions are also reachable
here (lk.memory.tracked_peak, ...), since each chapter compares a prediction with a measurement.
"""
import torch

from .lora import QKVO
from .measure import count_saved_tensors, held_memory, peak_memory, tracked_peak  # noqa: F401 (measuring)
from .quant import nf4_bits


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


ZERO_STAGES = {0: "DDP: everything on every device", 1: "ZeRO-1: optimizer states sharded",
               2: "ZeRO-2: optimizer states and gradients sharded",
               3: "ZeRO-3 / FSDP: optimizer states, gradients and weights sharded"}


def per_device_bill(n_params, n_trainable, devices, stage, param_bytes=2, grad_bytes=2, state_bytes=12):
    """Bytes of weights, gradients and optimizer states on each of `devices` data-parallel devices
    (activations left out: each device holds those of its own share of the batch, at any stage).

    stage 0 is plain data parallelism (DDP): every device holds everything. ZeRO (Rajbhandari et
    al., 2020) splits, across the devices: at stage 1 the optimizer states, at stage 2 the gradients
    too, at stage 3 the weights too (what FSDP's FULL_SHARD does). The defaults are the ZeRO paper's
    mixed-precision Adam: 2-byte weights and gradients, and 12 bytes of states per trained parameter
    (an fp32 master copy, m and v). For LoRA and QLoRA, `n_trainable` is the adapters' count; a
    4-bit base is n_params at param_bytes=0.5 (plus its constants)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {sorted(ZERO_STAGES)} ({ZERO_STAGES}), got {stage!r}")
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an int >= 1, got {devices!r}")
    split = lambda n, sharded: n / devices if sharded else n
    return {"weights": split(n_params * param_bytes, stage >= 3),
            "gradients": split(n_trainable * grad_bytes, stage >= 2),
            "optimizer": split(n_trainable * state_bytes, stage >= 1)}


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
        elif any(k in name for k in (*QKVO, "attention")):
            key = "attention"
        elif any(k in name for k in ("mlp", "intermediate", "output.dense")):
            key = "mlp"
        else:
            key = "other"
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


def method_bill(n_params, n_trainable, method, n_quantized=None):
    """Bytes of weights, gradients and AdamW states (no activations) for one fine-tuning method,
    as the QLoRA paper counts them:

    - "full":  mixed precision, 16 bytes per parameter (bf16 weight and gradient, fp32 master
               weight, fp32 m and v);
    - "lora":  the frozen base in bf16 (2 bytes), the adapters trained in fp32 (4 + 4 + 8 bytes);
    - "qlora": the `n_quantized` linear weights in NF4 with double quantization (4.127 bits), the
               rest of the base in bf16, the adapters as in LoRA."""
    if method == "full":
        return {"weights": 2 * n_params + 4 * n_params, "gradients": 2 * n_params, "optimizer": 8 * n_params}
    adapters = {"gradients": 4 * n_trainable, "optimizer": 8 * n_trainable}
    if method == "lora":
        return {"weights": 2 * n_params + 4 * n_trainable, **adapters}
    if method == "qlora":
        n_quantized = n_params if n_quantized is None else n_quantized
        nf4 = n_quantized * nf4_bits(64, double_quant=True) / 8
        return {"weights": nf4 + 2 * (n_params - n_quantized) + 4 * n_trainable, **adapters}
    raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")


LLAMA_LINEARS = (*QKVO, "gate_proj", "up_proj", "down_proj")      # every linear layer of a decoder layer


def activation_bytes(config, batch, seq, method="full", targets=QKVO, r=8,
                     dtype_bytes=4):
    """Bytes autograd saves for backward in one forward pass of a Llama-style decoder (SmolLM2,
    Llama, Mistral with sdpa attention), counted tensor by tensor, per token.

    A tensor is saved only where a gradient must flow back through it, so the count follows the
    residual stream: it "needs grad" from the first trained module on (from the embedding, in full
    fine-tuning). Where it does, each RMSNorm saves its input and 1/rms (h + 1), attention its
    query, key, value, output and log-sum-exp, the MLP its gate output, SiLU(gate) and up output
    (3i). A trained weight also needs its layer's input (q/k/v share one, gate/up another; o's
    is attention's output, already saved), a trained norm its normalised input (h), and a LoRA
    layer A x (r numbers). At the top: the final norm and the log-softmax over the vocabulary.

    `method` is "full" (everything trains) or "lora"/"qlora" (only adapters on `targets` train; a
    QLoRA model saves the same tensors, its 4-bit weights being parameters, not activations)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    unknown = set(targets) - set(LLAMA_LINEARS)
    if unknown:
        raise ValueError(f"targets must be among {list(LLAMA_LINEARS)}, got {sorted(unknown)}")
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // nh
    full = method == "full"
    trained = set(LLAMA_LINEARS) if full else set(targets)
    lora_r = 0 if full else r
    norm = h + 1 + (h if full else 0)                        # input and 1/rms (+ normalised input)

    def layer(live):
        """(floats saved per token, does the stream need grad after this layer)"""
        saved = norm if live else 0
        qkv = trained & {"q_proj", "k_proj", "v_proj"}
        saved += (h if qkv else 0) + lora_r * len(qkv)
        attn_live = live or bool(qkv)
        saved += 2 * nh * d + 2 * nkv * d + nh if attn_live else 0
        if "o_proj" in trained:
            saved += (0 if attn_live else nh * d) + lora_r
        live = attn_live or "o_proj" in trained
        saved += norm if live else 0
        gate_up = trained & {"gate_proj", "up_proj"}
        saved += (h if gate_up else 0) + lora_r * len(gate_up)
        if live:                                             # gate output, SiLU(gate), up output
            saved += 3 * i
        else:                                                # only what leads back to a trained layer
            saved += 2 * i * ("gate_proj" in gate_up) + i * ("up_proj" in gate_up)
        mlp_live = live or bool(gate_up)
        if "down_proj" in trained:
            saved += i + lora_r
        return saved, mlp_live or "down_proj" in trained

    total, live = 0, full                                    # full: the embedding itself trains
    for _ in range(L):
        saved, live = layer(live)
        total += saved
    if live:
        total += norm + (h if full else 0) + V               # final norm (+ lm_head input), log-softmax
    return batch * seq * total * dtype_bytes


def predict_peak(model, batch, seq, method, targets=QKVO, r=8, foreach=None):
    """Peak bytes of one fp32 training step (after the first, when AdamW's states exist), on paper:

        weights + max(backward: optimizer + activations + logits and their gradient,
                      step:     gradients + optimizer + AdamW's temporaries)

    The inputs are counts (parameters, 4-bit weights, the config), not measurements. AdamW's
    temporaries: per tensor on a CPU (foreach=False, two tensors the size of the largest trainable
    one: sqrt(v), then its scaled copy), or for all tensors at once with foreach (CUDA's default):
    one copy of all trainable parameters. Returns {weights, gradients, optimizer, activations,
    temporaries, total, phase}; compare with tracked_peak."""
    from .lora import count_parameters, packed_weights
    trainable, total = count_parameters(model)
    quantized = packed_weights(model)
    largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    foreach = next(model.parameters()).is_cuda if foreach is None else foreach
    return _peak(model.config, total, trainable, quantized, largest, batch, seq, method, targets, r, foreach)


def _peak(config, total, trainable, quantized, largest, batch, seq, method, targets, r, foreach,
          fresh_optimizer=False, extra_saved=0):
    bill = {"weights": 4 * (total - quantized) + quantized * nf4_bits(64, double_quant=True) / 8,
            "gradients": 4 * trainable, "optimizer": 8 * trainable,
            "activations": activation_bytes(config, batch, seq, method, targets, r) + extra_saved}
    logits = 2 * 4 * batch * seq * config.vocab_size         # the logits and their gradient
    adamw_tmp = 4 * trainable if foreach else 2 * 4 * largest
    backward = (0 if fresh_optimizer else bill["optimizer"]) + bill["activations"] + logits
    step = bill["gradients"] + bill["optimizer"] + adamw_tmp
    if backward >= step:
        bill.update(gradients=0, temporaries=logits, phase="backward",
                    optimizer=0 if fresh_optimizer else bill["optimizer"])
    else:
        bill.update(activations=0, temporaries=adamw_tmp, phase="optimizer step")
    bill["total"] = sum(v for k, v in bill.items() if k not in ("phase",))
    return bill


def _linear_shapes(config):
    """{projection: (in, out)} of one Llama-style decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def config_counts(config, method="full", targets=QKVO, r=8):
    """Parameter counts of a Llama-style model from its config alone (no weights needed, so any
    size): {total, trainable, quantized, largest_trainable}. `total` includes LoRA's adapters, as
    count_parameters does; "qlora" quantizes every linear layer of the decoder (not the head)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    shapes = _linear_shapes(config)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"targets must be among {list(shapes)}, got {sorted(unknown)}")
    if method != "full" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"rank r must be a positive integer, got {r!r}")
    h, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    linear = sum(a * b for a, b in shapes.values())
    embed = V * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    base = embed + L * (linear + 2 * h) + h
    if method == "full":
        largest = max(V * h, max(a * b for a, b in shapes.values()))
        return {"total": base, "trainable": base, "quantized": 0, "largest_trainable": largest}
    adapters = L * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    largest = max(r * max(shapes[t]) for t in targets)
    return {"total": base + adapters, "trainable": adapters,
            "quantized": L * linear if method == "qlora" else 0, "largest_trainable": largest}


def predict_peak_config(config, batch, seq, method, targets=QKVO, r=8,
                        foreach=False, fresh_optimizer=False, extra_saved=0):
    """predict_peak from a config alone (a 7B or 70B model needs no weights): the same bill,
    with the parameter counts of config_counts.

    Two options describe a measurement that differs from a steady training step:
    `fresh_optimizer`: the step is an optimizer's first, so AdamW's states do not exist during
    backward (they appear in its step), as in lk.finetune.timed_training's measuring step;
    `extra_saved`: bytes autograd saves beyond activation_bytes' count, e.g. on a CPU the attention
    probabilities that attention keeps when the batch has padding (an attention mask with zeros
    sends it down another kernel); count them with count_saved_tensors."""
    c = config_counts(config, method, targets, r)
    return _peak(config, c["total"], c["trainable"], c["quantized"], c["largest_trainable"], batch, seq,
                 method, targets, r, foreach, fresh_optimizer, extra_saved)
