"""lk.text.left_padded: the one place a tokenizer is switched to left padding and given back."""
import types

import pytest
import torch

import labkit as lk
from labkit import text


def test_left_padded_gives_the_padding_side_back_also_after_an_error():
    tok = types.SimpleNamespace(padding_side="right")
    with text.left_padded(tok) as inside:
        assert inside is tok and tok.padding_side == "left"
    assert tok.padding_side == "right"
    with pytest.raises(KeyError):
        with text.left_padded(tok):
            raise KeyError("x")
    assert tok.padding_side == "right"


def test_generate_pads_on_the_left_and_restores_the_tokenizer():
    """Batched greedy answers are those of each prompt alone (left padding keeps every prompt's end
    at the last position); the tokenizer pads on the right again afterwards."""
    tok = lk.load_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(0)
    model = lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256)
    prompts = ["Hi", "A much longer question than the first one?"]
    together = text.generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert tok.padding_side == "right"
    assert together == [text.generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]


def test_generate_hands_a_model_to_the_decoder_registered_for_it(monkeypatch):
    """text.generate knows no prompt method: a module registers the decoder of the models it makes
    (lk.prompts does, for PromptModel and peft's prompt models), and other models go to model.generate."""
    class Own(torch.nn.Module):
        pass

    monkeypatch.setattr(text, "GENERATORS", list(text.GENERATORS))
    text.register_generator(lambda m: (lambda tok, ps, n, bs: [f"{p}:{n}:{bs}" for p in ps]) if isinstance(m, Own) else None)
    assert text.generate(Own(), None, ["a", "b"], max_new_tokens=3, batch_size=2) == ["a:3:2", "b:3:2"]
    assert lk.prompts._own_decoder in text.GENERATORS
    assert lk.prompts._own_decoder(lk.tiny_llama()) is None
