"""attn_lib.lm: the text, the vocabulary, the character model and its generation."""

import pytest
import torch

from attn_lib import KVCache, lm
from attn_lib.train import fit, set_seed


@pytest.fixture(scope="module")
def text():
    return lm.stdlib_docstrings(60_000)


def _model(vocab_size, **kw):
    set_seed(0)
    return lm.CharGPT(vocab_size, context=32, embed_dim=16, num_layers=2, **kw).eval()


def test_stdlib_text_is_real_printable_english(text):
    assert len(text) == 60_000
    assert "Return" in text and " the " in text
    assert set(text) <= set(map(chr, range(32, 127))) | {"\n"}
    assert lm.stdlib_docstrings(500) == text[:500]  # read the same way every time


def test_vocab_round_trip_and_unknown_characters(text):
    vocab = lm.CharVocab(text)
    ids = vocab.encode(text[:200])
    assert ids.dtype == torch.long and int(ids.max()) < len(vocab)
    assert vocab.decode(ids) == text[:200]
    with pytest.raises(
        ValueError, match=r"text must use only characters of the vocabulary"
    ):
        lm.CharVocab("ab").encode("abc")


def test_sample_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(100)
    x, y = lm.sample_batch(data, 4, 9, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 9)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_cached_logits_equal_the_full_pass():
    model = _model(11)
    idx = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(0))
    caches = model.new_caches()
    with torch.no_grad():
        full = model(idx)
        steps = [model(idx[:, :5], caches=caches)]
        steps += [model(idx[:, i : i + 1], caches=caches) for i in range(5, 13)]
    assert all(isinstance(c, KVCache) and len(c) == 13 for c in caches)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_attention_maps_are_causal_rows_that_sum_to_one():
    model = _model(11)
    idx = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(0))
    maps = model.attention_maps(idx)
    assert len(maps) == 2 and all(m.shape == (2, 9, 9) for m in maps)
    for m in maps:
        assert m.triu(1).eq(0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 9))


def test_causal_model_ignores_future_tokens():
    model = _model(11)
    idx = torch.randint(0, 11, (1, 13), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :6], model(idx)[:, :6])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_and_without_cache_gives_the_same_tokens(temperature):
    model = _model(11)
    prompt = torch.tensor([1, 2, 3])
    a, b = (
        lm.generate(
            model,
            prompt,
            20,
            use_cache=use,
            temperature=temperature,
            generator=torch.Generator().manual_seed(0),
        )
        for use in (True, False)
    )
    assert a.shape == (23,) and torch.equal(a[:3], prompt)
    assert torch.equal(a, b)


def test_training_lowers_the_loss(text):
    vocab = lm.CharVocab(text)
    data = vocab.encode(text)
    model = _model(len(vocab))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, even when busy
    try:
        losses = fit(
            model,
            lm.lm_loss,
            lambda step: lm.sample_batch(data, 8, 32, gen),
            steps=60,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert losses[0] > 4.0  # about ln(V): uniform guessing
    assert sum(losses[-10:]) / 10 < 0.85 * losses[0]


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda: lm.generate(_model(5), torch.tensor([1] * 30), 5),
            ValueError,
            r"the sequence must fit the context of 32 tokens; got 33",
        ),
        (
            lambda: lm.generate(_model(5), torch.tensor([1]), 3, temperature=-1.0),
            ValueError,
            r"temperature must be a float >= 0; got -1.0",
        ),
        (
            lambda: lm.sample_batch(torch.arange(5), 2, 8, torch.Generator()),
            ValueError,
            r"data must be longer than context=8; got 5 tokens",
        ),
        (lambda: lm.CharVocab(""), TypeError, r"text must be a non-empty str; got ''"),
        (
            lambda: lm.stdlib_docstrings(0),
            ValueError,
            r"max_chars must be a positive int; got 0",
        ),
    ],
)
def test_bad_arguments_are_named(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
