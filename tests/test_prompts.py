"""Prompt tuning, prefix tuning and P-Tuning v2 from scratch (lk.prompts) against peft, and
labkit's decoder for them.

Tolerances: logits within 1e-5 (fp32; the same arithmetic in the same order gives equal numbers
here); gradients within 1e-5 of the largest gradient entry (the prefix's MLP sums over layers in
another order than peft's view/permute/split, and its gradients reach about 1). Two checks allow
1e-4: a left-padded row against the same prompt alone (padding changes the shapes the kernels
see), and a text-initialised model against the model reading the text (a 16-token-longer
sequence, computed once with the text's keys and values cached and once without)."""
import inspect
import warnings

import pytest
import torch

import labkit as lk
from labkit import prompts

PEOPLE = lk.data.load_task("people", splits=("train",))["train"]
N = 16


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(lk.smollm2_path(), local_files_only=True)


def smol():
    return lk.load_model("smollm2")[0]


def tiny(tok):
    return lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256)


def peft_config(kind, n=N):
    from peft import PrefixTuningConfig, PromptTuningConfig
    if kind == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM")
    return PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=kind == "prefix", encoder_hidden_size=64,
                              task_type="CAUSAL_LM")


def twins(kind, make=smol, seed=0, scale=0.5):
    """(labkit's PromptModel, peft's model): the same random virtual-token values in both."""
    from peft import get_peft_model
    theirs = get_peft_model(make(), peft_config(kind))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in theirs.prompt_encoder["default"].parameters():
            p.copy_(scale * torch.randn_like(p))
    ours = prompts.PromptModel(make(), kind, N, init="random")
    state = dict(theirs.prompt_encoder["default"].state_dict())
    if kind == "prefix":
        state["start"] = torch.zeros_like(ours.prompt.start)
    ours.prompt.load_state_dict(state)
    return ours, theirs


@pytest.mark.slow                                   # smol(): the real SmolLM2 weights
@pytest.mark.parametrize("kind", prompts.KINDS)
def test_forward_and_gradients_match_peft(tok, kind):
    ours, theirs = twins(kind)
    batch = next(lk.text.batches(tok, PEOPLE, 4, seed=0))
    a, b = ours(**batch), theirs(**batch)
    assert a.logits.shape == b.logits.shape
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    theirs_grads = dict(theirs.prompt_encoder["default"].named_parameters())
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert sorted(f"prompt.{n}" for n in theirs_grads) == sorted(trained)      # the same parameters train
    for name, p in ours.prompt.named_parameters():
        g = theirs_grads[name].grad
        assert g.abs().max() > 0
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5 * g.abs().max().item())


@pytest.mark.slow                                   # smol(): the real SmolLM2 weights
@pytest.mark.parametrize("kind", prompts.KINDS)
def test_decoder_first_step_equals_peft_forward(tok, kind):
    """The decoder numbers the prompt after the virtual tokens, as training (peft's forward) does:
    its first step's logits are the last position's logits of PeftModel.forward on the same prompt,
    alone and left-padded in a batch with a longer prompt."""
    ours, theirs = twins(kind)
    prompt = lk.text.chat_prompt(tok, PEOPLE[0]["prompt"])
    longer = lk.text.chat_prompt(tok, PEOPLE[1]["prompt"] + " Answer carefully, please.")
    alone = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected = theirs(**alone).logits[:, -1]
        got, _ = prompts.first_pass(ours, alone)
        # The two paths multiply differently shaped matrices (prefix in the cache vs. in the sequence), so
        # float32 sums are taken in another order: measured up to 3.6e-5 on logits as large as 33.
        # 1e-4 is 3e-6 of that scale.
        torch.testing.assert_close(got.logits[:, -1], expected, rtol=0, atol=1e-4)
        with lk.text.left_padded(tok):
            padded = tok([longer, prompt], return_tensors="pt", padding=True, add_special_tokens=False)
        assert padded["attention_mask"][1, 0] == 0                             # really padded
        in_batch, _ = prompts.first_pass(ours, padded)
    # In a batch of two, the matrices have other shapes again, and some CPUs pick other kernels for
    # them: measured 1.8e-4 on logits of 33 (5.5e-6 of their scale) on an Intel CPU with AVX512-BF16,
    # under 1e-4 on AMD and AVX2 ones. The bound scales with the logits: 1e-5 of the largest.
    torch.testing.assert_close(in_batch.logits[1, -1], expected[0], rtol=0, atol=1e-5 * expected.abs().max().item())


def rereading(pm, tok, question, max_new_tokens):
    """The plain reference: re-read the whole sequence through the PromptModel for every new token."""
    ids = tok(lk.text.chat_prompt(tok, question), return_tensors="pt", add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = pm(ids).logits[0, -1].argmax().item()
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return new


@pytest.mark.parametrize("kind", prompts.KINDS)
def test_cached_batched_decoding_equals_rereading_the_sequence(tok, kind):
    """greedy_ids() feeds each new token with the KV cache, three prompts of different lengths
    left-padded in one batch; a plain loop that re-reads the whole sequence for one prompt at a
    time must give the same token ids. (An untied toy model with a large random prefix, so that
    the answers differ from row to row and from step to step.)"""
    torch.manual_seed(0)
    model = lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False)
    pm = prompts.PromptModel(model, kind, 4, init="random")
    with torch.no_grad():
        for p in pm.prompt.parameters():
            p.mul_(3)
    questions = ["Hello there, who are you?", "Ana, 34, is a nurse in Lima.", "Hi"]
    got = prompts.greedy_ids(pm, tok, questions, max_new_tokens=10, batch_size=3)
    assert len({tuple(g) for g in got}) == 3 and all(len(set(g)) > 1 for g in got)   # not degenerate
    assert got == [rereading(pm, tok, q, 10) for q in questions]


def test_decoding_stops_each_row_at_its_own_end(tok):
    """A row that reaches the end-of-turn token stops there while the others go on. The toy
    P-Tuning v2 model above says token 16449 in two of its three answers: make it the end. The
    tokenizer's padding side is given back afterwards."""
    import copy
    torch.manual_seed(0)
    model = lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    pm = prompts.PromptModel(model, "ptuning_v2", 4, init="random")
    with torch.no_grad():
        pm.prompt.embedding.weight.mul_(3)
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.convert_ids_to_tokens(16449)
    tok.padding_side = "right"                                   # greedy_ids pads on the left, then gives it back
    questions = ["Hello there, who are you?", "Ana, 34, is a nurse in Lima.", "Hi"]
    got = prompts.greedy_ids(pm, tok, questions, max_new_tokens=10, batch_size=3)
    assert tok.padding_side == "right"
    assert [g[-1] == 16449 for g in got] == [True, False, True] and len(got[1]) == 10 > len(got[0])
    assert got == [rereading(pm, tok, q, 10) for q in questions]


def test_explicit_positions_number_the_real_tokens_from_zero(tok):
    """position_ids mean what they mean for the wrapped model (0 = the first real token); the
    PromptModel moves them after its virtual tokens, as peft does."""
    for kind in prompts.KINDS:
        torch.manual_seed(0)
        pm = prompts.PromptModel(lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256), kind, 4,
                                 init="random")
        ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(pm(ids, position_ids=torch.arange(ids.shape[1])[None]).logits, pm(ids).logits,
                                       rtol=0, atol=1e-6)


def test_from_peft_reads_a_saved_prefix_adapter(tok, tmp_path):
    """peft loads a saved prefix-tuning adapter in inference mode, keeping only the keys and values
    its MLP made (no MLP): from_peft then gives a P-Tuning v2 model with those keys and values."""
    from peft import PeftModel
    torch.manual_seed(0)
    ours, theirs = twins("prefix", make=lambda: tiny(tok), scale=1.0)
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    theirs.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny(tok), tmp_path)
    state = torch.get_rng_state()
    again = prompts.from_peft(loaded)
    assert torch.equal(torch.get_rng_state(), state)                   # it leaves the caller's RNG alone
    assert again.kind == "ptuning_v2"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow                                   # smol(): the real SmolLM2 weights
@pytest.mark.parametrize("kind", prompts.KINDS)
def test_text_init_is_reading_the_text_first(tok, kind):
    """init="text" starts the model exactly as if it had read the text before the prompt."""
    model = smol()
    pm = prompts.PromptModel(model, kind, N, init="text", tok=tok, text="Extract the person from the text as JSON.")
    ids = tok(lk.text.chat_prompt(tok, PEOPLE[0]["prompt"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
    text_ids = torch.tensor([prompts.text_ids(pm, tok, "Extract the person from the text as JSON.")])
    with torch.no_grad():
        reading = model(input_ids=torch.cat([text_ids, ids], 1)).logits[:, N:]
        got = pm(ids).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(got, reading, rtol=0, atol=1e-4)


def test_peft_generate_still_drops_the_prefix(tok):
    """Records an upstream bug that labkit's decoder works around: with peft 0.21 and a transformers
    whose models take the cache as `cache` (5.24 here), PeftModel.generate runs a prefix-tuned model
    as if it had no prefix (peft's prepare_inputs_for_generation reads `past_key_values`). With a
    transformers whose models still take `past_key_values` (5.20.2, the newest for Python 3.10, as
    scripts/python_versions.sh found) peft's generate does use the prefix, and this test checks that
    instead. When the first case fails, the bug is fixed upstream: use peft's generate again and
    remove the workaround."""
    from peft import get_peft_model
    torch.manual_seed(0)
    model = tiny(tok)
    base_ids = None
    theirs = get_peft_model(model, peft_config("ptuning_v2", 4))
    with torch.no_grad():
        for p in theirs.prompt_encoder["default"].parameters():
            p.copy_(3 * torch.randn_like(p))
    enc = tok([lk.text.chat_prompt(tok, "Hello there, who are you?")], return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_out = theirs.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1]:]
        with theirs.disable_adapter():
            base_ids = theirs.get_base_model().generate(**enc, **kwargs)[0, enc["input_ids"].shape[1]:]
        ours = prompts.from_peft(theirs)
        ours_first = prompts.first_pass(ours, enc)[0].logits[0, -1].argmax().item()
        base_first = theirs.get_base_model()(**enc).logits[0, -1].argmax().item()
    assert ours_first != base_first                          # the prefix changes the next token...
    takes_cache = "cache" in inspect.signature(type(theirs.get_base_model()).forward).parameters
    if takes_cache:
        assert torch.equal(peft_out, base_ids), "peft's generate now uses the prefix: retire labkit's workaround"
    else:                                                    # an older transformers: peft's generate is right
        assert peft_out[0].item() == ours_first and not torch.equal(peft_out, base_ids)


def test_text_generate_uses_the_prefix_of_a_peft_model(tok):
    """lk.text.generate on a peft prefix model goes through labkit's decoder (from_peft, greedy) and
    answers what re-reading the sequence through peft's own forward pass answers."""
    make = lambda: lk.tiny_llama(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    _, theirs = twins("ptuning_v2", make=make, scale=3.0)
    questions = ["Hello there, who are you?", "Ana, 34, is a nurse in Lima."]
    got = lk.text.generate(theirs, tok, questions, max_new_tokens=8)
    want = [tok.decode(rereading(theirs, tok, q, 8), skip_special_tokens=True).strip() for q in questions]
    assert got == want and len(set(want)) == 2 and all(want)


def test_bad_input_gets_a_clear_error(tok):
    model = tiny(tok)
    with pytest.raises(ValueError, match="virtual tokens must be an int >= 1"):
        prompts.PromptModel(model, "prefix", 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        prompts.PromptModel(model, "p-tuning", 4)
    with pytest.raises(ValueError, match="11 tokens long, more than the 4 virtual tokens"):
        prompts.PromptModel(model, "ptuning_v2", 4, init="text", tok=tok,
                            text="Extract the person from the text as JSON, please.")
    with pytest.raises(ValueError, match="init must be one of"):
        prompts.PromptModel(model, "prefix", 4, init="ones")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        prompts.PromptModel(model, "prompt_tuning", 4, init="text")

    class NoCache(torch.nn.Module):                        # e.g. an encoder: nothing to put a prefix into
        config = model.config

        def forward(self, input_ids, attention_mask=None):
            return input_ids
    with pytest.raises(TypeError, match="takes no KV cache"):
        prompts.PromptModel(NoCache(), "prefix", 4)


def test_prepare_makes_the_three_prompt_methods(tok):
    for method, kind in (("prefix", "prefix"), ("ptuning_v2", "ptuning_v2"), ("prompt_tuning", "prompt_tuning")):
        pm = lk.finetune.prepare(tiny(tok), method, virtual_tokens=16, tok=tok)
        assert isinstance(pm, prompts.PromptModel) and pm.kind == kind and pm.n == 16
