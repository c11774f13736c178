"""Chat formatting, tokenization with the prompt masked out of the loss, batching, and greedy generation."""
import random
from contextlib import contextmanager

import torch

SYSTEM = "You are a helpful assistant."
IGNORE = -100          # label of a token that the loss skips (prompt and padding)


def chat_prompt(tok, user, system=SYSTEM):
    """The model's chat template around one user message, ending where the assistant starts."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tok, prompt, response, system=SYSTEM):
    """input_ids of prompt + response + end-of-turn; labels that are IGNORE over the prompt."""
    p = tok(chat_prompt(tok, prompt, system), add_special_tokens=False)["input_ids"]
    r = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def collate(examples, pad_id):
    """Right-pad a list of encoded examples into tensors (B, T)."""
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token: set tok.pad_token = tok.eos_token (padding is masked "
                         "out of the loss, so any token will do), as lk.load_model does")
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(tok, rows, batch_size, seed=0):
    """An endless stream of shuffled batches (one pass after another, reshuffled each pass; the
    rows left over at the end of a pass wait for the next shuffle)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if len(rows) < batch_size:
        raise ValueError(f"{len(rows)} rows cannot fill one batch of {batch_size}: use batch_size <= {len(rows)} "
                         "or more data")
    return _batches([encode(tok, r["prompt"], r["response"]) for r in rows], batch_size, seed, tok.pad_token_id)


def _batches(encoded, batch_size, seed, pad_id):
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([encoded[j] for j in order[i:i + batch_size]], pad_id)


@contextmanager
def left_padded(tok):
    """Within the block, `tok` pads on the left, as batched generation needs (every row's prompt
    ends at the last position, where the next token is made); its padding side is given back when
    the block ends, also after an error.

        with left_padded(tok):
            enc = tok(texts, return_tensors="pt", padding=True)
    """
    side, tok.padding_side = tok.padding_side, "left"
    try:
        yield tok
    finally:
        tok.padding_side = side


# Models that answer through their own decoder rather than model.generate: each entry is a function
# that, given a model, returns `answer(tok, prompts, max_new_tokens, batch_size)` for a model it
# knows, else None. Chapter 8's prompt methods (lk.prompts) put theirs here, so this module needs
# nothing of theirs.
GENERATORS = []


def register_generator(fn):
    """Add `fn` (model -> answer function or None) to GENERATORS; returns it, so it works as a decorator."""
    GENERATORS.append(fn)
    return fn


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens=48, batch_size=16):
    """Greedy answers to a list of user prompts, in batches (left-padded), as strings."""
    model.eval()
    for own_decoder in GENERATORS:           # a prompt method (lk.prompts), peft's or labkit's
        answer = own_decoder(model)
        if answer is not None:
            return answer(tok, prompts, max_new_tokens, batch_size)
    device = next(model.parameters()).device
    answers = []
    with left_padded(tok):
        for i in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tok, p) for p in prompts[i:i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
            answers += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


LOSS_BATCH = 32


@torch.no_grad()
def answer_loss(model, tok, rows, batch_size=16):
    """Mean cross-entropy over the answer tokens of `rows` (each token weighs the same), computed
    here from the model's logits: the task's loss alone. The loss a model returns may hold more
    (peft's AdaLoRA adds its orthogonality regulariser to it, in eval mode too), so the model is
    given no labels. A prompt-tuning model's logits start with its virtual tokens': the last T
    positions are the input's."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # at most LOSS_BATCH rows a forward pass: the logits are (rows, T, vocab) floats, 1.3 GB for 64 rows
    # of SmolLM2, and faulting that much memory in made 60 rows take 44 s at batch 64 against 15 s at 32
    # (one thread; the same loss to the bit there)
    batch_size = min(batch_size, LOSS_BATCH)
    encoded = [encode(tok, r["prompt"], r["response"]) for r in rows]
    losses, tokens = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], tok.pad_token_id).items()}
        labels = batch.pop("labels")
        T = labels.shape[1]
        logits = model(**batch).logits[:, -T:]
        n = (labels[:, 1:] != IGNORE).sum().item()                   # tokens the loss averages over
        losses += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=IGNORE, reduction="sum").item()
        tokens += n
    model.train(was_training)
    return losses / tokens


@torch.no_grad()
def evaluate(model, tok, rows, max_new_tokens=48, batch_size=16):
    """Exact match, per-field accuracy (JSON answers) and the answer-token loss on `rows`."""
    from .data import exact_match, field_accuracy
    answers = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    refs = [r["response"] for r in rows]
    return {"exact_match": exact_match(answers, refs), "fields": field_accuracy(answers, refs),
            "loss": answer_loss(model, tok, rows, batch_size), "answers": answers}


def length_stats(tok, rows):
    """Token counts of the encoded rows: {"prompt"|"answer"|"total": (min, median, max)}."""
    import statistics
    encoded = [encode(tok, r["prompt"], r["response"]) for r in rows]
    counts = {"prompt": [sum(l == IGNORE for l in e["labels"]) for e in encoded],
              "total": [len(e["input_ids"]) for e in encoded]}
    counts["answer"] = [t - p for t, p in zip(counts["total"], counts["prompt"])]
    return {k: (min(v), statistics.median(v), max(v)) for k, v in counts.items()}
