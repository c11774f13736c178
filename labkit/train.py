"""A small training loop that reads in one screen."""
import torch
from tqdm.auto import tqdm


def train(model, batches, steps, lr=2e-3, weight_decay=0.0, progress=True):
    """AdamW on the parameters that require grad, for `steps` batches. Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for _ in bar:
        batch = next(batches)
        loss = model(**batch).loss                 # mean cross-entropy over the unmasked tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
